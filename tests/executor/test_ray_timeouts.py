"""The Ray executor's two timeouts, and swap preemption across TP ranks.

- execute_timeout_s: a rank that goes silent (alive, but stopped) makes the step raise
  EngineDeadError once the timeout has passed, not hang.
- placement_timeout_s: a placement the cluster can never fit fails with a clear error, not a hang,
  and leaves no placement group behind.
- preemption_mode swap at TP=2: every rank copies its own KV heads out and back; greedy tokens
  equal Hugging Face's.
"""

import os
import signal
import time

import pytest
import ray

from tests.executor.conftest import greedy_tokens, make_llm
from zllm import EngineDeadError
from zllm.config import EngineConfig
from zllm.executor.ray_executor import RayExecutor
from zllm.protocol import SchedulerOutput

# Wall-clock bounds are generous upper bounds only: a loaded machine stays far inside them, and
# an executor that waits for nothing (no timeout at all) stays far outside.
SLACK_S = 60


def _config(gqa_model: str, **overrides) -> EngineConfig:
    return EngineConfig.from_dict({}, model=gqa_model, load_format="safetensors",
                                  tensor_parallel_size=2, device="cpu", num_kv_blocks=8,
                                  block_size=4, **overrides)


def test_a_silent_rank_raises_engine_dead_after_execute_timeout(ray_session, gqa_model):
    executor = RayExecutor(_config(gqa_model, execute_timeout_s=2))
    pids = executor.collective_rpc("get_pid")
    stopped = []
    try:
        executor.init_kv_cache(8)
        executor.execute_model(SchedulerOutput.empty())  # the data plane answers while all run
        os.kill(pids[0], signal.SIGSTOP)  # rank 0 is alive but answers nothing
        stopped.append(pids[0])
        _wait_until_stopped(pids[0])  # the signal is delivered asynchronously, thread by thread
        t0 = time.monotonic()
        with pytest.raises(EngineDeadError, match=r"rank 0 sent no result within 2 s "
                                                  r"\(execute_timeout_s\)"):
            executor.execute_model(SchedulerOutput.empty())
        assert time.monotonic() - t0 < 2 + SLACK_S
        with pytest.raises(EngineDeadError):  # dead for good: at once, no second timeout
            executor.execute_model(SchedulerOutput.empty())
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        executor.shutdown()


def _wait_until_stopped(pid: int, timeout_s: float = 30) -> None:
    """Until every thread of `pid` is in the stopped state ("T" in /proc/PID/task/*/stat)."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = []
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
        if all(s in "Tt" for s in states):
            return
        assert time.monotonic() < deadline, f"pid {pid} did not stop: thread states {states}"
        time.sleep(0.01)


def test_an_unplaceable_group_fails_after_placement_timeout(ray_session, gqa_model):
    # STRICT_SPREAD wants one node per rank; this cluster has one node.
    before = _live_placement_groups()
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"could not place 2 bundles .* STRICT_SPREAD within 1 s "
                                           r"\(placement_timeout_s\)"):
        RayExecutor(_config(gqa_model, placement_strategy="STRICT_SPREAD", placement_timeout_s=1))
    assert time.monotonic() - t0 < 1 + SLACK_S
    assert _live_placement_groups() == before


def _live_placement_groups() -> set[str]:
    return {pg_id for pg_id, pg in ray.util.placement_group_table().items()
            if pg["state"] != "REMOVED"}


def test_swap_preemption_at_tp2_matches_transformers(ray_session, gqa_model, reference_tokens):
    llm = make_llm(gqa_model, tensor_parallel_size=2, preemption_mode="swap", swap_space_gib=0.01,
                   execute_timeout_s=60, engine_process=False)
    try:
        assert greedy_tokens(llm) == reference_tokens
        stats = llm.stats()
        assert stats.num_swaps > 0 and stats.num_preemptions > 0
    finally:
        llm.shutdown()
