"""Paged KV cache bookkeeping on the driver: which blocks are free, which belong to whom.

The workers hold the KV tensors; this class only hands out block ids. Blocks carry reference
counts so that several requests can share one (prefix caching) without changing this interface.
"""

from __future__ import annotations

from collections import deque

from zllm.engine.request import Request


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, watermark: float = 0.01) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Admitting a new request must leave this many blocks free, so running requests can grow
        # for a while without preempting the newcomer at once.
        self.watermark_blocks = int(watermark * num_blocks)
        self.free_block_ids: deque[int] = deque(range(num_blocks))
        self.ref_counts = [0] * num_blocks
        self.block_tables: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def num_blocks_needed(self, req: Request, num_new_tokens: int) -> int:
        total = -(-(req.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(0, total - len(self.block_tables.get(req.req_id, ())))

    def can_allocate(self, req: Request, num_new_tokens: int) -> bool:
        """Room for a request that is not running yet, keeping the watermark free."""
        needed = self.num_blocks_needed(req, num_new_tokens)
        return self.num_free_blocks - needed >= self.watermark_blocks

    def allocate_slots(self, req: Request, num_new_tokens: int) -> list[int] | None:
        """Extend `req`'s block table to hold `num_new_tokens` more tokens.

        Returns the new block ids (possibly none), or None if there are not enough free blocks.
        """
        needed = self.num_blocks_needed(req, num_new_tokens)
        if needed > self.num_free_blocks:
            return None
        new_blocks = [self.free_block_ids.popleft() for _ in range(needed)]
        for block_id in new_blocks:
            self.ref_counts[block_id] = 1
        self.block_tables.setdefault(req.req_id, []).extend(new_blocks)
        return new_blocks

    def free(self, req: Request) -> None:
        for block_id in reversed(self.block_tables.pop(req.req_id, [])):
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.free_block_ids.append(block_id)

    def block_table(self, req_id: str) -> list[int]:
        return self.block_tables.get(req_id, [])
