"""Paged attention with flashinfer kernels: the CUDA path.

One step is planned once (`plan`) and its plan is shared by every layer. A step with any query
longer than one token (prefill chunks, possibly mixed with decodes) runs the batch-prefill kernel,
causal and bottom-right aligned, so a chunk sees the cached prefix and itself; a step of pure
decodes runs the batch-decode kernel, which is faster for one query row per request.

The page table flashinfer wants (indptr / indices / last_page_len) and the K/V store's rows are
built on the host from the step's host arrays (flashinfer reads indptr there to choose its
split-k schedule) and copied from pinned memory (zllm/worker/staging.py), so planning step N+1
never waits for step N to finish on the GPU.

CUDA graphs: a captured decode step replays fixed kernels on fixed buffers, so for each captured
batch size there is a decode wrapper in flashinfer's CUDA-graph mode, whose page table lives in
buffers that `plan` refills each step, and the K/V store reads its destination rows from a static
buffer too. flashinfer is imported here only, so CPU installs never need it.

Sliding windows: flashinfer takes a window in `plan` (window_left, the number of keys a query
sees before its own position: Hugging Face's window W is window_left = W - 1) and binds the
kernel to it, so each distinct window of the model's layers has its own wrappers, planned
together, each with its own plan data (int workspace); they share the float workspace, which
only the running kernel uses.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from zllm.worker.attention.base import AttentionBackend, AttentionBatch, AttentionSpec
from zllm.worker.staging import PinnedStaging

FLOAT_WORKSPACE_BYTES = 256 * 2**20
INT_WORKSPACE_BYTES = 8 * 2**20  # flashinfer's own default for its plan data


class FlashInferBackend(AttentionBackend):
    supports_cuda_graphs = True

    def __init__(self, device: torch.device, dtype: torch.dtype, spec: AttentionSpec,
                 block_size: int, max_num_tokens: int, staging: PinnedStaging | None = None) -> None:
        super().__init__(spec, block_size)
        import flashinfer

        self.device, self.dtype = device, dtype
        self.staging = staging or PinnedStaging(device)
        self.windows = spec.sliding_windows
        self.workspace = torch.zeros(FLOAT_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        # Per window: a step plans all windows, but uses exactly one of prefill / decode / graph.
        self.int_workspaces = {w: torch.zeros(INT_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
                               for w in self.windows}
        self.prefill = {w: self._share(flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            self.workspace, "NHD"), w) for w in self.windows}
        self.decode = {w: self._share(flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_tensor_cores=self._decode_tensor_cores()), w)
            for w in self.windows}
        self.graph_decode: dict[int, dict] = {}  # batch size -> window -> CUDA-graph decode wrapper
        # Rows of each new token's K and V in the cache viewed as [blocks * 2 * block_size, KVH, D].
        self.kv_rows = torch.zeros(2, max_num_tokens, dtype=torch.long, device=device)
        self._wrappers: dict = {}  # window -> the wrapper planned for this step

    def _decode_tensor_cores(self) -> bool:
        # Tensor-core decode pays off for wide GQA groups (vLLM uses the same cut-off).
        return self.num_heads // self.num_kv_heads > 4

    def _share(self, wrapper, window: Optional[int]):
        wrapper.reset_workspace_buffer(self.workspace, self.int_workspaces[window])
        return wrapper

    def enable_cuda_graphs(self, batch_sizes: list[int], max_pages: int) -> None:
        """Make a CUDA-graph decode wrapper for each batch size and window; their page-table
        buffers are views of one set (a step plans only the wrappers it replays)."""
        import flashinfer

        largest = max(batch_sizes)
        indptr = torch.zeros(largest + 1, dtype=torch.int32, device=self.device)
        indices = torch.zeros(max_pages, dtype=torch.int32, device=self.device)
        last_page_len = torch.zeros(largest, dtype=torch.int32, device=self.device)
        for bs in batch_sizes:
            self.graph_decode[bs] = {w: self._share(flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace, "NHD", use_cuda_graph=True,
                use_tensor_cores=self._decode_tensor_cores(),
                paged_kv_indptr_buffer=indptr[:bs + 1], paged_kv_indices_buffer=indices,
                paged_kv_last_page_len_buffer=last_page_len[:bs]), w) for w in self.windows}

    def plan(self, batch: AttentionBatch) -> None:
        bs, st = self.block_size, self.staging
        num_blocks = np.asarray(batch.num_blocks, dtype=np.int64)
        seq_lens = np.asarray(batch.seq_lens, dtype=np.int32)
        kv_indptr = np.zeros(len(num_blocks) + 1, dtype=np.int32)
        np.cumsum(num_blocks, out=kv_indptr[1:])
        # Each request's live blocks, from its row of the [R, max_blocks] block table.
        rows = np.repeat(np.arange(len(num_blocks)), num_blocks)
        cols = np.arange(kv_indptr[-1]) - np.repeat(kv_indptr[:-1], num_blocks)
        indices = st.to_device(batch.block_table[rows, cols])
        last_page_len = st.host((seq_lens - 1) % bs + 1)
        kv_indptr = st.host(kv_indptr)
        common = dict(num_qo_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                      page_size=bs, sm_scale=self.scale, q_data_type=self.dtype,
                      kv_data_type=self.dtype, logits_soft_cap=self.spec.logits_soft_cap)
        if batch.is_decode_only:
            self._wrappers = self.graph_decode[len(num_blocks)] if batch.cuda_graph else self.decode
            for w, wrapper in self._wrappers.items():
                wrapper.plan(kv_indptr, indices, last_page_len, head_dim=self.head_dim,
                             window_left=_window_left(w), **common)
        else:
            qo_indptr, seq_lens = st.host(batch.query_start_loc.astype(np.int32)), st.host(seq_lens)
            self._wrappers = self.prefill
            for w, wrapper in self._wrappers.items():
                wrapper.plan(qo_indptr, kv_indptr, indices, last_page_len, head_dim_qk=self.head_dim,
                             causal=True, seq_lens=seq_lens, window_left=_window_left(w), **common)
        # K/V store: slot s = block * bs + offset is row block * 2 * bs + offset for K, + bs for V.
        slots = batch.slot_mapping
        k_rows = slots + slots // bs * bs
        self.kv_rows[:, :len(slots)].copy_(st.host(np.stack([k_rows, k_rows + bs])), non_blocking=True)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                window: Optional[int] = None) -> torch.Tensor:
        num_tokens = q.shape[0]
        rows = kv_cache.view(-1, self.num_kv_heads, self.head_dim)
        rows[self.kv_rows[0, :num_tokens]] = k
        rows[self.kv_rows[1, :num_tokens]] = v
        return self._wrappers[window].run(q.contiguous(), kv_cache)


def _window_left(window: Optional[int]) -> int:
    """flashinfer's window_left (keys visible before the query's own; -1: all) for a window of
    W keys ending at the query's position."""
    return -1 if window is None else window - 1
