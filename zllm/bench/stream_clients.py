"""Concurrent streaming clients for `zllm bench serve`, in several processes.

This module imports nothing heavy (no torch), because every client process imports it: a client
process that took seconds to start would send its requests late, and the run's clock (from the
first request sent to the last token received) would count that as serving time. The processes
also meet at a barrier once they are up, and start their clocks together from there; each
request's lateness against its planned send time (from the earliest process's start) is
reported as `send_late_max_ms`.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import queue
import statistics
import time
from typing import Any, Optional

import aiohttp

Request = tuple[list[int], int, float]  # prompt ids, output tokens, send offset (s)
BARRIER_TIMEOUT_S = 120.0  # for every client process to be up


async def _one(session, url: str, model: str, prompt: list[int], max_tokens: int, t0: float,
               offset: float, headers: dict[str, str]) -> dict:
    """Send one streaming request at `t0 + offset` (monotonic); the arrival time of each token."""
    await asyncio.sleep(max(0.0, t0 + offset - time.monotonic()))
    sent = time.monotonic()
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "return_token_ids": True}
    arrivals: list[tuple[float, int]] = []
    result = {"t0": t0, "offset": offset, "sent": sent, "arrivals": arrivals, "error": None}
    try:
        async with session.post(url + "/v1/completions", json=body, headers=headers) as response:
            if response.status != 200:
                result["error"] = f"HTTP {response.status}"
                return result
            async for line in response.content:
                if not line.startswith(b"data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices"):
                    n = len(chunk["choices"][0].get("token_ids") or ())
                    if n:
                        arrivals.append((time.monotonic(), n))
    except (OSError, asyncio.TimeoutError, aiohttp.ClientError) as e:  # counted, not fatal
        result["error"] = f"{type(e).__name__}: {e}"
    return result


async def _run_clients(url: str, model: str, requests: list[Request], barrier,
                       headers: dict[str, str]) -> list[dict]:
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        # Every process is up, imported and holds a session: the clocks start together.
        await asyncio.get_running_loop().run_in_executor(None, barrier.wait, BARRIER_TIMEOUT_S)
        t0 = time.monotonic()
        return await asyncio.gather(*[_one(session, url, model, p, n, t0, offset, headers)
                                      for p, n, offset in requests])


def _client_process(url: str, model: str, requests: list[Request], barrier, results, index: int,
                    headers: dict[str, str]) -> None:
    results.put((index, asyncio.run(_run_clients(url, model, requests, barrier, headers))))


def drive(url: str, requests: list[Request], procs: int, model: str = "bench",
          api_key: Optional[str] = None) -> list[dict]:
    """Send `requests` (each at its offset from a start shared by all processes) to the served
    `model` from `procs` client processes; one result per request, grouped by process."""
    ctx = multiprocessing.get_context("spawn")
    shares = [share for share in (requests[i::procs] for i in range(procs)) if share]
    barrier, results = ctx.Barrier(len(shares)), ctx.Queue()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    workers = [ctx.Process(target=_client_process, daemon=True,
                           args=(url, model, share, barrier, results, i, headers))
               for i, share in enumerate(shares)]
    for w in workers:
        w.start()
    parts = {}
    try:
        while len(parts) < len(workers):
            try:
                index, part = results.get(timeout=5)
                parts[index] = part
            except queue.Empty:  # a process that died leaves its share unanswered
                dead = [w for i, w in enumerate(workers)
                        if i not in parts and w.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"a bench client process exited with {dead[0].exitcode}")
    finally:
        barrier.abort()  # (no-op once passed) frees clients still waiting for a dead one
        for w in workers:
            w.join(timeout=10 if len(parts) == len(workers) else 0)
            if w.is_alive():
                w.terminate()
    return [r for i in sorted(parts) for r in parts[i]]


def summarize(results: list[dict]) -> dict[str, Any]:
    """Output tokens per second over the whole run; TTFT and ITL percentiles (ms); the latest
    send against its plan (ms), which shows whether the clients kept their schedule."""
    errors = [r["error"] for r in results if r["error"]]
    start = min(r["t0"] for r in results)  # the earliest client process's clock start
    ttfts, itls, tokens, first, last = [], [], 0, min(r["sent"] for r in results), 0.0
    for r in results:
        if not r["arrivals"]:
            continue
        ttfts.append(r["arrivals"][0][0] - r["sent"])
        previous = r["arrivals"][0][0]
        for t, n in r["arrivals"][1:]:
            itls += [(t - previous) / n] * n  # a chunk with n tokens stands for n gaps
            previous = t
        tokens += sum(n for _, n in r["arrivals"])
        last = max(last, r["arrivals"][-1][0])

    def pct(values: list[float], q: int) -> Optional[float]:
        return round(1e3 * statistics.quantiles(values, n=100)[q - 1], 2) if len(values) > 1 else None

    return {"requests": len(results), "errors": len(errors), "output_tokens": tokens,
            "seconds": last - first if last else 0.0,
            "out_tok_per_s": tokens / (last - first) if last else 0.0,
            "send_late_max_ms": round(1e3 * max(r["sent"] - (start + r["offset"]) for r in results), 2),
            **{f"ttft_p{q}_ms": pct(ttfts, q) for q in (50, 90, 99)},
            **{f"itl_p{q}_ms": pct(itls, q) for q in (50, 90, 99)}}
