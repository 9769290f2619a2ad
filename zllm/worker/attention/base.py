"""The attention backend interface: plan once per step, then run once per layer.

A backend receives the step's layout (`AttentionBatch`) in `plan`, prepares whatever its kernels
need, and in `forward` writes the new K/V into one layer's paged cache and attends over it. The
KV cache of a layer is one tensor [num_blocks, 2, block_size, num_kv_heads, head_dim] (K at index
0, V at 1): flashinfer's NHD paged layout, which the torch backend shares.

Layers may differ in their sliding window (Gemma alternates sliding and full layers; Qwen makes
the upper layers sliding): the backend is told the distinct windows when it is built, plans each
once per step, and a layer names its window in `forward`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch


@dataclass
class AttentionBatch:
    """Where each request's tokens are, in the flattened step: numpy arrays on the host, so
    planning needs no device sync and each backend copies to the device only what its kernels
    read, built with vectorized numpy (no loop over requests).

    Request i owns query tokens query_start_loc[i]:query_start_loc[i+1]; after this step its
    cache holds seq_lens[i] tokens, in blocks block_table[table_rows[i], :num_blocks[i]]. Token t
    is written to cache slot slot_mapping[t] (block id * block_size + offset). `block_table` is
    the worker's persistent table, shared and read only: rows are named, not copied.
    """

    query_start_loc: np.ndarray  # [R + 1] int32
    seq_lens: np.ndarray  # [R] int32
    num_blocks: np.ndarray  # [R] int32: ceil(seq_lens / block_size)
    block_table: np.ndarray  # [rows, max_blocks_per_req] int32, C-contiguous
    table_rows: np.ndarray  # [R] int64
    slot_mapping: np.ndarray  # [T] int64
    max_query_len: int
    # A pure-decode step padded to a captured batch size, about to replay its CUDA graph.
    cuda_graph: bool = False

    @classmethod
    def from_lists(cls, query_lens, seq_lens, block_table: np.ndarray, slot_mapping: np.ndarray,
                   block_size: int, cuda_graph: bool = False) -> "AttentionBatch":
        """A batch from per-request lengths and its own [R, blocks] table (tests, profiling)."""
        query_lens = np.asarray(query_lens, dtype=np.int32)
        seq_lens = np.asarray(seq_lens, dtype=np.int32)
        starts = np.zeros(len(query_lens) + 1, dtype=np.int32)
        np.cumsum(query_lens, out=starts[1:])
        return cls(starts, seq_lens, (seq_lens + block_size - 1) // block_size,
                   np.ascontiguousarray(block_table, dtype=np.int32),
                   np.arange(len(query_lens), dtype=np.int64),
                   np.asarray(slot_mapping, dtype=np.int64), int(query_lens.max()), cuda_graph)

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens)

    @property
    def num_tokens(self) -> int:
        return len(self.slot_mapping)

    @property
    def query_lens(self) -> np.ndarray:
        return np.diff(self.query_start_loc)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1

    def page_indptr(self) -> np.ndarray:
        """[R + 1] int32: request i's pages are page_indices()[indptr[i]:indptr[i + 1]]."""
        indptr = np.zeros(self.num_reqs + 1, dtype=np.int32)
        np.cumsum(self.num_blocks, out=indptr[1:])
        return indptr

    def page_indices(self, indptr: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Each request's live blocks, concatenated in batch order, by one gather from the flat
        table: request i's j-th block is entry table_rows[i] * width + j, that is a per-request
        base repeated, plus a running count."""
        base = self.table_rows * self.block_table.shape[1] - indptr[:-1]
        flat = np.repeat(base, self.num_blocks)
        flat += np.arange(len(flat))
        return np.take(self.block_table.reshape(-1), flat, out=out)


@dataclass(frozen=True)
class AttentionSpec:
    """What one rank's attention layers compute; the model describes it, the backend is built
    for it."""

    num_heads: int  # on this rank
    num_kv_heads: int
    head_dim: int
    scale: float  # softmax scale of the scores q.k
    logits_soft_cap: Optional[float] = None  # scores become cap * tanh(score / cap) (Gemma 2)
    # The distinct windows of the layers; a query at position p sees keys p - W + 1 .. p for a
    # window W, every earlier key for None.
    sliding_windows: tuple[Optional[int], ...] = (None,)


class AttentionBackend(ABC):
    supports_cuda_graphs = False  # can plan a decode step into fixed buffers for graph replay

    def __init__(self, spec: AttentionSpec, block_size: int) -> None:
        self.spec = spec
        self.num_heads = spec.num_heads
        self.num_kv_heads = spec.num_kv_heads
        self.head_dim = spec.head_dim
        self.block_size = block_size
        self.scale = spec.scale

    @abstractmethod
    def plan(self, batch: AttentionBatch) -> None:
        """Prepare the step; called once before the first layer."""

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                window: Optional[int] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """q [T, H, D], k and v [T, KVH, D]; store k/v in kv_cache, return [T, H, D] (written
        into `out` if given). `window` is the layer's sliding window, one of
        spec.sliding_windows."""

    def forward_rotated(self, rope, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                        v: torch.Tensor, kv_cache: torch.Tensor, window: Optional[int] = None,
                        out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`forward` of q and k rotated by `rope` (a RotaryEmbedding) at `positions`. A backend
        whose K/V store can rotate on the way overrides this to do both in one kernel."""
        q, k = rope(positions, q, k)
        return self.forward(q, k, v, kv_cache, window, out)


def make_attention_backend(name: str, device: torch.device, dtype: torch.dtype,
                           max_num_tokens: int, spec: AttentionSpec, block_size: int,
                           staging=None, xqa_max_batch: int = 0,
                           triton_min_programs: int = 0,
                           triton_split_max_batch: int = 0) -> AttentionBackend:
    """`staging` (a PinnedStaging) carries the backend's host-to-device copies, if it has any;
    `xqa_max_batch`: flashinfer's decode steps of up to this many requests run XQA
    (DeviceConfig.xqa_decode_max_batch); `triton_min_programs`: its decode steps of at least
    this many requests times KV heads run zllm's Triton kernel
    (DeviceConfig.triton_decode_min_programs), and so do those of at most
    `triton_split_max_batch` requests, each sequence split (DeviceConfig.triton_decode_split_max_batch)."""
    if name == "auto":
        name = "flashinfer" if device.type == "cuda" else "torch"
    if name == "flashinfer":
        from zllm.worker.attention.flashinfer_backend import FlashInferBackend

        return FlashInferBackend(device, dtype, spec, block_size, max_num_tokens, staging,
                                 xqa_max_batch, triton_min_programs, triton_split_max_batch)
    from zllm.worker.attention.torch_backend import TorchPagedBackend

    return TorchPagedBackend(device, spec, block_size)
