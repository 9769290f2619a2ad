"""Paged attention with flashinfer kernels: the CUDA path.

One step is planned once (`plan`) and its plan is shared by every layer. A step with any query
longer than one token (prefill chunks, possibly mixed with decodes) runs the batch-prefill kernel,
causal and bottom-right aligned, so a chunk sees the cached prefix and itself; a step of pure
decodes runs the batch-decode kernel, which is faster for one query row per request.

The page table flashinfer wants (indptr / indices / last_page_len) is derived from host lists, so
planning needs no device sync: indptr and last_page_len are built on the host (flashinfer reads
them there to choose its split-k schedule), and indices are gathered on the device from the
step's block table with one small host-built index. flashinfer is imported here only, so CPU
installs never need it.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from zllm.worker.attention.base import AttentionBackend, AttentionBatch

WORKSPACE_BYTES = 256 * 2**20


class FlashInferBackend(AttentionBackend):
    def __init__(self, device: torch.device, num_heads: int, num_kv_heads: int, head_dim: int,
                 block_size: int) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim, block_size)
        import flashinfer

        self.device = device
        # One float workspace for split-k partial results, shared by both wrappers: a step uses
        # only one of them.
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")
        # Tensor-core decode pays off for wide GQA groups (vLLM uses the same cut-off).
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_tensor_cores=num_heads // num_kv_heads > 4)
        self._pending: Optional[tuple] = None  # the step's page table, planned on first forward
        self._wrapper = None

    def plan(self, batch: AttentionBatch) -> None:
        bs = self.block_size
        num_blocks = np.asarray(batch.num_blocks_cpu, dtype=np.int64)
        seq_lens = np.asarray(batch.seq_lens_cpu, dtype=np.int64)
        kv_indptr = np.zeros(len(num_blocks) + 1, dtype=np.int32)
        np.cumsum(num_blocks, out=kv_indptr[1:])
        # Flat positions of each request's live blocks in the [R, max_blocks] block table.
        rows = np.repeat(np.arange(len(num_blocks)), num_blocks)
        cols = np.arange(kv_indptr[-1]) - np.repeat(kv_indptr[:-1], num_blocks)
        flat = torch.from_numpy(rows * batch.block_table.shape[1] + cols)
        indices = batch.block_table.reshape(-1)[flat.to(self.device, non_blocking=True)]
        last_page_len = torch.from_numpy(((seq_lens - 1) % bs + 1).astype(np.int32))
        qo_indptr = None
        if not batch.is_decode_only:
            qo_indptr = torch.zeros(len(num_blocks) + 1, dtype=torch.int32)
            torch.cumsum(torch.tensor(batch.query_lens_cpu, dtype=torch.int32), 0, out=qo_indptr[1:])
        self._pending = (qo_indptr, torch.from_numpy(kv_indptr), indices, last_page_len)
        # K/V store: the cache slot of every new token, split into (block, offset).
        self.slot_block = batch.slot_mapping // bs
        self.slot_offset = batch.slot_mapping % bs

    def _plan_kernels(self, dtype: torch.dtype) -> None:
        """flashinfer's own planning, once per step (it needs the activations' dtype)."""
        qo_indptr, kv_indptr, indices, last_page_len = self._pending
        common = dict(num_qo_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                      page_size=self.block_size, sm_scale=self.scale, q_data_type=dtype,
                      kv_data_type=dtype)
        if qo_indptr is None:
            self.decode.plan(kv_indptr, indices, last_page_len, head_dim=self.head_dim, **common)
            self._wrapper = self.decode
        else:
            self.prefill.plan(qo_indptr, kv_indptr, indices, last_page_len,
                              head_dim_qk=self.head_dim, causal=True, **common)
            self._wrapper = self.prefill
        self._pending = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor) -> torch.Tensor:
        if self._pending is not None:
            self._plan_kernels(q.dtype)
        kv_cache[self.slot_block, 0, self.slot_offset] = k
        kv_cache[self.slot_block, 1, self.slot_offset] = v
        return self._wrapper.run(q.contiguous(), kv_cache)
