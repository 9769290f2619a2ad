"""Paged attention in plain PyTorch: the reference, and the CPU path.

Each step, `plan` builds padded index arrays once, with vectorized numpy on the host, in two
groups: decodes (one new token each) and prefills (several). Padding within a group stays small:
a step that mixes a long prompt chunk with many decodes does not pad every decode to the chunk's
length. For each request the plan holds the blocks of its whole sequence and, per sliding window
of the model's layers, a mask that is causal over its new tokens and hides keys outside the
window. `forward` stores the step's K/V with one indexed write, gathers each group's blocks, and
runs scaled_dot_product_attention (or the same arithmetic written out, when scores are
soft-capped, which SDPA cannot do).

For the store, the cache of a layer, [blocks, 2, block_size, KVH, D], is addressed as rows of
[KVH, D]: the K of slot (block, offset) is row block * 2 * block_size + offset and its V is
block_size rows later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from zllm.worker.attention.base import AttentionBackend, AttentionBatch, AttentionSpec


@dataclass
class _PaddedGroup:
    # [tokens in the group]: rows of the flat step; None: one query per request, rows 0..R-1
    token_index: Optional[torch.Tensor]
    q_valid: Optional[torch.Tensor]  # [R, max_q] bool: real (not padding) query slots
    pages: torch.Tensor  # [R, P]: the cache blocks of each request's sequence, in order
    masks: dict[Optional[int], torch.Tensor]  # window -> [R, 1, max_q, P * block_size] bool


def kv_pair(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """k and v [T, KVH, D] as one [T, 2, KVH, D] tensor, for a single store. When v directly
    follows k in every row (views of a fused qkv projection's output), that is a view; otherwise
    a stacked copy."""
    num_tokens, heads, dim = k.shape
    if (k.stride() == v.stride() and k.stride(1) == dim and k.stride(2) == 1
            and v.data_ptr() - k.data_ptr() == heads * dim * k.element_size()):
        return k.as_strided((num_tokens, 2, heads, dim), (k.stride(0), heads * dim, dim, 1))
    return torch.stack((k, v), dim=1)


class TorchPagedBackend(AttentionBackend):
    def __init__(self, device: torch.device, spec: AttentionSpec, block_size: int) -> None:
        super().__init__(spec, block_size)
        self.device = device
        self._kv_offsets = np.array([0, block_size])
        # Key positions 0..S-1, grown as sequences grow. int32 like seq_lens: numpy compares
        # two int32 arrays about 2.5x faster than int32 against int64.
        self._positions = np.arange(0, dtype=np.int32)

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device, non_blocking=True)

    def plan(self, batch: AttentionBatch) -> None:
        self.groups = []
        if batch.is_decode_only:
            self.groups.append(self._plan_decodes(batch))
        else:
            query_lens = batch.query_lens
            for rows in (np.flatnonzero(query_lens == 1), np.flatnonzero(query_lens > 1)):
                if len(rows):
                    self.groups.append(self._plan_group(batch, query_lens, rows))
        slots = batch.slot_mapping
        k_rows = slots + slots // self.block_size * self.block_size
        self.store_rows = self._tensor(k_rows[:, None] + self._kv_offsets)  # [T, 2]: K, V rows

    def _pages(self, batch: AttentionBatch, table_rows: np.ndarray, num_pages: int) -> torch.Tensor:
        """Each request's blocks, padded with its table's later (masked) entries."""
        return self._tensor(batch.block_table[table_rows, :num_pages].astype(np.int64))

    def _key_positions(self, num_keys: int) -> np.ndarray:
        if len(self._positions) < num_keys:
            self._positions = np.arange(2 * num_keys, dtype=np.int32)
        return self._positions[:num_keys]

    def _plan_decodes(self, batch: AttentionBatch) -> _PaddedGroup:
        """A step of one new token per request (the steady state): what _plan_group builds,
        without its padding. Request i's query is flat token i, at position seq_len - 1."""
        num_pages = int(batch.num_blocks.max())
        seq_lens = batch.seq_lens[:, None, None, None]  # [R, 1, 1, 1], int32
        pos = self._key_positions(num_pages * self.block_size)
        causal = pos < seq_lens  # [R, 1, 1, S]: the query is at position seq_len - 1
        masks = {w: self._tensor(causal if w is None else causal & (pos >= seq_lens - w))
                 for w in self.spec.sliding_windows}
        return _PaddedGroup(None, None, self._pages(batch, batch.table_rows, num_pages), masks)

    def _plan_group(self, batch: AttentionBatch, query_lens: np.ndarray,
                    rows: np.ndarray) -> _PaddedGroup:
        """Padded index arrays for the requests `rows`."""
        q_lens, seq_lens = query_lens[rows], batch.seq_lens[rows]
        max_q = int(q_lens.max())
        num_pages = int(batch.num_blocks[rows].max())
        # Request i's j-th new token is flat token query_start_loc[i] + j; it sits at position
        # seq_len - q_len + j and sees positions up to it, and with a window W only the W
        # positions ending there (Hugging Face's sliding window).
        j = np.arange(max_q)
        q_valid = j < q_lens[:, None]  # [R, max_q]
        token_index = (batch.query_start_loc[:-1][rows][:, None] + j)[q_valid]
        q_pos = ((seq_lens - q_lens)[:, None] + j)[:, :, None]  # [R, max_q, 1]
        pos = self._key_positions(num_pages * self.block_size)
        causal = pos <= q_pos  # [R, max_q, S]
        padding = ~q_valid[:, :, None] & (pos == 0)  # padded query rows see one key, not none (NaN)
        masks = {w: self._tensor(((causal if w is None else causal & (pos > q_pos - w))
                                  | padding)[:, None])
                 for w in self.spec.sliding_windows}
        return _PaddedGroup(self._tensor(token_index), self._tensor(q_valid),
                            self._pages(batch, batch.table_rows[rows], num_pages), masks)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                window: Optional[int] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        rows = kv_cache.view(-1, self.num_kv_heads, self.head_dim)
        rows[self.store_rows] = kv_pair(k, v)
        out = torch.empty_like(q) if out is None else out
        for g in self.groups:
            # [R, P, 2, bs, KVH, D] -> K and V as [R, 2, P * bs, KVH, D]: a gather and a copy.
            num_reqs, num_pages = g.pages.shape
            kv = kv_cache[g.pages].transpose(1, 2).reshape(
                num_reqs, 2, num_pages * self.block_size, self.num_kv_heads, self.head_dim)
            if g.token_index is None:  # decodes: request i's one query is row i
                queries = q[:num_reqs, None]
            else:
                queries = q.new_zeros(*g.q_valid.shape, self.num_heads, self.head_dim)
                queries[g.q_valid] = q[g.token_index]
            attn = self._attend(queries.transpose(1, 2), kv[:, 0].transpose(1, 2),
                                kv[:, 1].transpose(1, 2), g.masks[window])
            if g.token_index is None:
                out[:num_reqs] = attn[:, :, 0]
            else:
                out[g.token_index] = attn.transpose(1, 2)[g.q_valid]
        return out

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """q [R, H, Q, D], k and v [R, KVH, S, D], mask [R, 1, Q, S] -> [R, H, Q, D]."""
        cap = self.spec.logits_soft_cap
        if cap is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                                  enable_gqa=self.num_heads != self.num_kv_heads)
        group = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = torch.tanh(q @ k.transpose(-1, -2) * self.scale / cap) * cap
        weights = scores.masked_fill(~mask, float("-inf")).softmax(-1, dtype=torch.float32)
        return weights.to(q.dtype) @ v
