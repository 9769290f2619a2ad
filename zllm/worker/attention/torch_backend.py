"""Paged attention in plain PyTorch: the reference, and the CPU path.

Each step, `plan` builds padded index tensors once, in two groups: decodes (one new token each)
and prefills (several). Padding within a group stays small: a step that mixes a long prompt
chunk with many decodes does not pad every decode to the chunk's length. For each request the
plan holds the cache slots of its whole sequence and, per sliding window of the model's layers,
a mask that is causal over its new tokens and hides keys outside the window; `forward` gathers
K/V from the paged cache and runs scaled_dot_product_attention per group (or the same arithmetic
written out, when scores are soft-capped, which SDPA cannot do).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from zllm.worker.attention.base import AttentionBackend, AttentionBatch, AttentionSpec


@dataclass
class _PaddedGroup:
    token_index: torch.Tensor  # [tokens in the group]: rows of the flat step
    q_valid: torch.Tensor  # [R, max_q] bool: real (not padding) query slots
    kv_block: torch.Tensor  # [R, max_s]: cache block of each sequence position
    kv_offset: torch.Tensor  # [R, max_s]: offset in that block
    masks: dict[Optional[int], torch.Tensor]  # window -> [R, 1, max_q, max_s] bool


class TorchPagedBackend(AttentionBackend):
    def __init__(self, device: torch.device, spec: AttentionSpec, block_size: int) -> None:
        super().__init__(spec, block_size)
        self.device = device

    def plan(self, batch: AttentionBatch) -> None:
        decodes = [i for i, q in enumerate(batch.query_lens) if q == 1]
        prefills = [i for i, q in enumerate(batch.query_lens) if q > 1]
        starts = batch.query_start_loc
        self.groups = [self._plan_group(batch, starts, rows) for rows in (decodes, prefills) if rows]
        slots = torch.from_numpy(batch.slot_mapping).to(self.device)
        self.slot_block = slots // self.block_size
        self.slot_offset = slots % self.block_size

    def _plan_group(self, batch: AttentionBatch, starts, rows: list[int]) -> _PaddedGroup:
        device = self.device
        q_lens_cpu = [batch.query_lens[i] for i in rows]
        seq_lens_cpu = [batch.seq_lens[i] for i in rows]
        max_q, max_s = max(q_lens_cpu), max(seq_lens_cpu)
        q_lens = torch.tensor(q_lens_cpu, device=device)
        seq_lens = torch.tensor(seq_lens_cpu, device=device)

        # Request i's j-th new token is flat token query_start_loc[i] + j.
        j = torch.arange(max_q, device=device)
        q_valid = j[None, :] < q_lens[:, None]  # [R, max_q]
        token_index = (torch.from_numpy(starts[rows]).to(device)[:, None] + j[None, :])[q_valid]

        # Cache slots of each request's sequence, position by position.
        pos = torch.arange(max_s, device=device)
        table = torch.from_numpy(batch.block_table[rows]).to(device)
        kv_block = table[:, (pos // self.block_size).clamp(max=table.shape[1] - 1)].long()
        kv_offset = (pos % self.block_size).expand(len(rows), -1)

        # Query j of request i sits at position seq_len - q_len + j and sees positions up to it,
        # and with a window W only the W positions ending there (Hugging Face's sliding window).
        q_pos = (seq_lens - q_lens)[:, None, None] + j[None, :, None]  # [R, max_q, 1]
        causal = pos <= q_pos  # [R, max_q, max_s]
        padding = ~q_valid[:, :, None] & (pos == 0)  # padded query rows see one key, not none (NaN)
        masks = {w: ((causal if w is None else causal & (pos > q_pos - w)) | padding)[:, None]
                 for w in self.spec.sliding_windows}
        return _PaddedGroup(token_index, q_valid, kv_block, kv_offset, masks)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                window: Optional[int] = None) -> torch.Tensor:
        kv_cache[self.slot_block, 0, self.slot_offset] = k
        kv_cache[self.slot_block, 1, self.slot_offset] = v
        out = torch.empty_like(q)
        for g in self.groups:
            keys = kv_cache[g.kv_block, 0, g.kv_offset]  # [R, max_s, KVH, D]
            values = kv_cache[g.kv_block, 1, g.kv_offset]
            queries = q.new_zeros(*g.q_valid.shape, self.num_heads, self.head_dim)
            queries[g.q_valid] = q[g.token_index]
            attn = self._attend(queries.transpose(1, 2), keys.transpose(1, 2),
                                values.transpose(1, 2), g.masks[window])
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
