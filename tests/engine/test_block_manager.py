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


def test_blocks_filled_by_generated_tokens_are_found_by_a_prompt_holding_the_same_tokens():
    """A block that spans the prompt's end and the first outputs, and one of outputs only, are
    named by their tokens alone: a later prompt made of the same tokens finds both."""
    bm = BlockManager(num_blocks=16, block_size=BLOCK, watermark=0.0)
    first = _request("first", 100, num_tokens=BLOCK + 2)  # one full block and two tokens
    _run_prompt(bm, first)
    outputs = [7, 8, 9, 10, 11, 12]  # fill the second block and a third
    for token in outputs:
        assert bm.allocate_slots(first, 1) is not None
        first.num_computed_tokens += 1
        first.num_pending_tokens += 1
        first.append_output_token(token, max_model_len=1000)
    assert first.token_ids_between(BLOCK, 2 * BLOCK) == (100 + BLOCK, 101 + BLOCK, 7, 8)
    assert first.token_ids_between(2 * BLOCK, 3 * BLOCK) == (9, 10, 11, 12)
    bm.cache_full_blocks(first)
    same = Request("same", first.prompt_token_ids + outputs + [1], SamplingParams(max_tokens=4),
                   [], 0.0)
    assert bm.find_cached_prefix(same) == bm.block_table("first")[:3]
    other = Request("other", first.prompt_token_ids + [7, 8, 0, 10, 11, 12, 1],
                    SamplingParams(max_tokens=4), [], 0.0)
    assert bm.find_cached_prefix(other) == bm.block_table("first")[:2]
