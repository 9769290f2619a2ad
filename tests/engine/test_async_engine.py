"""The async engine: a background step loop fed from asyncio."""

from __future__ import annotations

import asyncio

import pytest

from zllm import LLM, EngineConfig, SamplingParams
from zllm.engine.async_engine import AsyncLLMEngine, EngineDeadError
from tests.conftest import PROMPTS

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


# The in-process worker owns process-wide model-parallel state, so one engine at a time.
@pytest.fixture(params=[False, True], ids=["sync", "async-scheduling"])
def engine(gqa_model, request):
    engine = AsyncLLMEngine(EngineConfig.from_dict({}, model=gqa_model, device="cpu",
                                                   num_kv_blocks=256, async_scheduling=request.param))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def expected(gqa_model):
    with LLM(gqa_model, device="cpu") as llm:
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


async def _collect(engine, request_id, prompt, params, stream=False):
    outputs = [out async for out in engine.generate(request_id, prompt, params, stream=stream)]
    return outputs


def test_requests_arriving_at_any_time_match_offline_greedy(expected, engine):
    async def run():
        async def staggered(i, prompt):
            for _ in range(i):  # join the running batch at different steps
                await asyncio.sleep(0)
            return await _collect(engine, f"r{i}", prompt, GREEDY, stream=i % 2 == 0)

        return await asyncio.gather(*[staggered(i, p) for i, p in enumerate(PROMPTS)])

    results = asyncio.run(run())
    assert [r[-1].outputs[0].token_ids for r in results] == expected
    streamed = results[0]
    assert len(streamed) == GREEDY.max_tokens and not any(o.finished for o in streamed[:-1])
    assert [len(r) for r in results[1::2]] == [1] * (len(PROMPTS) // 2)  # non-streamed: final only


def test_bad_request_raises_value_error_and_leaving_early_aborts(engine):
    async def run():
        with pytest.raises(ValueError, match="outside the vocabulary"):
            await _collect(engine, "bad", [10**6], GREEDY)
        outputs = engine.generate("long", "Hello", SamplingParams(max_tokens=500, ignore_eos=True),
                                  stream=True)
        async for out in outputs:
            if len(out.outputs[0].token_ids) >= 3:
                break
        await outputs.aclose()
        # Commands run in order, so once this returns the abort has run.
        return await engine.call(lambda e: (len(e.scheduler.running), e.block_manager.usage))

    assert asyncio.run(run()) == (0, 0.0)
    assert engine.metrics.finished["abort"] >= 1


def test_engine_loop_failure_fails_every_pending_request(gqa_model):
    engine = AsyncLLMEngine(EngineConfig.from_dict({}, model=gqa_model, device="cpu",
                                                   num_kv_blocks=64))
    try:
        def broken_step():
            raise RuntimeError("worker died")

        engine.engine.step = broken_step

        async def run():
            results = await asyncio.gather(*[_collect(engine, f"r{i}", "Hi", GREEDY) for i in range(3)],
                                           return_exceptions=True)
            assert all(isinstance(r, EngineDeadError) and "worker died" in str(r) for r in results)
            with pytest.raises(EngineDeadError):
                await _collect(engine, "later", "Hi", GREEDY)

        asyncio.run(asyncio.wait_for(run(), 60))
        assert not engine.is_running
    finally:
        engine.shutdown()
