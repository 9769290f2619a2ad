"""Async scheduling: step N+1 is submitted before step N's tokens are processed, with the same
outputs as scheduling one step at a time."""

from __future__ import annotations

import random

import pytest

from zllm import LLM, SamplingParams


@pytest.mark.parametrize("ahead", [1, 2])
def test_async_scheduling_keeps_steps_ahead_with_the_same_tokens(gqa_model, hf, ahead):
    rng = random.Random(1)
    prompts = [[rng.randrange(5, 384) for _ in range(rng.randrange(20, 60))] for _ in range(16)]
    # Mixed lengths, so requests finish while the next step (which includes them) is in flight.
    params = [SamplingParams(temperature=0, max_tokens=8 + i, ignore_eos=True) for i in range(16)]
    tight = dict(block_size=4, num_kv_blocks=48, watermark=0.0, max_model_len=96,
                 max_num_batched_tokens=64)
    with LLM(gqa_model, device="cpu", async_scheduling=True, async_steps_ahead=ahead,
             engine_process=False, **tight) as llm:
        executor = llm.engine.engine_core.executor
        submit, collect = executor.launch, executor.collect
        outstanding = [0, 0]  # now, most

        def counting_submit(sched):
            outstanding[0] += 1
            outstanding[1] = max(outstanding)
            submit(sched)

        def counting_collect():
            outstanding[0] -= 1
            return collect()

        executor.launch, executor.collect = counting_submit, counting_collect
        outputs = llm.generate(prompts, params, use_tqdm=False)
        assert outstanding == [0, 1 + ahead]  # so many steps in flight at times; none left
        assert llm.stats().num_preemptions > 0
        assert llm.stats().num_free_blocks == 48
    with LLM(gqa_model, device="cpu") as sync:
        expected = sync.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in expected]
    assert [len(o.outputs[0].token_ids) for o in outputs] == [p.max_tokens for p in params]
    for prompt, out in list(zip(prompts, outputs))[:3]:
        assert out.outputs[0].token_ids == hf.greedy(gqa_model, prompt, len(out.outputs[0].token_ids))


@pytest.mark.parametrize("ahead", [1, 2])
def test_a_request_id_reused_right_after_an_abort_gets_only_its_own_tokens(gqa_model, hf, ahead):
    """Aborting a running request leaves steps in flight that carry its next tokens; a new
    request under the same id, added at once, must not take them (nor stall the scheduler)."""
    old, new = [7] * 40, [11, 12, 13, 14, 15]
    with LLM(gqa_model, device="cpu", async_scheduling=True, async_steps_ahead=ahead,
             engine_process=False) as llm:
        engine = llm.engine
        engine.add_request("r", old, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
        for _ in range(4):
            engine.step()
        assert engine.engine_core.in_flight == 1 + ahead
        engine.abort_request("r")
        engine.add_request("r", new, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        finished = []
        while engine.has_unfinished_requests():
            finished += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in finished] == ["r"]
    assert finished[0].outputs[0].token_ids == hf.greedy(gqa_model, new, 8)
