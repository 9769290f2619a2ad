"""Scheduling benchmarks: what prefix caching saves, and what a long prompt does to decodes.

  python -m zllm.bench.scheduling prefix   # 256 requests sharing a 1024-token prefix
  python -m zllm.bench.scheduling itl      # one 8k prompt arriving while 64 requests decode

Both run the tiny demo-shaped model by default (CPU); pass --model (a directory, or a shape
from zllm.bench.throughput such as llama-3.2-1b, with random weights) and --device for others.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from typing import Any, Optional

from zllm.config import EngineConfig
from zllm.frontend.llm_engine import LLMEngine
from zllm.bench.report import add_report_args, write_results
from zllm.sampling_params import SamplingParams


def _bench_model(max_positions: int) -> str:
    """A demo-shaped random Llama with a long enough context, cached like the demo model."""
    from zllm.demo import build_tiny_llama, cache_dir

    path = os.path.join(cache_dir(), f"bench-llama-{max_positions}")
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        build_tiny_llama(path, max_position_embeddings=max_positions)
    return path


def _engine(args: argparse.Namespace, **overrides: Any) -> LLMEngine:
    from zllm.bench.throughput import MODEL_SHAPES, model_dir_for

    model = args.model or _bench_model(16384)
    if model in MODEL_SHAPES:  # a real model's shape with random weights (GPU runs)
        model = model_dir_for(model)
        overrides.update(load_format="dummy", dtype="bfloat16")
    return LLMEngine(EngineConfig.from_dict({}, model=model, device=args.device, **overrides))


def _drain(engine: LLMEngine) -> None:
    while engine.has_unfinished_requests():
        engine.step()


def bench_prefix(args: argparse.Namespace) -> None:
    rng = random.Random(0)
    vocab = 300
    prefix = [rng.randrange(5, vocab) for _ in range(args.prefix_len)]
    prompts = [prefix + [rng.randrange(5, vocab) for _ in range(args.suffix_len)]
               for _ in range(args.num_requests)]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    rows = []
    for caching in (False, True):
        engine = _engine(args, enable_prefix_caching=caching, max_num_batched_tokens=args.budget,
                         max_model_len=2048)
        t0 = time.perf_counter()
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", p, params)
        _drain(engine)
        elapsed = time.perf_counter() - t0
        s = engine.stats()
        rows.append({"prefix_caching": caching, "prefill_tokens_computed": s.num_prefill_tokens,
                     "cache_hit_tokens": s.num_cache_hit_tokens, "seconds": elapsed,
                     "requests_per_s": args.num_requests / elapsed})
        engine.shutdown()
    rows[1]["speedup"] = rows[0]["seconds"] / rows[1]["seconds"]
    rows[0]["speedup"] = 1.0
    config = {"requests": args.num_requests, "prefix": args.prefix_len, "suffix": args.suffix_len,
              "output": args.output_len, "budget": args.budget, "model": args.model or "tiny demo shape"}
    write_results("Shared-prefix prefill (prefix caching off vs on)", config, rows, args.out,
                  args.markdown or None)


def bench_itl(args: argparse.Namespace) -> None:
    """Worst inter-token latency of running decodes while a long prompt is prefilled, against the
    time of one step that computes a full token budget."""
    rng = random.Random(0)
    long_prompt = [rng.randrange(5, 300) for _ in range(args.long_len)]
    rows = []
    for chunked in (True, False):
        budget = args.budget if chunked else args.long_len + args.num_decodes
        engine = _engine(args, enable_chunked_prefill=chunked, max_num_batched_tokens=budget,
                         max_model_len=args.long_len + 64, enable_prefix_caching=False)
        # The reference: one step computing a budget-sized prefill chunk.
        engine.add_request("probe", [rng.randrange(5, 300) for _ in range(args.budget)],
                           SamplingParams(max_tokens=1))
        engine.step()  # warm-up
        engine.add_request("probe2", [rng.randrange(5, 300) for _ in range(args.budget)],
                           SamplingParams(max_tokens=1))
        t0 = time.perf_counter()
        engine.step()
        budget_step = time.perf_counter() - t0
        _drain(engine)

        decode_params = SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True)
        for i in range(args.num_decodes):
            engine.add_request(f"d{i}", [rng.randrange(5, 300) for _ in range(16)], decode_params)
        for _ in range(5):  # all decoding now
            engine.step()
        engine.add_request("long", long_prompt, SamplingParams(max_tokens=1))
        worst, last, steps = 0.0, time.perf_counter(), 0
        while "long" in engine.output_processor.requests:
            engine.step()
            now = time.perf_counter()
            worst, last, steps = max(worst, now - last), now, steps + 1
        rows.append({"chunked_prefill": chunked, "max_num_batched_tokens": budget,
                     "steps_to_prefill": steps, "worst_itl_ms": worst * 1e3,
                     "budget_step_ms": budget_step * 1e3, "worst_itl_over_budget_step": worst / budget_step})
        for i in range(args.num_decodes):
            engine.abort_request(f"d{i}")
        engine.shutdown()
    config = {"long_prompt": args.long_len, "decoding_requests": args.num_decodes,
              "budget": args.budget, "model": args.model or "tiny demo shape"}
    write_results("Inter-token latency of 64 decodes while an 8k prompt arrives", config, rows,
                  args.out, args.markdown or None)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="zllm bench scheduling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workload", choices=["prefix", "itl"])
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="auto")
    add_report_args(parser)
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--prefix-len", type=int, default=1024)
    parser.add_argument("--suffix-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--long-len", type=int, default=8192)
    parser.add_argument("--num-decodes", type=int, default=64)
    args = parser.parse_args(argv)
    (bench_prefix if args.workload == "prefix" else bench_itl)(args)


if __name__ == "__main__":
    main()
