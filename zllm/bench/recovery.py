"""Recovery from worker death: the time from SIGKILL of a rank to the first token after it.

  zllm bench recovery                         # tiny demo model, TP=2 on Ray, CPU, 3 kills
  zllm bench recovery --model llama-3.2-1b --device cuda --tensor-parallel-size 1 \
      --workload W1 --trials 1 --kill-after-tokens 64       # a model shape, dummy weights, GPU

Streaming requests decode; once each has a few tokens, one rank's process is killed. The engine
core notices, rebuilds the worker group (actors, torch.distributed, weights, KV cache) and
recomputes every running request; the clock stops at the first token any request gets after
the kill. Each trial checks that every request got all its tokens, and counts the requests whose
tokens equal those of an undisturbed run: all of them on CPU in float32. In bf16 on a GPU a
recomputed request may drift (its tokens come from a prefill instead of decodes), so there the
count is reported, not asserted, beside the same count for a second undisturbed run (bf16
results depend on how a batch is laid out) and where the first differing token falls.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import time
from typing import Optional

from zllm.bench.report import add_report_args, write_results
from zllm.config import EngineConfig
from zllm.frontend.llm_engine import LLMEngine
from zllm.sampling_params import SamplingParams


def _prompts(args: argparse.Namespace, vocab_size: int) -> list[list[int]]:
    if args.workload:  # zllm bench throughput's workload (W1: 256 x 512 prompt tokens)
        from zllm.bench.throughput import make_workload

        wl = make_workload(args.workload, vocab_size, args.num_requests)
        args.output_len = max(wl.output_lens)
        return wl.prompts
    rng = random.Random(0)
    return [[0] + [rng.randrange(4, 380) for _ in range(args.prompt_len)]
            for _ in range(args.num_requests or 16)]


def _config(args: argparse.Namespace) -> EngineConfig:
    """The engine core in this process (the bench reaches the workers' pids); a model shape
    (zllm bench throughput's MODEL_SHAPES) runs bf16 with dummy weights."""
    from zllm.bench.throughput import MODEL_SHAPES, model_dir_for

    keys = {}
    if args.model in MODEL_SHAPES:
        keys = {"model": model_dir_for(args.model), "load_format": "dummy", "dtype": "bfloat16"}
    if args.max_model_len:
        keys["max_model_len"] = args.max_model_len
    return EngineConfig.from_dict(
        {}, **{"model": args.model, **keys}, device=args.device,
        tensor_parallel_size=args.tensor_parallel_size, distributed_executor_backend="ray",
        engine_process=False, max_worker_restarts=args.trials, execute_timeout_s=60)


def _run(engine: LLMEngine, prompts: list[list[int]], tag: str, args: argparse.Namespace,
         kill_rank: Optional[int] = None) -> tuple[list[list[int]], Optional[float], float]:
    """Every request's streamed tokens, with kill_rank the seconds from the kill to the first
    token computed by the rebuilt group, and the run's wall time. (Tokens of steps that ended
    before the kill may still arrive after it: the clock ignores them, counting only steps
    begun once the core has rebuilt the group.)"""
    t0 = time.perf_counter()
    core = engine.engine_core  # in this process (engine_process=False)
    restarts = core.stats.num_worker_restarts
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", prompt, params, stream=True)
    tokens = {f"{tag}-{i}": [] for i in range(len(prompts))}
    killed_at, recovery_s = None, None
    while engine.has_unfinished_requests():
        rebuilt = core.stats.num_worker_restarts > restarts
        for out in engine.step():
            tokens[out.request_id] += out.outputs[0].token_ids
            if rebuilt and recovery_s is None and out.outputs[0].token_ids:
                recovery_s = time.perf_counter() - killed_at
        if kill_rank is not None and killed_at is None and \
                min(map(len, tokens.values())) >= args.kill_after_tokens:
            pids = core.executor.collective_rpc("get_pid")
            killed_at = time.perf_counter()
            os.kill(pids[kill_rank], signal.SIGKILL)
    return list(tokens.values()), recovery_s, time.perf_counter() - t0


def _median_first_difference(runs: list[list[int]], reference: list[list[int]]):
    """The median position of the first token that differs, over the requests that differ."""
    firsts = sorted(next(i for i, (a, b) in enumerate(zip(x, y)) if a != b)
                    for x, y in zip(runs, reference) if x != y)
    return firsts[len(firsts) // 2] if firsts else None


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="zllm bench recovery", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tensor-parallel-size", type=int, default=2)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--num-requests", type=int, default=None,
                        help="default: 16, or the workload's (W1: 256)")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--kill-after-tokens", type=int, default=8)
    parser.add_argument("--kill-rank", type=int, default=None, help="default: the last rank")
    parser.add_argument("--workload", default=None,
                        help="W1 or W2: zllm bench throughput's prompts and lengths instead")
    parser.add_argument("--max-model-len", type=int, default=None)
    add_report_args(parser)
    args = parser.parse_args(argv)

    if args.kill_rank is None:
        args.kill_rank = args.tensor_parallel_size - 1
    engine = LLMEngine(_config(args))
    prompts = _prompts(args, engine.arch.vocab_size)
    rows = []
    try:
        undisturbed, _, calm_s = _run(engine, prompts, "calm", args)
        again, _, _ = _run(engine, prompts, "again", args)
        for trial in range(args.trials):
            tokens, recovery_s, wall_s = _run(engine, prompts, f"kill{trial}", args,
                                              args.kill_rank)
            rows.append({"trial": trial, "running_requests": len(prompts),
                         "kill_to_first_token_s": recovery_s,
                         "wall_s": wall_s, "undisturbed_wall_s": calm_s,
                         "requests_complete": sum(len(t) == args.output_len for t in tokens),
                         "requests_equal_undisturbed": sum(
                             a == b for a, b in zip(tokens, undisturbed)),
                         "undisturbed_runs_equal": sum(
                             a == b for a, b in zip(again, undisturbed)),
                         "median_first_difference": _median_first_difference(
                             tokens, undisturbed)})
        restarts = engine.stats().num_worker_restarts
    finally:
        engine.shutdown()
    write_results(
        f"Recovery from a killed rank, TP={args.tensor_parallel_size} on Ray", {
            "model": args.model, "device": args.device, "requests": len(prompts),
            "workload": args.workload or "random prompts",
            "prompt": len(prompts[0]), "output": args.output_len,
            "kill_after_tokens": args.kill_after_tokens, "kill_rank": args.kill_rank,
            "worker_restarts": restarts}, rows, args.out, args.markdown or None)


if __name__ == "__main__":
    main()
