"""The prefix cache's eviction order: freed blocks stay findable, and the allocator overwrites the
least recently freed first, a request's tail blocks before its head (README: prefix caching)."""

from __future__ import annotations

from zllm import SamplingParams
from zllm.engine.block_manager import BlockManager
from zllm.engine.request import Request

BLOCK = 4


def _request(name: str, first_token: int, num_tokens: int = 2 * BLOCK + 1) -> Request:
    """Two full blocks and one partial, each request's tokens its own (no sharing)."""
    tokens = [first_token + i for i in range(num_tokens)]
    return Request(name, tokens, SamplingParams(max_tokens=4), [], 0.0)


def _run_prompt(bm: BlockManager, req: Request) -> list[int]:
    """Admit req from the cache, compute its prompt, name its full blocks; its block table."""
    bm.admit(req, bm.find_cached_prefix(req))
    assert bm.allocate_slots(req, req.num_tokens - req.num_computed_tokens) is not None
    req.num_computed_tokens = req.num_tokens
    bm.cache_full_blocks(req)
    return bm.block_table(req.req_id)


def test_freed_blocks_are_evicted_least_recently_freed_first_tail_first():
    bm = BlockManager(num_blocks=8, block_size=BLOCK, watermark=0.0)
    a, b = _request("a", 100), _request("b", 200)
    a_blocks, b_blocks = _run_prompt(bm, a), _run_prompt(bm, b)
    bm.free(a)
    bm.free(b)
    # Run a again: it finds its two full blocks; freeing it makes them the most recently freed.
    again = _request("a2", 100)
    assert bm.find_cached_prefix(again) == a_blocks[:2]
    assert _run_prompt(bm, again)[:2] == a_blocks[:2]
    bm.free(again)
    # First a never-used block and a's first tail, then b's (freed before a's second run):
    # tail, middle, head.
    c = _request("c", 300, num_tokens=5 * BLOCK)
    taken = _run_prompt(bm, c)
    assert taken[2:5] == [b_blocks[2], b_blocks[1], b_blocks[0]]
    assert bm.find_cached_prefix(_request("b2", 200)) == []  # b is gone
    assert bm.find_cached_prefix(_request("a3", 100)) == a_blocks[:2]  # a is still cached
    bm.free(c)
    d = _request("d", 400, num_tokens=BLOCK + 1)  # two blocks
    _run_prompt(bm, d)
    # Next in line were the blocks of a's second run, tail first: only its head survives.
    assert bm.find_cached_prefix(_request("a4", 100)) == a_blocks[:1]
