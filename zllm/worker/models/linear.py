"""Tensor-parallel linear layers and the vocabulary embedding, each owning its weight sharding.

They are fairscale's model-parallel layers (subclasses, with fairscale's mappings where they
fit), built another way: fairscale's constructors fill a full-size master weight on
every rank and scatter it, which for an 8B model costs seconds and the whole model's memory on
each rank. These allocate only their own shard, uninitialised, on the device the model is built
on; the loader fills it. Column-parallel layers split their output features across ranks (each
rank holds whole heads); row-parallel layers split their input and all-reduce the result.
Their forwards call F.linear and, for row-parallel layers with more than one rank, all_reduce,
directly: fairscale's forwards wrap both in autograd Functions (copy_to / reduce_from the model
parallel region), which in a forward pass are the identity and the all-reduce, but cost tens of
microseconds of host time per call (four per decoder layer), and they ask torch.distributed for
the group's size on every call.

Each layer says which pieces of which checkpoint tensors make its parameters on this rank
(`shard_pieces`), in Hugging Face names relative to its own; a reader turns pieces into I/O.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel import layers as fairscale
from fairscale.nn.model_parallel.initialize import (get_model_parallel_group,
                                                    get_model_parallel_rank,
                                                    get_model_parallel_world_size)
from fairscale.nn.model_parallel.mappings import gather_from_model_parallel_region
from torch import nn

from zllm.worker.models.gemm_tuning import TunedProduct
from zllm.worker.models.weights import Piece


def _parameter(*shape: int) -> nn.Parameter:
    """Uninitialised, on the default device and dtype of the build (the loader fills it)."""
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


def _sibling(prefix: str, name: str) -> str:
    """The checkpoint name of module `name` beside module `prefix` ("a.b.qkv_proj", "q_proj" ->
    "a.b.q_proj")."""
    parent = prefix.rpartition(".")[0]
    return f"{parent}.{name}" if parent else name


class ColumnParallelLinear(TunedProduct, fairscale.ColumnParallelLinear):
    """y = x W^T + b, W's rows split across ranks; several projections of the same input fused
    into one matmul. `sources` lists, per projection, its checkpoint module (beside this one) and
    the rows [start, end) of it that this rank holds, in output order. The output stays split
    (as fairscale's with gather_output=False)."""

    def __init__(self, in_features: int, sources: list[tuple[str, int, int]],
                 bias: bool = False) -> None:
        nn.Module.__init__(self)  # not fairscale's __init__: see the module docstring
        self.sources = sources
        rows = sum(end - start for _, start, end in sources)
        self.in_features, self.gather_output = in_features, False
        self.out_features = rows * get_model_parallel_world_size()
        self.output_size_per_partition = rows
        self.weight = _parameter(rows, in_features)
        self.bias = _parameter(rows) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.tuned_product(x)
        if out is None:
            out = F.linear(x, self.weight, self.bias)
        elif self.bias is not None:
            out = out + self.bias
        self.read_next_weight()
        return out

    @classmethod
    def split(cls, in_features: int, out_features: int, names: tuple[str, ...],
              **kwargs) -> "ColumnParallelLinear":
        """Each of `names` (out_features rows each) split evenly: this rank's slice of every one."""
        tp, rank = get_model_parallel_world_size(), get_model_parallel_rank()
        size = out_features // tp
        return cls(in_features, [(n, rank * size, (rank + 1) * size) for n in names], **kwargs)

    def shard_pieces(self, prefix: str, param: str) -> list[Piece]:
        return [Piece(f"{_sibling(prefix, name)}.{param}", 0, start, end)
                for name, start, end in self.sources]


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul. Each rank holds whole query heads; KV heads are split
    likewise, or replicated when there are fewer KV heads than ranks (ranks then share one)."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 bias: bool, names: tuple[str, str, str] = ("q_proj", "k_proj", "v_proj")) -> None:
        tp, rank = get_model_parallel_world_size(), get_model_parallel_rank()
        heads, kv_heads = num_heads // tp, max(1, num_kv_heads // tp)
        q_size, kv_size = heads * head_dim, kv_heads * head_dim
        kv_head = rank * kv_heads if num_kv_heads >= tp else rank * num_kv_heads // tp
        q0, kv0 = rank * q_size, kv_head * head_dim
        super().__init__(hidden_size, [(names[0], q0, q0 + q_size), (names[1], kv0, kv0 + kv_size),
                                       (names[2], kv0, kv0 + kv_size)], bias=bias)
        self.num_heads, self.num_kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_size, self.kv_size = q_size, kv_size

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [T, H, D], k and v [T, KVH, D] (views into one output)."""
        return split_qkv(super().forward(x), self.num_heads, self.num_kv_heads, self.head_dim)


def split_qkv(qkv: torch.Tensor, num_heads: int, num_kv_heads: int,
              head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fused qkv product [T, (H + 2 KVH) D] as q [T, H, D], k and v [T, KVH, D]: views, each
    head's D values contiguous, rows strided by the whole width (what attention backends get)."""
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim,
                         num_kv_heads * head_dim], dim=-1)
    return (q.view(-1, num_heads, head_dim), k.view(-1, num_kv_heads, head_dim),
            v.view(-1, num_kv_heads, head_dim))


class RowParallelLinear(TunedProduct, fairscale.RowParallelLinear):
    """y = x W^T + b, W's columns (input features) split across ranks, the input already split
    the same way; the partial products are all-reduced, then the (unsplit) bias is added once
    (as fairscale's with input_is_parallel=True)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        nn.Module.__init__(self)  # not fairscale's __init__: see the module docstring
        tp, rank = get_model_parallel_world_size(), get_model_parallel_rank()
        size = in_features // tp
        self.start, self.end = rank * size, (rank + 1) * size
        self.in_features, self.out_features, self.input_is_parallel = in_features, out_features, True
        self.input_size_per_partition = size
        self.weight = _parameter(out_features, size)
        self.bias = _parameter(out_features) if bias else None
        self.group = get_model_parallel_group() if tp > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.tuned_product(x)
        if out is None:
            out = F.linear(x, self.weight)
        self.read_next_weight()  # before the all-reduce: it is part of the window
        if self.group is not None:
            torch.distributed.all_reduce(out, group=self.group)
        return out if self.bias is None else out + self.bias

    def shard_pieces(self, prefix: str, param: str) -> list[Piece]:
        if param == "bias":
            return [Piece(f"{prefix}.bias")]
        return [Piece(f"{prefix}.weight", 1, self.start, self.end)]


class VocabParallelEmbedding(fairscale.VocabParallelEmbedding):
    """Token embedding, rows split over the vocabulary: each rank looks up the ids in its range,
    zeroes the others, and the ranks' results are all-reduced. (fairscale's forward, but with
    one rank a plain lookup: no masking kernels in every decode step.)"""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        nn.Module.__init__(self)  # not fairscale's __init__: see the module docstring
        tp, rank = get_model_parallel_world_size(), get_model_parallel_rank()
        size = vocab_size // tp
        self.start, self.end = rank * size, (rank + 1) * size
        self.num_embeddings, self.embedding_dim = vocab_size, hidden_size
        self.vocab_start_index, self.vocab_end_index = self.start, self.end
        self.num_embeddings_per_partition = size
        self.padding_idx, self.max_norm, self.norm_type = None, None, 2.0
        self.scale_grad_by_freq, self.sparse = False, False
        self.tp_size = tp
        self.weight = _parameter(size, hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        return super().forward(input_ids)

    def shard_pieces(self, prefix: str, param: str) -> list[Piece]:
        return [Piece(f"{prefix}.{param}", 0, self.start, self.end)]


class ParallelLMHead(TunedProduct, fairscale.ColumnParallelLinear):
    """The output projection, split over the vocabulary like the embedding (whose weight it may
    share). Logits are gathered to the full vocabulary on every rank, so all ranks sample alike."""

    def __init__(self, hidden_size: int, vocab_size: int,
                 tied_to: Optional[VocabParallelEmbedding] = None) -> None:
        nn.Module.__init__(self)  # not fairscale's __init__: see the module docstring
        tp, rank = get_model_parallel_world_size(), get_model_parallel_rank()
        size = vocab_size // tp
        self.start, self.end = rank * size, (rank + 1) * size
        self.in_features, self.out_features, self.gather_output = hidden_size, vocab_size, True
        self.output_size_per_partition, self.bias = size, None
        # Tied: the embedding's [vocab / tp, hidden] shard, loaded under the embedding's name.
        self.tied = tied_to is not None
        self.weight = tied_to.weight if self.tied else _parameter(size, hidden_size)
        self.tuned_out_dtype = torch.float32

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [T, vocab]. On CUDA the 16-bit matmul writes float32 directly: rounding
        logits to bf16 (8 bits of mantissa) would turn many close candidates into exact ties and
        make greedy decoding depend on kernel choice."""
        logits = self.tuned_product(hidden)
        if logits is None and hidden.is_cuda and hidden.dtype != torch.float32:
            logits = torch.mm(hidden, self.weight.t(), out_dtype=torch.float32)
        elif logits is None:  # CPU, or float32 weights
            logits = F.linear(hidden, self.weight).float()
        return gather_from_model_parallel_region(logits)

    def shard_pieces(self, prefix: str, param: str) -> list[Piece]:
        return [Piece(f"{prefix}.{param}", 0, self.start, self.end)]


def column_major_linears(model: nn.Module) -> None:
    """Give every linear layer's weight (the LM head's too, unless it is the embedding's) a
    column-major layout: still an [out, in] tensor, so loading and sharding are unchanged, but
    [in, out] in memory, so the matmul reads it untransposed. Before the weights are loaded.

    cuBLAS picks other kernels for that layout. On an H100 (zllm.bench.linear_shapes, 2026-12-05)
    the Llama-3.1-8B shape's matmuls took 9% less time at one row (the batch-1 decode: 5.5
    against 6.1 ms per step over the 32 layers and the head) and 2.5% less at 8192 rows, and
    were within 1% at 256 rows; the Llama-3.2-1B shape's (2048 wide) took 3% less at one row
    and 1-4% more at 256 and 8192. build_model applies it on CUDA, where it was measured."""
    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)) or (
                isinstance(module, ParallelLMHead) and not module.tied):
            rows, cols = module.weight.shape
            module.weight = nn.Parameter(module.weight.new_empty(cols, rows).t(),
                                         requires_grad=False)
