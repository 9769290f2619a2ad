"""Paged attention in plain PyTorch: the reference, and the CPU path.

Each step, `plan` builds padded index tensors once: for every request, the cache slots of its
whole sequence, and a mask that is causal over the new tokens. `forward` then gathers K/V from the
paged cache and runs scaled_dot_product_attention on the padded batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zllm.worker.attention.base import AttentionBackend, AttentionBatch


class TorchPagedBackend(AttentionBackend):
    def plan(self, batch: AttentionBatch) -> None:
        device = batch.slot_mapping.device
        num_reqs = len(batch.seq_lens_cpu)
        max_q, max_s = max(batch.query_lens_cpu), max(batch.seq_lens_cpu)
        q_lens, seq_lens = batch.seq_lens.new_tensor(batch.query_lens_cpu), batch.seq_lens

        # Padded query rows; the flat tokens are request-major, so a boolean mask over the padded
        # [R, max_q] grid scatters and gathers them in order.
        j = torch.arange(max_q, device=device)
        self.q_valid = j[None, :] < q_lens[:, None]  # [R, max_q]

        # Cache slots of each request's sequence, position by position.
        pos = torch.arange(max_s, device=device)
        block = batch.block_table[:, (pos // self.block_size).clamp(max=batch.block_table.shape[1] - 1)]
        self.kv_block = block.long()  # [R, max_s]
        self.kv_offset = (pos % self.block_size).expand(num_reqs, -1)

        # Query j of request i sits at position seq_len - q_len + j and sees positions up to it.
        q_pos = (seq_lens - q_lens)[:, None] + j[None, :]  # [R, max_q]
        mask = pos[None, None, :] <= q_pos[:, :, None]  # [R, max_q, max_s]
        mask[:, :, 0] = True  # padded query rows see one key instead of none (no NaN)
        self.mask = mask[:, None]  # broadcast over heads
        self.num_reqs, self.max_q = num_reqs, max_q
        self.slot_block = batch.slot_mapping // self.block_size
        self.slot_offset = batch.slot_mapping % self.block_size

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor) -> torch.Tensor:
        kv_cache[self.slot_block, 0, self.slot_offset] = k
        kv_cache[self.slot_block, 1, self.slot_offset] = v
        keys = kv_cache[self.kv_block, 0, self.kv_offset]  # [R, max_s, KVH, D]
        values = kv_cache[self.kv_block, 1, self.kv_offset]
        queries = q.new_zeros(self.num_reqs, self.max_q, self.num_heads, self.head_dim)
        queries[self.q_valid] = q
        out = F.scaled_dot_product_attention(
            queries.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
            attn_mask=self.mask, scale=self.scale, enable_gqa=self.num_heads != self.num_kv_heads)
        return out.transpose(1, 2)[self.q_valid]  # [T, H, D]
