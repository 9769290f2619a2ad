"""Checkpoint readers: each turns a `Piece` (a Hugging Face tensor name, and optionally a slice of
it) into a tensor, reading no more of the file than that slice where the format allows.

- safetensors: one file or a sharded index; slices are read from the file directly.
- meta: Meta's original consolidated.NN.pth, one model-parallel part per file, memory-mapped.
  Which dimension each tensor is split along is read off the parts' shapes, so every Llama
  generation's own layout loads (Llama 3 splits tok_embeddings over the vocabulary, Llama 2
  over the model dimension) from any number of parts into any TP size.
- gguf: llama.cpp's format, memory-mapped through the `gguf` package (llama.cpp's own reader).
  Only the rows a rank needs are dequantised: rows are independent in every GGUF block format.

Meta's and llama.cpp's Llama q/k rows interleave the two rotary halves of each head; readers
return them in the rotate-half layout of Hugging Face checkpoints, which the model uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import numpy as np
import torch

from zllm.architecture import ModelArchitecture
from zllm.gguf_file import find_gguf_file, metadata_value, open_gguf
from zllm.model_files import meta_files, safetensors_files


@dataclass
class Piece:
    """Rows (dim 0) or columns (dim 1) [start, end) of one checkpoint tensor; None: all of it."""

    name: str
    dim: int | None = None
    start: int = 0
    end: int = 0


class CheckpointReader(Protocol):
    def read(self, piece: Piece) -> torch.Tensor: ...


def make_reader(model_path: str, load_format: str, arch: ModelArchitecture) -> CheckpointReader:
    """The reader for a detected load format (see zllm.model_files.detect_load_format)."""
    if load_format == "safetensors":
        return SafetensorsReader(model_path)
    if load_format == "meta":
        return MetaReader(model_path, arch)
    if load_format == "gguf":
        return GGUFReader(find_gguf_file(model_path), arch)
    raise ValueError(f"load_format {load_format!r} has no checkpoint reader")


def _slice(tensor, piece: Piece) -> torch.Tensor:
    if piece.dim is None:
        return tensor[:]
    return tensor[piece.start:piece.end] if piece.dim == 0 else tensor[:, piece.start:piece.end]


def swap_rotary_layout(w: torch.Tensor, head_dim: int, interleaved: bool) -> torch.Tensor:
    """Within each head, reorder q/k rows between the interleaved rotary pairs (x0, x1), (x2,
    x3)... of Meta and llama.cpp (interleaved=True: from that layout) and the rotate-half layout
    (x0, x2, ..., x1, x3...). Works on any slice of whole heads."""
    rows, cols = w.shape
    pairs = (head_dim // 2, 2) if interleaved else (2, head_dim // 2)
    return w.reshape(rows // head_dim, *pairs, cols).transpose(1, 2).reshape(rows, cols)


# The Hugging Face tensors whose rows Meta and llama.cpp store in interleaved rotary order.
ROTARY_WEIGHTS = ("self_attn.q_proj.weight", "self_attn.k_proj.weight")


def rotate_half_rows(read_interleaved, piece: Piece, head_dim: int) -> torch.Tensor:
    """q/k rows in the rotate-half layout, from a function reading them interleaved. A row slice
    that cuts a head is widened to whole heads, reordered, then cut back."""
    if piece.dim != 0:
        return swap_rotary_layout(read_interleaved(piece), head_dim, interleaved=True)
    lo, hi = piece.start // head_dim * head_dim, -(-piece.end // head_dim) * head_dim
    heads = read_interleaved(Piece(piece.name, 0, lo, hi))
    return swap_rotary_layout(heads, head_dim, interleaved=True)[piece.start - lo:piece.end - lo]


class SafetensorsReader:
    """Reads tensor slices from *.safetensors files without loading whole tensors."""

    def __init__(self, model_dir: str) -> None:
        from safetensors import safe_open

        self.files = {}
        self.location: dict[str, str] = {}
        for path in safetensors_files(model_dir):
            handle = safe_open(path, framework="pt")
            self.files[path] = handle
            for key in handle.keys():
                self.location[key] = path

    def read(self, piece: Piece) -> torch.Tensor:
        path = self.location.get(piece.name)
        if path is None:
            raise ValueError(f"checkpoint has no tensor {piece.name!r}")
        return _slice(self.files[path].get_slice(piece.name), piece)


# Hugging Face name (after "model.layers.N." for a layer's tensors) -> Meta's name.
_META_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def meta_name(hf_name: str) -> str:
    if hf_name.startswith("model.layers."):
        _, _, layer, rest = hf_name.split(".", 3)
        return f"layers.{layer}.{_META_NAMES[rest]}"
    return _META_NAMES[hf_name]


def hf_shape(hf_name: str, arch: ModelArchitecture) -> tuple[int, ...]:
    """The full shape of a Hugging Face Llama tensor (norms: [hidden])."""
    h, i, v = arch.hidden_size, arch.intermediate_size, arch.vocab_size
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    shapes = {"embed_tokens": (v, h), "lm_head": (v, h), "q_proj": (q, h), "k_proj": (kv, h),
              "v_proj": (kv, h), "o_proj": (h, q), "gate_proj": (i, h), "up_proj": (i, h),
              "down_proj": (h, i)}
    return shapes.get(hf_name.split(".")[-2], (h,))


def split_dim(part_shapes: list[tuple[int, ...]], full: tuple[int, ...], name: str) -> Optional[int]:
    """The dimension a tensor's model-parallel parts are concatenated along; None: replicated."""
    if all(shape == full for shape in part_shapes):
        return None
    for dim in range(len(full)):
        rest = full[:dim] + full[dim + 1:]
        if (all(s[:dim] + s[dim + 1:] == rest for s in part_shapes)
                and sum(s[dim] for s in part_shapes) == full[dim]):
            return dim
    raise ValueError(f"checkpoint tensor {name!r}: parts of shapes {part_shapes} do not join into "
                     f"the model's shape {full} along any dimension")


class MetaReader:
    """Reads Meta's original checkpoint: consolidated.NN.pth, each one model-parallel part.

    Files are memory-mapped, so only the slices read are paged in. A slice along a tensor's split
    dimension reads only the parts it overlaps; a slice across it reads that slice of each part.
    """

    def __init__(self, model_dir: str, arch: ModelArchitecture) -> None:
        self.parts = [torch.load(p, map_location="cpu", mmap=True, weights_only=True)
                      for p in meta_files(model_dir)]
        self.arch = arch

    def read(self, piece: Piece) -> torch.Tensor:
        if piece.name.endswith(ROTARY_WEIGHTS):
            return rotate_half_rows(self._read, piece, self.arch.head_dim)
        return self._read(piece)

    def _read(self, piece: Piece) -> torch.Tensor:
        name = meta_name(piece.name)
        parts = [part[name] for part in self.parts]
        split = split_dim([tuple(p.shape) for p in parts], hf_shape(piece.name, self.arch), name)
        if split is None:
            return _slice(parts[0], piece)
        if piece.dim != split:  # the same slice of every part, joined along the split
            return torch.cat([_slice(part, piece) for part in parts], dim=split)
        chunks, offset = [], 0  # the overlapping range of each part
        for part in parts:
            size = part.shape[split]
            lo, hi = max(piece.start, offset), min(piece.end, offset + size)
            if lo < hi:
                chunks.append(_slice(part, Piece(name, split, lo - offset, hi - offset)))
            offset += size
        return torch.cat(chunks, dim=split)


class GGUFReader:
    """Reads llama.cpp's GGUF file, dequantising (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K,
    Q6_K and whatever else the `gguf` package dequantises) only what a piece asks for.

    Names map through the `gguf` package's own table (the one llama.cpp's converter writes
    with). llama.cpp's converter permutes the q/k rows of Llama (only) into the interleaved
    rotary layout; that is undone here.
    """

    def __init__(self, path: str, arch: ModelArchitecture) -> None:
        import gguf

        reader = open_gguf(path)
        self.path = path
        self.tensors = {t.name: t for t in reader.tensors}
        arch_name = metadata_value(reader, "general.architecture")
        model_arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch_name)
        self.names = gguf.get_tensor_name_map(model_arch, arch.num_layers)
        self.unpermute = arch_name == "llama"
        self.head_dim = arch.head_dim

    def read(self, piece: Piece) -> torch.Tensor:
        if self.unpermute and piece.name.endswith(ROTARY_WEIGHTS):
            return rotate_half_rows(self._read, piece, self.head_dim)
        return self._read(piece)

    def _read(self, piece: Piece) -> torch.Tensor:
        base, suffix = piece.name.rsplit(".", 1)
        gguf_base = self.names.get_name(base)
        tensor = self.tensors.get(f"{gguf_base}.{suffix}") if gguf_base else None
        if tensor is None:
            raise ValueError(f"GGUF file {self.path!r} has no tensor for {piece.name!r} "
                             f"(llama.cpp name {gguf_base}.{suffix})")
        w = dequantize_piece(tensor, piece)
        return torch.from_numpy(w if w.flags.writeable else w.copy())


def dequantize_piece(tensor, piece: Piece) -> np.ndarray:
    """float32 rows [start, end) (dim 0) or columns (dim 1) of a GGUF tensor. Rows are
    independent in every GGUF format, so a row slice dequantises only its own bytes; a column
    slice does too when it starts and ends on quantisation-block boundaries."""
    from gguf import GGML_QUANT_SIZES, dequantize

    data = tensor.data  # [rows, bytes per row] for block formats, [rows, cols] for F32/F16
    block, block_bytes = GGML_QUANT_SIZES[tensor.tensor_type] if data.dtype == np.uint8 else (1, 1)
    columns = None
    if piece.dim == 0:
        data = data[piece.start:piece.end]
    elif piece.dim == 1:
        if piece.start % block == 0 and piece.end % block == 0:
            data = data[:, piece.start // block * block_bytes:piece.end // block * block_bytes]
        else:
            columns = slice(piece.start, piece.end)
    try:
        w = dequantize(data, tensor.tensor_type)
    except NotImplementedError as e:
        raise ValueError(f"GGUF tensor {tensor.name!r} is {tensor.tensor_type.name}, which the "
                         f"gguf package cannot dequantise: {e}") from e
    return w if columns is None else w[:, columns]
