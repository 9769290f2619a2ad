"""Fill one rank's model shard from a checkpoint, reading only that rank's slice of each tensor.

Every parameter is described in Hugging Face terms: which checkpoint tensors, along which dim,
which range. Model modules are named as the checkpoint's, so a parameter is by default the whole
tensor of its own name; a layer that shards or fuses says which pieces make its parameters
(`shard_pieces`, zllm/worker/models/linear.py). A reader turns pieces into I/O: safetensors slices
(single or sharded files), or Meta's consolidated.NN.pth (memory-mapped; its own model-parallel
split and rotary layout are undone here). `dummy` fills random weights of the right shapes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from torch import nn

from zllm.model_files import meta_files, safetensors_files


@dataclass
class Piece:
    """Rows (dim 0) or columns (dim 1) [start, end) of one checkpoint tensor; None: all of it."""

    name: str
    dim: int | None = None
    start: int = 0
    end: int = 0


def shard_plan(model: nn.Module) -> dict[str, list[Piece]]:
    """For each parameter of this rank, the checkpoint pieces it is the concatenation of (dim 0).
    A parameter shared by two modules (tied embeddings) is loaded once, under its first name."""
    plan = {}
    for name, param in model.named_parameters():
        owner, _, param_name = name.rpartition(".")
        pieces = getattr(model.get_submodule(owner), "shard_pieces", None)
        plan[name] = pieces(owner, param_name) if pieces else [Piece(name)]
    return plan


def load_weights(model: nn.Module, model_dir: str, load_format: str, rank: int,
                 seed: int) -> None:
    params = dict(model.named_parameters())
    if load_format == "dummy":
        _fill_dummy(params, seed + rank)
        return
    reader = SafetensorsReader(model_dir) if load_format == "safetensors" else MetaReader(model_dir, model)
    with torch.no_grad():
        for name, pieces in shard_plan(model).items():
            tensor = torch.cat([reader.read(piece) for piece in pieces], dim=0)
            param = params[name]
            if tensor.shape != param.shape:
                raise ValueError(f"checkpoint gives {name} shape {tuple(tensor.shape)}, this rank "
                                 f"expects {tuple(param.shape)}")
            param.copy_(tensor)


def _fill_dummy(params: dict[str, nn.Parameter], seed: int) -> None:
    generator = None
    for name, param in params.items():
        if generator is None or generator.device != param.device:
            generator = torch.Generator(device=param.device).manual_seed(seed)
        with torch.no_grad():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)


def _slice(tensor, piece: Piece) -> torch.Tensor:
    if piece.dim is None:
        return tensor[:]
    return tensor[piece.start:piece.end] if piece.dim == 0 else tensor[:, piece.start:piece.end]


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


# Hugging Face name -> (Meta name, the dim Meta's model-parallel files split it along).
_META_NAMES = {
    "model.embed_tokens.weight": ("tok_embeddings.weight", 1),
    "model.norm.weight": ("norm.weight", None),
    "lm_head.weight": ("output.weight", 0),
    "self_attn.q_proj.weight": ("attention.wq.weight", 0),
    "self_attn.k_proj.weight": ("attention.wk.weight", 0),
    "self_attn.v_proj.weight": ("attention.wv.weight", 0),
    "self_attn.o_proj.weight": ("attention.wo.weight", 1),
    "mlp.gate_proj.weight": ("feed_forward.w1.weight", 0),
    "mlp.up_proj.weight": ("feed_forward.w3.weight", 0),
    "mlp.down_proj.weight": ("feed_forward.w2.weight", 1),
    "input_layernorm.weight": ("attention_norm.weight", None),
    "post_attention_layernorm.weight": ("ffn_norm.weight", None),
}


_ROTARY_WEIGHTS = ("attention.wq.weight", "attention.wk.weight")


def meta_name(hf_name: str) -> tuple[str, int | None]:
    if hf_name.startswith("model.layers."):
        _, _, layer, rest = hf_name.split(".", 3)
        meta, split = _META_NAMES[rest]
        return f"layers.{layer}.{meta}", split
    return _META_NAMES[hf_name]


def _swap_rotary_layout(w: torch.Tensor, head_dim: int, interleaved: bool) -> torch.Tensor:
    """Within each head, reorder q/k rows between Meta's interleaved rotary pairs (x0, x1), (x2,
    x3)... (interleaved=True: from that layout) and the rotate-half layout (x0, x2, ..., x1, x3...)."""
    rows, cols = w.shape
    pairs = (head_dim // 2, 2) if interleaved else (2, head_dim // 2)
    return w.reshape(rows // head_dim, *pairs, cols).transpose(1, 2).reshape(rows, cols)


class MetaReader:
    """Reads Meta's original checkpoint: consolidated.NN.pth, each one model-parallel part.

    Files are memory-mapped, so only the slices read are paged in. Meta's q/k rows interleave the
    two rotary halves of each head; they are reordered into the rotate-half layout that the model
    (like Hugging Face's) uses.
    """

    def __init__(self, model_dir: str, model: nn.Module) -> None:
        self.parts = [torch.load(p, map_location="cpu", mmap=True, weights_only=True)
                      for p in meta_files(model_dir)]
        self.head_dim = model.arch.head_dim

    def read(self, piece: Piece) -> torch.Tensor:
        name, split = meta_name(piece.name)
        parts = [part[name] for part in self.parts]
        if split is None or len(parts) == 1:
            tensor = _slice(parts[0], piece)
        elif piece.dim == split:  # take the overlapping range of each part
            chunks, offset = [], 0
            for part in parts:
                size = part.shape[split]
                lo, hi = max(piece.start, offset), min(piece.end, offset + size)
                if lo < hi:
                    chunks.append(_slice(part, Piece(name, split, lo - offset, hi - offset)))
                offset += size
            tensor = torch.cat(chunks, dim=split)
        else:  # the same slice of every part, joined along Meta's split
            tensor = torch.cat([_slice(part, piece) for part in parts], dim=split)
        if name.endswith(_ROTARY_WEIGHTS):
            tensor = _swap_rotary_layout(tensor, self.head_dim, interleaved=True)
        return tensor


def write_meta_checkpoint(hf_state: dict[str, torch.Tensor], params: dict, out_dir: str,
                          num_parts: int = 1) -> None:
    """Write Hugging Face Llama weights in Meta's original layout (params.json and
    consolidated.NN.pth split over `num_parts`), the inverse of MetaReader. For tests and
    conversions."""
    head_dim = params["dim"] // params["n_heads"]
    parts: list[dict[str, torch.Tensor]] = [{} for _ in range(num_parts)]
    for hf_name, tensor in hf_state.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        name, split = meta_name(hf_name)
        if name.endswith(_ROTARY_WEIGHTS):
            tensor = _swap_rotary_layout(tensor, head_dim, interleaved=False)
        chunks = [tensor] * num_parts if split is None else tensor.chunk(num_parts, dim=split)
        for part, chunk in zip(parts, chunks):
            part[name] = chunk.clone()
    os.makedirs(out_dir, exist_ok=True)
    for i, part in enumerate(parts):
        torch.save(part, os.path.join(out_dir, f"consolidated.{i:02d}.pth"))
    with open(os.path.join(out_dir, "params.json"), "w") as f:
        json.dump(params, f)
