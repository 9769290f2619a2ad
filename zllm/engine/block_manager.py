"""Paged KV cache bookkeeping on the driver: which blocks are free, which belong to whom, and
which full blocks hold a known prefix (automatic prefix caching).

The workers hold the KV tensors; this class only hands out block ids. A full block is named by a
chained hash of its token ids and the hash of the block before it, so equal hashes mean equal
prefixes. A new request starts from the longest run of its prompt's blocks already cached
(reference counts let several requests share them; only full blocks are shared, so nobody writes
into a shared block). A freed block keeps its contents and its hash: it stays findable until the
allocator needs it, and free blocks are reused least recently freed first.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

from zllm.engine.request import Request


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, watermark: float = 0.01,
                 enable_prefix_caching: bool = True, num_cpu_blocks: int = 0) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # Admitting a new request must leave this many blocks free, so running requests can grow
        # for a while without preempting the newcomer at once.
        self.watermark_blocks = int(watermark * num_blocks)
        # Free blocks in eviction order (least recently freed first); an ordered dict so that a
        # cached free block can be taken back out of the middle when a new request reuses it.
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[Optional[int]] = [None] * num_blocks
        self.prefix_cache: dict[int, int] = {}  # block hash -> block id
        self.block_tables: dict[str, list[int]] = {}
        # CPU blocks for swapped-out requests: a plain free list, no sharing.
        self.free_cpu_blocks: list[int] = list(range(num_cpu_blocks))
        self.cpu_block_tables: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    # -- prefix cache ----------------------------------------------------------------------------

    def _hashes(self, req: Request, num_full_blocks: int) -> list[int]:
        """Chained hashes of req's first `num_full_blocks` blocks (memoised on the request)."""
        hashes, bs = req.block_hashes, self.block_size
        if len(hashes) >= num_full_blocks:
            return hashes[:num_full_blocks]
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(hash((parent, req.token_ids_between(i * bs, (i + 1) * bs))))
        return hashes

    def find_cached_prefix(self, req: Request) -> list[int]:
        """Cached blocks holding req's longest known prefix. At least one token is left to
        compute, so the step that admits the request produces its logits. None for a request
        that wants its prompt's log-probabilities: cached positions would have no logits."""
        if not self.enable_prefix_caching or req.sampling_params.prompt_logprobs is not None:
            return []
        blocks = []
        for h in self._hashes(req, (req.num_tokens - 1) // self.block_size):
            block_id = self.prefix_cache.get(h)
            if block_id is None:
                break
            blocks.append(block_id)
        return blocks

    def cache_full_blocks(self, req: Request) -> None:
        """Name the blocks that req's computed tokens have filled, so later requests find them."""
        # Only tokens the engine knows can be hashed (a pending token's K/V may be computed).
        known = min(req.num_computed_tokens, req.num_tokens)
        if not self.enable_prefix_caching or known // self.block_size <= req.num_cached_blocks:
            return  # (most decode steps fill no new block)
        table = self.block_tables.get(req.req_id, [])
        num_full = min(known // self.block_size, len(table))
        if num_full <= req.num_cached_blocks:
            return
        hashes = self._hashes(req, num_full)
        for i in range(req.num_cached_blocks, num_full):
            block_id, h = table[i], hashes[i]
            if self.block_hash[block_id] is None and h not in self.prefix_cache:
                self.block_hash[block_id] = h
                self.prefix_cache[h] = block_id
        req.num_cached_blocks = num_full

    # -- allocation ------------------------------------------------------------------------------

    def num_blocks_needed(self, req: Request, num_new_tokens: int) -> int:
        total = -(-(req.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(0, total - len(self.block_tables.get(req.req_id, ())))

    def can_admit(self, req: Request, cached_blocks: list[int], num_new_tokens: int) -> bool:
        """Room for a waiting request that starts from `cached_blocks`, keeping the watermark."""
        reused_free = sum(1 for b in cached_blocks if self.ref_counts[b] == 0)
        total = -(-(len(cached_blocks) * self.block_size + num_new_tokens) // self.block_size)
        needed = total - len(cached_blocks) + reused_free
        return self.num_free_blocks - needed >= self.watermark_blocks

    def admit(self, req: Request, cached_blocks: list[int]) -> None:
        """Start req's block table with the cached prefix blocks (taking them off the free list)."""
        for block_id in cached_blocks:
            if self.ref_counts[block_id] == 0:
                del self.free_blocks[block_id]
            self.ref_counts[block_id] += 1
        self.block_tables[req.req_id] = list(cached_blocks)
        req.start_from_cache(len(cached_blocks), self.block_size)

    def allocate_slots(self, req: Request, num_new_tokens: int) -> Optional[list[int]]:
        """Extend req's block table to hold `num_new_tokens` more tokens.

        Returns the new block ids (possibly none), or None if there are not enough free blocks.
        """
        needed = self.num_blocks_needed(req, num_new_tokens)
        if needed == 0:  # most decode steps: the last block has room
            return []
        if needed > self.num_free_blocks:
            return None
        new_blocks = [self._take_free_block() for _ in range(needed)]
        self.block_tables.setdefault(req.req_id, []).extend(new_blocks)
        return new_blocks

    def _take_free_block(self) -> int:
        block_id, _ = self.free_blocks.popitem(last=False)
        h = self.block_hash[block_id]
        if h is not None:  # evict: its contents are about to be overwritten
            del self.prefix_cache[h]
            self.block_hash[block_id] = None
        self.ref_counts[block_id] = 1
        return block_id

    def free(self, req: Request) -> None:
        # Tail blocks first: they are the least likely to be shared, so they are evicted first.
        for block_id in reversed(self.block_tables.pop(req.req_id, [])):
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.free_blocks[block_id] = None

    # -- swapping ----------------------------------------------------------------------------------

    def can_swap_out(self, req: Request) -> bool:
        return len(self.block_tables.get(req.req_id, ())) <= len(self.free_cpu_blocks)

    def swap_out(self, req: Request) -> list[int]:
        """Move req's blocks to CPU blocks; returns the copies for the workers as flat (device,
        CPU) pairs. The device blocks are freed now: the workers copy before the step's forward
        writes."""
        table = self.block_tables[req.req_id]
        cpu = [self.free_cpu_blocks.pop() for _ in table]
        self.cpu_block_tables[req.req_id] = cpu
        pairs = [b for pair in zip(table, cpu) for b in pair]
        self.free(req)
        return pairs

    def can_swap_in(self, req: Request, num_new_tokens: int) -> bool:
        """Room for req's swapped blocks plus `num_new_tokens` more, keeping the watermark."""
        needed = self.num_blocks_needed(req, num_new_tokens)  # it holds no device blocks now
        return self.num_free_blocks - needed >= self.watermark_blocks

    def swap_in(self, req: Request) -> list[int]:
        """Give req fresh device blocks for its CPU blocks; returns the copies as flat (CPU,
        device) pairs."""
        cpu = self.cpu_block_tables.pop(req.req_id)
        device = [self._take_free_block() for _ in cpu]
        self.block_tables[req.req_id] = device
        req.num_cached_blocks = 0  # the new blocks join the prefix cache at the next step
        self.free_cpu_blocks.extend(cpu)
        return [b for pair in zip(cpu, device) for b in pair]

    def free_swapped(self, req: Request) -> None:
        self.free_cpu_blocks.extend(self.cpu_block_tables.pop(req.req_id, []))

    def block_table(self, req_id: str) -> list[int]:
        return self.block_tables.get(req_id, [])
