"""`zllm bench control-path`: what one step costs the executor itself, without the model, and
what it costs the worker's host.

Every executor runs a stub worker (zllm/bench/stub_worker.py) that answers at once, so the time
from a ready SchedulerOutput to the sampled tokens being back on the driver is all control path:
encoding, transport to every rank, decoding, the reply, and the thread wake-ups in between. The
steps are steady decode (every request cached, one token each, a new block every block_size
steps), the shape of almost every step in serving.

Then (unless --worker off) a real worker runs the same kind of steps in this process and reports
its host time per stage: the input preparation that the GPU waits for at every step
(zllm/bench/worker_host.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Optional

import numpy as np

from zllm.bench.report import add_report_args, write_results
from zllm.config import EngineConfig
from zllm.protocol import ContinuingRequestData, NewRequestData, SchedulerOutput
from zllm.sampling_params import SamplingParams

STUB = "zllm.bench.stub_worker.StubWorker"
BLOCK_SIZE = 16


def prefill_step(num_requests: int) -> SchedulerOutput:
    new = [NewRequestData(f"req-{i}", np.ones(BLOCK_SIZE, np.int32), np.zeros(0, np.int32),
                          SamplingParams(seed=i), np.ones(1, np.int32), np.array([i], np.int32), 0)
           for i in range(num_requests)]
    return SchedulerOutput(new, ContinuingRequestData(), np.full(num_requests, BLOCK_SIZE, np.int32),
                           num_requests * BLOCK_SIZE, [])


def decode_step(num_requests: int, step: int) -> SchedulerOutput:
    req_ids = [f"req-{i}" for i in range(num_requests)]
    # Requests cross a block boundary at staggered steps, as they do in a real batch.
    owners = np.array([i for i in range(num_requests) if (step + i) % BLOCK_SIZE == 0], np.int32)
    new_blocks = num_requests + step * num_requests + owners
    return SchedulerOutput([], ContinuingRequestData(req_ids, owners, new_blocks),
                           np.ones(num_requests, np.int32), num_requests, [])


def time_steps(executor, num_requests: int, warmup: int, steps: int) -> list[float]:
    """Seconds per step, from a built SchedulerOutput to its ModelRunnerOutput on the driver."""
    executor.execute_model(prefill_step(num_requests))
    times = []
    for step in range(warmup + steps):
        sched = decode_step(num_requests, step)
        t0 = time.perf_counter()
        out = executor.execute_model(sched)
        times.append(time.perf_counter() - t0)
        assert len(out.sampled_token_ids) == num_requests
    return times[warmup:]


def make_executor(backend: str, tp: int):
    config = EngineConfig.from_dict({}, device="cpu", tensor_parallel_size=tp,
                                    distributed_executor_backend=backend, block_size=BLOCK_SIZE,
                                    num_kv_blocks=1 << 20, worker_cls=STUB)
    from zllm.executor import make_executor as make

    return make(config)


def core_rows(counts: list[int], warmup: int, steps: int) -> list[dict]:
    """The engine core's host time per steady decode step (scheduling, applying the sampled
    tokens, building the outputs), with the stub worker in its process."""
    from zllm.demo import ensure_demo_model
    from zllm.engine.core import EngineCore
    from zllm.protocol import EngineCoreRequest

    rows = []
    for n in counts:
        config = EngineConfig.from_dict({}, model=ensure_demo_model(), device="cpu",
                                        max_model_len=2048, num_kv_blocks=1 << 16,
                                        max_num_seqs=n, max_num_batched_tokens=max(8192, 16 * n),
                                        worker_cls=STUB, async_scheduling=True)
        core = EngineCore(config)
        params = SamplingParams(temperature=0, max_tokens=1 << 20, ignore_eos=True, seed=0)
        for i in range(n):
            # Prompts of 16..31 tokens: a sixteenth of the requests cross a block boundary at
            # each step, as in a real batch (equal prompts would all cross on one step in 16,
            # which the median would never see).
            prompt = np.arange(10, 26 + i % config.cache.block_size, dtype=np.int32)
            core.add_request(EngineCoreRequest(f"r{i}", prompt, params, np.ones(1, np.int32),
                                               time.monotonic()))
        for _ in range(warmup):
            core.step()
        core.host_times.clear()
        for _ in range(steps):
            core.step()
        times = sorted(t for t, _, _ in core.host_times)
        core.shutdown()
        rows.append({"part": "engine core", "num_requests": n,
                     "median_us": statistics.median(times) * 1e6,
                     "p90_us": times[int(0.9 * len(times))] * 1e6, "steps": len(times)})
        print(f"engine core {n:>4} requests: median {rows[-1]['median_us']:7.0f} µs")
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="zllm bench control-path", description=__doc__)
    add_report_args(parser, out="docs/bench/control_path.json")
    parser.add_argument("--requests", default="1,64,256", help="running-request counts")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--worker", choices=("on", "off", "only"), default="on",
                        help="also time the real worker's host stages (tiny model, CPU); only: "
                             "just those")
    parser.add_argument("--worker-steps", type=int, default=100)
    parser.add_argument("--worker-model", default="tiny-random",
                        help="'tiny-random' (CPU) or a benchmark shape such as llama-3.2-1b (GPU, dummy "
                             "weights)")
    parser.add_argument("--worker-context", type=int, default=16,
                        help="prompt tokens per request before the decode steps")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sampling temperature of the worker's requests")
    parser.add_argument("--worker-piecewise-tokens", default="0",
                        help="piecewise_cuda_graph_tokens of the worker (GPU), comma-separated: "
                             "one row each, e.g. 0,1024")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.requests.split(",")]
    if args.worker != "only":
        write_results("Engine core host time per decode step (zllm bench control-path)",
                      {"steps": args.steps, "warmup": args.warmup, "worker": "stub (no model)",
                       "workload": "steady decode, async scheduling"},
                      core_rows(counts, args.warmup, args.steps), _beside(args.out, "core"),
                      args.markdown or None)
    if args.worker != "off":
        from zllm.bench.worker_host import worker_rows

        rows = [row for tokens in args.worker_piecewise_tokens.split(",")
                for row in worker_rows(counts, max(1, args.worker_steps // 10), args.worker_steps,
                                       args.temperature, args.worker_model, args.worker_context,
                                       int(tokens))]
        write_results("Worker host time per decode step (zllm bench control-path)",
                      {"steps": args.worker_steps, "temperature": args.temperature,
                       "model": args.worker_model, "context": args.worker_context,
                       "worker": "in process", "workload": "steady decode, async"},
                      rows, _beside(args.out, "worker"), args.markdown or None)
        if args.worker == "only":
            return 0

    import ray

    ray.init(include_dashboard=False, object_store_memory=128 * 2**20, log_to_driver=False,
             num_cpus=max(2, os.cpu_count() or 1))
    rows = []
    try:
        for backend, tp in (("uni", 1), ("ray", 1), ("ray", 2)):
            executor = make_executor(backend, tp)
            try:
                for n in counts:
                    times = sorted(time_steps(executor, n, args.warmup, args.steps))
                    row = {"executor": backend, "tp": tp, "num_requests": n,
                           "median_us": statistics.median(times) * 1e6,
                           "p90_us": times[int(0.9 * len(times))] * 1e6,
                           "mean_us": statistics.fmean(times) * 1e6, "steps": len(times)}
                    rows.append(row)
                    print(f"{backend:>4} TP={tp} {n:>4} requests: median {row['median_us']:7.0f} µs"
                          f"  p90 {row['p90_us']:7.0f} µs")
            finally:
                executor.shutdown()
    finally:
        ray.shutdown()
    config = {"steps": args.steps, "warmup": args.warmup, "worker": "stub (no model)",
              "workload": "steady decode"}
    write_results("Control path per step (zllm bench control-path)", config, rows, args.out,
                  args.markdown or None)
    return 0


def _beside(path: Optional[str], tag: str) -> Optional[str]:
    """`path` with `tag` before its extension (control_path.json -> control_path.worker.json)."""
    if not path:
        return path
    root, ext = os.path.splitext(path)
    return f"{root}.{tag}{ext}"


if __name__ == "__main__":
    raise SystemExit(main())
