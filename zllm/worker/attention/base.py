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
    """Where each request's tokens are, in the flattened step. All on the host: planning needs no
    device sync, and each backend copies to the device only what its kernels read.

    Request i owns query tokens query_start_loc[i]:query_start_loc[i+1]; after this step its
    cache holds seq_lens[i] tokens, in blocks block_table[i, :num_blocks[i]]. Token t is written
    to cache slot slot_mapping[t] (block id * block_size + offset).
    """

    query_lens: list[int]
    seq_lens: list[int]
    num_blocks: list[int]
    block_table: np.ndarray  # [num_reqs, max_blocks] int32
    slot_mapping: np.ndarray  # [num_tokens] int64
    # A pure-decode step padded to a captured batch size, about to replay its CUDA graph.
    cuda_graph: bool = False

    @property
    def is_decode_only(self) -> bool:
        return all(q == 1 for q in self.query_lens)

    @property
    def query_start_loc(self) -> np.ndarray:
        out = np.zeros(len(self.query_lens) + 1, dtype=np.int64)
        np.cumsum(self.query_lens, out=out[1:])
        return out


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
                window: Optional[int] = None) -> torch.Tensor:
        """q [T, H, D], k and v [T, KVH, D]; store k/v in kv_cache, return [T, H, D]. `window` is
        the layer's sliding window, one of spec.sliding_windows."""


def make_attention_backend(name: str, device: torch.device, dtype: torch.dtype,
                           max_num_tokens: int, spec: AttentionSpec, block_size: int,
                           staging=None) -> AttentionBackend:
    """`staging` (a PinnedStaging) carries the backend's host-to-device copies, if it has any."""
    if name == "auto":
        name = "flashinfer" if device.type == "cuda" else "torch"
    if name == "flashinfer":
        from zllm.worker.attention.flashinfer_backend import FlashInferBackend

        return FlashInferBackend(device, dtype, spec, block_size, max_num_tokens, staging)
    from zllm.worker.attention.torch_backend import TorchPagedBackend

    return TorchPagedBackend(device, spec, block_size)
