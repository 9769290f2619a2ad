"""EngineCore: a request ends at the very step its stop token id, max_tokens or max_model_len
says, at every scheduling depth, and nothing of it is reported or computed past its end."""

from __future__ import annotations

import collections
import time

import numpy as np
import pytest

from zllm.bench.stub_worker import StubWorker
from zllm.config import EngineConfig
from zllm.demo import ensure_demo_model
from zllm.engine.core import EngineCore
from zllm.protocol import EngineCoreRequest
from zllm.sampling_params import SamplingParams


class CountingStubWorker(StubWorker):
    """The stub (token 0 for every scheduled request), also counting the tokens each request
    was scheduled to compute."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.computed: collections.Counter[str] = collections.Counter()

    def launch(self, scheduler_output) -> None:
        self.computed.update(scheduler_output.num_scheduled_by_id())
        super().launch(scheduler_output)


STUB = f"{__name__}.CountingStubWorker"
MAX_MODEL_LEN = 40

# name: (prompt length, eos token id, sampling params, (finish reason, output tokens)). Every
# sampled token is 0, so a stop on 0 fires at the first output token that min_tokens allows.
CASES = {
    "stop id": (8, 1, SamplingParams(max_tokens=30, stop_token_ids=[0]), ("stop", 1)),
    "stop id after min_tokens": (8, 1, SamplingParams(max_tokens=30, stop_token_ids=[5, 0],
                                                      min_tokens=5), ("stop", 5)),
    "eos": (8, 0, SamplingParams(max_tokens=30, min_tokens=3), ("stop", 3)),
    "eos ignored": (8, 0, SamplingParams(max_tokens=7, ignore_eos=True), ("length", 7)),
    "max_tokens": (8, 1, SamplingParams(max_tokens=6), ("length", 6)),
    "max_tokens 1": (8, 1, SamplingParams(max_tokens=1), ("length", 1)),
    "max_model_len": (30, 1, SamplingParams(max_tokens=100), ("length", MAX_MODEL_LEN - 30)),
    "max_tokens at max_model_len": (30, 1, SamplingParams(max_tokens=10), ("length", 10)),
}


@pytest.mark.parametrize("async_scheduling, ahead", [(False, 1), (True, 1), (True, 2)])
def test_requests_end_at_the_step_their_limit_says(async_scheduling, ahead):
    config = EngineConfig.from_dict({}, model=ensure_demo_model(), device="cpu",
                                    max_model_len=MAX_MODEL_LEN, num_kv_blocks=256, block_size=4,
                                    worker_cls=STUB, async_scheduling=async_scheduling,
                                    async_steps_ahead=ahead)
    core = EngineCore(config)
    computed = core.executor.worker.computed  # tokens the worker was asked to compute
    for name, (prompt_len, eos, params, _) in CASES.items():
        core.add_request(EngineCoreRequest(name, np.arange(10, 10 + prompt_len, dtype=np.int32),
                                           params, np.array([eos], np.int32), time.monotonic()))
    tokens = dict.fromkeys(CASES, 0)
    ended = {}  # name: (step, finish reason, stop reason)
    step = 0
    while core.has_work():
        out = core.step()
        step += 1
        if out is None:
            continue
        for req_id in out.request_ids:
            assert req_id not in ended, f"{req_id}: a token after its end"
            tokens[req_id] += 1
        for f in out.finished:
            ended[f.request_id] = (step, f.finish_reason, f.stop_reason)
    core.shutdown()

    for name, (prompt_len, _, params, (reason, num_output)) in CASES.items():
        # Every prompt fits the first step, which samples each request's first token, and
        # step() returns the steps in order: the k-th output token arrives at the k-th call.
        stop_reason = 0 if reason == "stop" else None
        assert ended[name] == (num_output, reason, stop_reason), name
        assert tokens[name] == num_output, name
        if params.max_tokens == num_output:
            # Known in advance: no step computes the last token, whose sample would be dropped.
            assert computed[name] == prompt_len + num_output - 1, name
        else:  # found when the token arrives: each step in flight computes one more
            extra = ahead if async_scheduling else 0
            assert computed[name] <= prompt_len + num_output - 1 + extra, name


def test_the_step_log_records_each_steps_contexts_and_keeps_out_of_the_host_time():
    """What zllm bench throughput computes a step's floor from: each step's contexts (tokens
    already computed) and new tokens per request, submitted before done. Its bookkeeping is the
    benchmark's, not the core's: its cost is counted apart from the core's host time."""
    config = EngineConfig.from_dict({}, model=ensure_demo_model(), device="cpu",
                                    max_model_len=MAX_MODEL_LEN, num_kv_blocks=256, block_size=4,
                                    worker_cls=STUB, record_steps=True)
    core = EngineCore(config)
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    for name, prompt_len in (("a", 5), ("b", 7)):
        core.add_request(EngineCoreRequest(name, np.arange(10, 10 + prompt_len, dtype=np.int32),
                                           params, np.array([1], np.int32), time.monotonic()))
    while core.has_work():
        core.step()
    entries = core.call("step_log")
    core.shutdown()
    assert [(contexts, new) for _, _, contexts, new, _ in entries] == [
        ([0, 0], [5, 7]), ([5, 7], [1, 1]), ([6, 8], [1, 1])]
    assert all(submit < done for submit, done, *_ in entries)
    assert core.step_log.cost_s > 0 and len(core.host_times) == 3
