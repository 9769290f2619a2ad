"""`zllm bench serve`: `zllm serve` on a model shape, driven by concurrent streaming clients.

    zllm bench serve --model llama-3.1-8b --workload W1,W2 --rates 8,16,32 --api-server-count 2

It starts `zllm serve` (dummy weights of the shape, bf16, Ray executor, async scheduling unless
overridden) and measures:
- time to ready: from launching the server to /health answering 200, on the first start (cold:
  flashinfer's kernels are compiled then, unless its cache is warm) and again (warm);
- each workload (W1, W2 of `zllm bench throughput`) online: every request sent at once, each a
  streaming client; output tokens per second, TTFT and inter-token latency (p50/p90/p99);
- a sweep of Poisson arrival rates (requests/s) over W1's requests;
- the same workloads offline (`LLM.generate`, same config) in the same run, and the offline
  decode step at the online batch size, beside which ITL is judged.

Tokens are counted from the token ids each chunk carries (`return_token_ids`), not from text, so
a token that makes no text yet (half a character) is counted when it arrives. The clients run in
several processes (`--client-procs`), so that parsing hundreds of streams never limits the rate;
they start their clocks together (zllm/bench/stream_clients.py).
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from typing import Any, Optional

from zllm.bench.stream_clients import Request, drive, summarize
from zllm.bench.throughput import MODEL_SHAPES, gpu_scheduling, make_workload, model_dir_for


# -- the server ------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: str, flags: list[str], port: int, log_path: str) -> tuple[subprocess.Popen, float]:
    """`zllm serve` in a subprocess; (process, seconds until /health answered 200)."""
    t0 = time.perf_counter()
    with open(log_path, "a") as log:
        proc = subprocess.Popen([sys.executable, "-m", "zllm", "serve", "--model", model_dir,
                                 "--served-model-name", "bench", "--port", str(port), *flags],
                                stdout=log, stderr=subprocess.STDOUT)
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return proc, time.perf_counter() - t0
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"zllm serve exited ({proc.returncode}) at start-up; see {log_path}")
        time.sleep(0.2)


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _flags(config: dict[str, Any]) -> list[str]:
    return [item for k, v in config.items() for item in ("--" + k.replace("_", "-"), str(v))]


# -- offline, in the same run ------------------------------------------------------------------------

def offline(model_dir: str, config: dict[str, Any], workloads: dict[str, list[Request]]) -> dict:
    """Each workload through LLM.generate (same config): output tok/s, and the median decode step
    (ms) with every request running, from the engine core's step log."""
    from zllm import LLM, EngineConfig, SamplingParams

    results = {}
    # The server's budget too: LLM's offline default may be larger (zllm.config.offline_config).
    config = {"max_num_batched_tokens": EngineConfig().scheduler.max_num_batched_tokens, **config}
    llm = LLM(model=model_dir, **config, record_steps=True)
    try:
        warm = [r[0] for r in next(iter(workloads.values()))[:8]]
        llm.generate(warm, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)
        for name, requests in workloads.items():
            params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for _, n, _ in requests]
            llm.engine.call("step_log")
            t0 = time.perf_counter()
            outs = llm.generate([p for p, _, _ in requests], params, use_tqdm=False)
            elapsed = time.perf_counter() - t0
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            steps = llm.engine.call("step_log")
            full = [done - submit for submit, done, _, new, _ in steps
                    if len(new) == len(requests) and all(n == 1 for n in new)]
            # With async scheduling steps overlap; the decode step is the spacing of completions.
            dones = [done for _, done, _, new, _ in steps if len(new) == len(requests)
                     and all(n == 1 for n in new)]
            spacing = [b - a for a, b in zip(dones, dones[1:])]
            results[name] = {"out_tok_per_s": tokens / elapsed, "seconds": elapsed,
                             "decode_step_ms": 1e3 * statistics.median(spacing or full or [0.0])}
    finally:
        llm.shutdown()
    return results


# -- main --------------------------------------------------------------------------------------------

def workload_requests(name: str, vocab_size: int, num_requests: Optional[int]) -> list[Request]:
    wl = make_workload(name, vocab_size, num_requests)
    return [(p, n, 0.0) for p, n in zip(wl.prompts, wl.output_lens)]


def poisson(requests: list[Request], rate: float, seed: int = 0) -> list[Request]:
    rng, t, out = random.Random(seed), 0.0, []
    for prompt, n, _ in requests:
        t += rng.expovariate(rate)
        out.append((prompt, n, t))
    return out


def run(args: argparse.Namespace, overrides: dict[str, Any]) -> dict[str, Any]:
    from zllm.architecture import ModelArchitecture

    model = overrides.pop("model", None) or args.model
    model_dir = model_dir_for(model)
    vocab = ModelArchitecture.from_model_dir(model_dir).vocab_size
    config = {"dtype": "bfloat16", "distributed_executor_backend": "ray", "max_model_len": 2304,
              "log_stats_interval": 0}
    if model in MODEL_SHAPES:
        config["load_format"] = "dummy"
    config = gpu_scheduling({**config, **overrides})
    server_config = dict(config)
    workloads = {w: workload_requests(w, vocab, args.num_requests) for w in args.workload.split(",")}
    port, log_path = _free_port(), args.log
    report: dict[str, Any] = {"model": model, "config": server_config, "ready_s": [], "online": {},
                              "poisson": {}}
    proc = None
    for _ in range(args.ready_runs):  # the first start is cold, the next warm
        if proc is not None:
            stop_server(proc)
        proc, ready = start_server(model_dir, _flags(server_config), port, log_path)
        report["ready_s"].append(ready)
        print(f"ready in {ready:.1f} s", flush=True)
    url = f"http://127.0.0.1:{port}"
    try:
        drive(url, workloads[next(iter(workloads))][:8], 1)  # warm-up
        for name, requests in workloads.items():
            report["online"][name] = summarize(drive(url, requests, args.client_procs))
            print("online", name, report["online"][name], flush=True)
        for rate in [float(r) for r in args.rates.split(",") if r]:
            requests = poisson(next(iter(workloads.values())), rate)
            report["poisson"][rate] = summarize(drive(url, requests, args.client_procs))
            print("poisson", rate, report["poisson"][rate], flush=True)
    finally:
        stop_server(proc)
    if args.offline:
        report["offline"] = offline(model_dir, config, workloads)
        print("offline", report["offline"], flush=True)
    return report


def rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    offline_ = report.get("offline", {})
    for name, r in report["online"].items():
        off = offline_.get(name, {})
        out.append({"mode": "online", "workload": name, **_row(r),
                    "offline_tok_per_s": round(off.get("out_tok_per_s", 0)),
                    "online_over_offline": round(r["out_tok_per_s"] / off["out_tok_per_s"], 3)
                    if off else "-",
                    "offline_decode_step_ms": round(off.get("decode_step_ms", 0), 2) if off else "-"})
    for rate, r in report["poisson"].items():
        out.append({"mode": f"poisson {rate:g}/s", "workload": "W1", **_row(r)})
    return out


def _row(r: dict[str, Any]) -> dict[str, Any]:
    keep = ("out_tok_per_s", "send_late_max_ms", "ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms",
            "itl_p50_ms", "itl_p90_ms", "itl_p99_ms", "errors")
    return {k: (round(r[k]) if k == "out_tok_per_s" else r[k]) for k in keep}


def main(argv: Optional[list[str]] = None) -> int:
    from zllm.bench.report import add_report_args, write_results
    from zllm.cli import add_config_flags, config_overrides

    parser = argparse.ArgumentParser(prog="zllm bench serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="W1,W2", help="comma-separated: W1, W2")
    parser.add_argument("--num-requests", type=int, default=None, help="override W1/W2's 256")
    parser.add_argument("--rates", default="", help="Poisson arrival rates (requests/s) over W1")
    parser.add_argument("--client-procs", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 4)))
    parser.add_argument("--ready-runs", type=int, default=2, help="server starts (cold, then warm)")
    parser.add_argument("--no-offline", dest="offline", action="store_false")
    parser.add_argument("--log", default="/tmp/zllm-bench-serve.log", help="the server's log")
    add_report_args(parser)
    add_config_flags(parser)
    args = parser.parse_args(argv)
    overrides = config_overrides(args)
    args.model = overrides.get("model") or "llama-3.2-1b"
    report = run(args, overrides)
    ready = ", ".join(f"{t:.1f} s" for t in report["ready_s"])
    write_results(f"Serving: {args.model} (zllm bench serve)",
                  {**report["config"], "model": args.model, "workloads": args.workload,
                   "client_procs": args.client_procs},
                  rows(report), args.out, args.markdown or None,
                  notes=f"Time to ready (first start, then again): {ready}. Online = every "
                        f"request sent at once, each a streaming client; offline = LLM.generate "
                        f"in the same run with the same config.",
                  extra=report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
