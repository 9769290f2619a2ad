"""AsyncLLM: the server's frontend, with the engine core in its own process (or a thread)."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from zllm import LLM, EngineConfig, SamplingParams
from zllm.errors import EngineDeadError
from zllm.frontend.async_llm import AsyncLLM
from tests.conftest import PROMPTS

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(params=[(True, False), (True, True), (False, False)],
                ids=["process", "process+async-scheduling", "thread"])
def llm(gqa_model, request):
    engine_process, async_scheduling = request.param
    llm = AsyncLLM(EngineConfig.from_dict({}, model=gqa_model, device="cpu", num_kv_blocks=256,
                                          async_scheduling=async_scheduling,
                                          engine_process=engine_process))
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def expected(gqa_model):
    with LLM(gqa_model, device="cpu") as llm:
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


async def _collect(llm, request_id, prompt, params, stream=False):
    return [out async for out in llm.generate(request_id, prompt, params, stream=stream)]


def test_requests_arriving_at_any_time_match_offline_greedy(expected, llm):
    async def run():
        llm.start()

        async def staggered(i, prompt):
            for _ in range(i):  # join the running batch at different steps
                await asyncio.sleep(0)
            return await _collect(llm, f"r{i}", prompt, GREEDY, stream=i % 2 == 0)

        return await asyncio.gather(*[staggered(i, p) for i, p in enumerate(PROMPTS)])

    results = asyncio.run(run())
    # Streamed requests get deltas; joined, they are the whole output.
    tokens = [sum((o.outputs[0].token_ids for o in r), []) for r in results]
    assert tokens == expected
    assert all(o.delta for o in results[0]) and results[0][-1].finished
    assert not any(o.finished for o in results[0][:-1])
    assert [len(r) for r in results[1::2]] == [1] * (len(PROMPTS) // 2)  # non-streamed: final only
    assert not any(r[0].delta for r in results[1::2])


def test_bad_request_raises_value_error_and_leaving_early_aborts(llm):
    async def run():
        llm.start()
        with pytest.raises(ValueError, match="outside the vocabulary"):
            await _collect(llm, "bad", [10**6], GREEDY)
        outputs = llm.generate("long", "Hello", SamplingParams(max_tokens=500, ignore_eos=True),
                               stream=True)
        received = 0
        async for out in outputs:
            received += len(out.outputs[0].token_ids)
            if received >= 3:
                break
        await outputs.aclose()
        # Messages to the core are handled in order: a call after the abort sees it done.
        return await llm.call("stats"), await llm.call("metrics")

    stats, metrics = asyncio.run(run())
    assert stats["num_running"] == 0 and stats["num_free_blocks"] == stats["num_blocks"]
    assert metrics["finished"]["abort"] == 1


def test_killing_the_engine_core_fails_every_request_in_flight(gqa_model):
    llm = AsyncLLM(EngineConfig.from_dict({}, model=gqa_model, device="cpu", num_kv_blocks=256))
    try:
        async def run():
            llm.start()
            params = SamplingParams(temperature=0, max_tokens=2000, ignore_eos=True)
            streams = [llm.generate(f"r{i}", "Hi", params, stream=True) for i in range(3)]
            for stream in streams:  # every request is running in the core
                await anext(stream)
            os.kill(llm.core.process.pid, signal.SIGKILL)
            results = await asyncio.gather(*[_drain(s) for s in streams], return_exceptions=True)
            assert all(isinstance(r, EngineDeadError) for r in results), results
            with pytest.raises(EngineDeadError):
                await _collect(llm, "later", "Hi", GREEDY)
            with pytest.raises(EngineDeadError):
                await llm.call("stats")

        asyncio.run(asyncio.wait_for(run(), 60))
        assert not llm.is_running
    finally:
        llm.shutdown()


async def _drain(stream):
    async for _ in stream:
        pass
