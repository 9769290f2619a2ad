"""Recovery from worker death (Ray, TP=2, gloo): a chaos run on one engine.

A 32-request greedy batch is interrupted five times by SIGKILL of worker processes, at seeded
random steps of given kinds: during a prefill, during a decode-only step, during a swap-in, two
ranks at once, and any step. The test steps the engine itself (`LLMEngine.step`) and, between
steps, kills the ranks of the step just submitted: the engine core finds the death while that
step (and, with async scheduling, the one before it) is in flight. Every request must end with exactly the tokens of an undisturbed run on the
same engine, each token delivered once.
"""

from __future__ import annotations

import os
import random
import signal

import pytest

from zllm import EngineDeadError, LLM, SamplingParams

NUM_REQUESTS = 32
MAX_TOKENS = 20
KILL_KINDS = ("prefill", "decode", "swap_in", "two_ranks", "any")

# Small KV cache (64 blocks of 4 tokens for 32 requests of up to ~44 tokens) and preemption by
# swap, so that requests are swapped out and back in throughout; a small token budget, so that
# prefills take several steps. Async scheduling: two steps are in flight when a rank dies.
CHAOS_CONFIG = dict(tensor_parallel_size=2, device="cpu", dtype="float32", block_size=4,
                    num_kv_blocks=64, preemption_mode="swap", swap_space_gib=0.01,
                    max_num_batched_tokens=48, max_num_seqs=32, async_scheduling=True,
                    execute_timeout_s=30,
                    max_worker_restarts=len(KILL_KINDS), engine_process=False)


def chaos_prompts(seed: int = 13) -> list[list[int]]:
    rng = random.Random(seed)
    return [[0] + [rng.randrange(4, 380) for _ in range(rng.randrange(3, 24))]
            for _ in range(NUM_REQUESTS)]


def stream_all(llm: LLM, prompts: list[list[int]], tag: str, between_steps=None) -> list[list[int]]:
    """Run every prompt as a streaming request; each request's tokens as its deltas carried
    them. Fails if a request gets output after it finished, or finishes twice."""
    engine = llm.engine
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    for req_id, prompt in zip(ids, prompts):
        engine.add_request(req_id, prompt, params, stream=True)
    tokens: dict[str, list[int]] = {req_id: [] for req_id in ids}
    finished: set[str] = set()
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id not in finished, f"{out.request_id} got output after it finished"
            tokens[out.request_id] += out.outputs[0].token_ids
            if out.finished:
                finished.add(out.request_id)
        if between_steps is not None:
            between_steps()
    assert finished == set(ids)
    return [tokens[req_id] for req_id in ids]


class Killer:
    """Between steps, decides from what the step just submitted holds whether to SIGKILL ranks:
    each kind of kill waits for a seeded random number of qualifying steps."""

    def __init__(self, llm: LLM, seed: int) -> None:
        self.core = llm.engine.engine_core
        self.rng = random.Random(seed)
        self.skips = {kind: self.rng.randrange(0, 3) for kind in KILL_KINDS}
        self.skips["swap_in"] = 0  # swap-ins are the rarest steps: take the first
        self.num_swapped = 0
        self.killed: list[tuple[str, int]] = []  # (kind, restarts before the kill)
        self.pids: list[int] = []
        self.pids_of_restart = -1  # the worker group the pids belong to

    def qualifies(self, kind: str, swapped_in: bool) -> bool:
        step = self.core.scheduler.last_stats
        if kind == "prefill":
            return step.num_prefill_tokens > 0
        if kind == "decode":
            return step.num_prefill_tokens == 0 and step.num_decode_tokens > 0
        if kind == "swap_in":
            return swapped_in
        return True

    def __call__(self) -> None:
        swapped = len(self.core.scheduler.swapped)
        # The submitted step brought requests back from CPU blocks (nothing else leaves
        # the swapped queue in a greedy batch with no aborts).
        swapped_in = swapped < self.num_swapped
        self.num_swapped = swapped
        restarts = self.core.stats.num_worker_restarts
        if restarts < len(self.killed):
            return  # the last kill is not noticed yet
        if self.pids_of_restart != restarts:
            # Asked now, not when killing, so that the kill follows the submit at once.
            self.pids, self.pids_of_restart = self.core.executor.collective_rpc("get_pid"), restarts
            return
        if not self.core.in_flight:
            return
        for kind in KILL_KINDS:
            if kind in dict(self.killed) or not self.qualifies(kind, swapped_in):
                continue
            if self.skips[kind] > 0:
                self.skips[kind] -= 1
                continue
            self.kill(kind)
            return

    def kill(self, kind: str) -> None:
        victims = self.pids if kind == "two_ranks" else [self.rng.choice(self.pids)]
        self.killed.append((kind, self.core.stats.num_worker_restarts))
        for pid in victims:
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def chaos_llm(ray_session, gqa_model):
    llm = LLM(model=gqa_model, **CHAOS_CONFIG)
    yield llm
    llm.shutdown()


def test_chaos_kills_during_prefill_decode_swap_in_and_two_ranks_lose_nothing(chaos_llm):
    prompts = chaos_prompts()
    undisturbed = stream_all(chaos_llm, prompts, "calm")
    core = chaos_llm.engine.engine_core
    assert all(len(t) == MAX_TOKENS for t in undisturbed)
    assert core.scheduler.num_swaps > 0, "the setting must swap requests out and back in"

    killer = Killer(chaos_llm, seed=2026)
    disturbed = stream_all(chaos_llm, prompts, "chaos", between_steps=killer)
    assert sorted(kind for kind, _ in killer.killed) == sorted(KILL_KINDS), killer.killed
    assert core.stats.num_worker_restarts == len(KILL_KINDS)
    assert disturbed == undisturbed
    assert core.state == "running"


def test_worker_death_past_max_worker_restarts_raises_engine_dead(chaos_llm):
    core = chaos_llm.engine.engine_core
    used = core.stats.num_worker_restarts
    if used < len(KILL_KINDS):  # run alone: use the budget up first
        for _ in range(len(KILL_KINDS) - used):
            assert core.restarts.take()
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    chaos_llm.engine.add_request("last", chaos_prompts()[0], params)
    chaos_llm.engine.step()  # the request's first step is in flight
    os.kill(core.executor.collective_rpc("get_pid")[1], signal.SIGKILL)
    with pytest.raises(EngineDeadError, match="rank 1 .*used up 5 worker restart"):
        while chaos_llm.engine.has_unfinished_requests():
            chaos_llm.engine.step()
