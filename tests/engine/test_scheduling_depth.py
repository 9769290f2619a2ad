"""Chunked prefill, prefix caching, preemption and priorities keep greedy outputs exact."""

from __future__ import annotations

import random

import pytest

from zllm import LLM, SamplingParams
from zllm.config import SchedulerConfig
from zllm.engine.block_manager import BlockManager
from zllm.engine.request import Request
from zllm.engine.scheduler import Scheduler
from tests.conftest import PROMPTS

SHARED = ("You are a careful assistant. The quick brown fox jumps over the lazy dog. "
          "A paged KV cache stores keys and values in fixed-size blocks. ")
SHARED_PROMPTS = [SHARED + p for p in PROMPTS]
GREEDY = SamplingParams(temperature=0, max_tokens=16)


def _greedy_tokens(llm: LLM, prompts) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


@pytest.mark.parametrize("settings", [
    dict(enable_prefix_caching=False, enable_chunked_prefill=False),
    dict(enable_prefix_caching=True, enable_chunked_prefill=False),
    dict(enable_prefix_caching=True, max_num_batched_tokens=16),
    dict(enable_prefix_caching=True, long_prefill_token_threshold=5),
    dict(enable_prefix_caching=True, block_size=4, num_kv_blocks=24, watermark=0.0, max_model_len=96),
    dict(enable_prefix_caching=False, block_size=4, num_kv_blocks=24, watermark=0.0, max_model_len=96),
    dict(enable_prefix_caching=True, block_size=4, num_kv_blocks=24, watermark=0.0, max_model_len=96,
         preemption_mode="swap", swap_space_gib=0.001),
    dict(enable_prefix_caching=True, max_num_batched_tokens=16, async_scheduling=True),
    dict(enable_prefix_caching=True, block_size=4, num_kv_blocks=24, watermark=0.0, max_model_len=96,
         async_scheduling=True),
    dict(enable_prefix_caching=True, block_size=4, num_kv_blocks=24, watermark=0.0, max_model_len=96,
         preemption_mode="swap", swap_space_gib=0.001, async_scheduling=True),
], ids=["plain", "prefix-cache", "chunked", "threshold", "cache+preempt", "preempt", "swap",
        "async+chunked", "async+cache+preempt", "async+swap"])
def test_scheduling_features_keep_greedy_output(gqa_model, hf, settings):
    # A tiny cache cannot hold the long shared prefix; there, short prompts force preemption.
    prompts = PROMPTS if "num_kv_blocks" in settings else SHARED_PROMPTS
    with LLM(gqa_model, device="cpu", **settings) as llm:
        # Twice: the second pass finds the first pass's blocks in the prefix cache.
        for _ in range(2):
            outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
            for out in outputs:
                assert out.outputs[0].token_ids == hf.greedy(gqa_model, out.prompt_token_ids, 16)
        stats = llm.stats()
        swapping = settings.get("preemption_mode") == "swap"
        assert (stats.num_swaps > 0) == swapping
        if not settings["enable_prefix_caching"]:
            assert stats.num_cache_hit_tokens == 0
        elif not swapping:  # (a tiny cache that swaps keeps nothing for the second pass)
            assert stats.num_cache_hit_tokens > 0
        if "num_kv_blocks" in settings:
            assert stats.num_preemptions > 0
        assert stats.num_free_blocks == stats.num_blocks and not stats.num_used_cpu_blocks


def test_prefix_cache_skips_shared_prefill(gqa_model):
    shared = [5 + (7 * j) % 300 for j in range(64)]  # four blocks of 16
    prompts = [shared + [20 + i, 30 + i, 40 + i, 50 + i] for i in range(8)]
    results = {}
    for caching in (False, True):
        with LLM(gqa_model, device="cpu", block_size=16, enable_prefix_caching=caching) as llm:
            # One request first: requests admitted in the same step cannot share what that step
            # is still computing.
            first = _greedy_tokens(llm, prompts[:1])
            results[caching] = (first + _greedy_tokens(llm, prompts), llm.stats())
    assert results[True][0] == results[False][0]
    assert results[False][1].num_prefill_tokens == 9 * 68
    assert results[True][1].num_prefill_tokens == 68 + 8 * 4
    assert results[True][1].num_cache_hit_tokens == 8 * 64


def test_kv_exhaustion_stress_completes_every_request(gqa_model, hf):
    rng = random.Random(0)
    prompts = [[rng.randrange(5, 384) for _ in range(rng.randrange(20, 60))] for _ in range(24)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    with LLM(gqa_model, device="cpu", block_size=4, num_kv_blocks=48, watermark=0.0,
             max_model_len=96, max_num_batched_tokens=64) as llm:
        outputs = llm.generate(prompts, params, use_tqdm=False)
        assert llm.stats().num_preemptions > 0
        assert llm.stats().num_free_blocks == 48
    with LLM(gqa_model, device="cpu") as roomy:
        expected = [o.outputs[0].token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert all(len(t) == 24 for t in expected)
    for prompt, tokens in list(zip(prompts, expected))[:4]:
        hf_tokens = hf.greedy(gqa_model, prompt, 24)
        assert tokens[:len(hf_tokens)] == hf_tokens[:len(tokens)]


def _req(i, priority, arrival, prompt_len=8):
    return Request(f"r{i}", list(range(1, prompt_len + 1)), SamplingParams(max_tokens=50), [],
                   arrival, priority=priority)


def test_priority_policy_orders_admission_and_preemption():
    bm = BlockManager(num_blocks=6, block_size=4, watermark=0.0, enable_prefix_caching=False)
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=100, policy="priority",
                                      starvation_timeout_s=1e9), bm)
    low, high, mid = _req(0, 5, 1.0), _req(1, 0, 2.0), _req(2, 1, 3.0)
    for r in (low, high, mid):
        sched.add_request(r)
    out = sched.schedule()
    assert out.scheduled_req_ids == ["r1", "r2"]  # by priority, then arrival
    for r in (high, mid):  # the step's sampled tokens arrive
        r.append_output_token(9, max_model_len=10**6)
    # Both need a third block; only one more is free: the lower priority (mid) is preempted.
    bm.allocate_slots(_req(9, 0, 0.0, 4), 4)  # take one block so that only one stays free
    out = sched.schedule()
    assert out.scheduled_req_ids == ["r1"] and out.preempted_req_ids == ["r2"]
    assert [r.req_id for r in sched.waiting] == ["r2", "r0"]


def test_starving_request_is_served_first():
    bm = BlockManager(num_blocks=100, block_size=4, watermark=0.0)
    sched = Scheduler(SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=100, policy="priority",
                                      starvation_timeout_s=5.0), bm)
    import time
    now = time.monotonic()
    sched.add_request(_req(0, 0, now))
    sched.add_request(_req(1, 9, now - 10.0))  # low priority, but waiting for 10 s
    out = sched.schedule()
    assert out.scheduled_req_ids == ["r1"]


def _decode_until_preemption(sched, running, max_steps=20):
    """Schedule steps, each sampled token arriving, until one preempts; (scheduled, preempted)."""
    for _ in range(max_steps):
        out = sched.schedule()
        if out.preempted_req_ids:
            return out.scheduled_req_ids, out.preempted_req_ids
        for r in running:
            if r.req_id in out.scheduled_req_ids:
                r.append_output_token(9, max_model_len=10**6)
    raise AssertionError("no preemption happened")


def test_long_running_low_priority_request_does_not_displace_a_newer_high_priority_one():
    """Starvation counts waiting time only (since arrival or the last preemption): a low-priority
    request that arrived long ago but has been running since is still the victim, and once
    preempted it has just started waiting, so it does not outrank a newer high priority."""
    import time
    bm = BlockManager(num_blocks=6, block_size=4, watermark=0.0, enable_prefix_caching=False)
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=100, policy="priority",
                                      starvation_timeout_s=5.0), bm)
    now = time.monotonic()
    low = _req(0, 9, now - 100.0)  # arrived 100 s ago: far past the timeout, but it runs at once
    sched.add_request(low)
    assert sched.schedule().scheduled_req_ids == ["r0"]
    low.append_output_token(9, max_model_len=10**6)
    high = _req(1, 0, now)
    sched.add_request(high)
    scheduled, preempted = _decode_until_preemption(sched, [low, high])
    assert preempted == ["r0"] and scheduled == ["r1"]
    newer = _req(2, 0, now + 1.0)  # a newer high priority arrives while low waits again
    sched.add_request(newer)
    sched.waiting.reorder(time.monotonic())  # as every step does
    assert [r.req_id for r in sched.waiting] == ["r2", "r0"]
