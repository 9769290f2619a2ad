"""Recovery from worker death: the time from SIGKILL of a rank to the first token after it.

  zllm bench recovery                         # tiny demo model, TP=2 on Ray, CPU, 3 kills

Streaming requests decode; once each has a few tokens, one rank's process is killed. The engine
core notices, rebuilds the worker group (actors, torch.distributed, weights, KV cache) and
recomputes every running request; the clock stops at the first token any request gets after
the kill. Each trial also checks that every request's tokens equal those of an undisturbed run.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import time
from typing import Optional

from zllm.bench.report import write_results
from zllm.config import EngineConfig
from zllm.frontend.llm_engine import LLMEngine
from zllm.sampling_params import SamplingParams


def _prompts(args: argparse.Namespace) -> list[list[int]]:
    rng = random.Random(0)
    return [[0] + [rng.randrange(4, 380) for _ in range(args.prompt_len)]
            for _ in range(args.num_requests)]


def _run(engine: LLMEngine, prompts: list[list[int]], tag: str, args: argparse.Namespace,
         kill_rank: Optional[int] = None) -> tuple[list[list[int]], Optional[float]]:
    """Every request's streamed tokens and, with kill_rank, seconds from the kill to the first
    token after it."""
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", prompt, params, stream=True)
    tokens = {f"{tag}-{i}": [] for i in range(len(prompts))}
    killed_at, recovery_s = None, None
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] += out.outputs[0].token_ids
            if killed_at is not None and recovery_s is None and out.outputs[0].token_ids:
                recovery_s = time.perf_counter() - killed_at
        if kill_rank is not None and killed_at is None and \
                min(map(len, tokens.values())) >= args.kill_after_tokens:
            pids = engine.engine_core.executor.collective_rpc("get_pid")
            killed_at = time.perf_counter()
            os.kill(pids[kill_rank], signal.SIGKILL)
    return list(tokens.values()), recovery_s


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="zllm bench recovery", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tensor-parallel-size", type=int, default=2)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--kill-after-tokens", type=int, default=8)
    parser.add_argument("--kill-rank", type=int, default=1)
    parser.add_argument("--out", default=None, help="JSON output path")
    parser.add_argument("--markdown", default="docs/benchmarks.md",
                        help="append the results here ('' to skip)")
    args = parser.parse_args(argv)

    config = EngineConfig.from_dict(
        {}, model=args.model, device=args.device, tensor_parallel_size=args.tensor_parallel_size,
        distributed_executor_backend="ray", engine_process=False,
        max_worker_restarts=args.trials, execute_timeout_s=60)
    engine = LLMEngine(config)  # the engine core in this process: the bench reaches the pids
    prompts = _prompts(args)
    rows = []
    try:
        undisturbed, _ = _run(engine, prompts, "calm", args)
        for trial in range(args.trials):
            tokens, recovery_s = _run(engine, prompts, f"kill{trial}", args, args.kill_rank)
            rows.append({"trial": trial, "running_requests": args.num_requests,
                         "kill_to_first_token_s": recovery_s,
                         "tokens_equal_undisturbed": tokens == undisturbed})
        restarts = engine.stats().num_worker_restarts
    finally:
        engine.shutdown()
    write_results(
        f"Recovery from a killed rank, TP={args.tensor_parallel_size} on Ray", {
            "model": args.model, "device": args.device, "requests": args.num_requests,
            "prompt": args.prompt_len, "output": args.output_len,
            "kill_after_tokens": args.kill_after_tokens, "kill_rank": args.kill_rank,
            "worker_restarts": restarts}, rows, args.out, args.markdown or None)


if __name__ == "__main__":
    main()
