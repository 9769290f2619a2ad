"""Serving metrics: counters and latency histograms, and their Prometheus text format.

The engine core counts (it sees every request, whichever frontend sent it); a frontend asks for
a `snapshot()` over the control channel and renders it with `render_prometheus`. Both sides use
this module, which depends on nothing else in zllm.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

# Seconds. TTFT spans a queue wait and a prefill; inter-token latency is one decode step.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
               0.4, 0.5, 0.75, 1.0, 2.5)
FINISH_REASONS = ("stop", "length", "abort", "error")


class Histogram:
    """Prometheus-style buckets (value <= bound), filled a step's worth of values at a time."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.bounds = np.asarray(buckets, dtype=np.float64)
        self.counts = np.zeros(len(buckets) + 1, dtype=np.int64)  # per bucket; last is +Inf
        self.total = 0.0

    def observe(self, values: Sequence[float]) -> None:
        if len(values):
            values = np.asarray(values, dtype=np.float64)
            np.add.at(self.counts, np.searchsorted(self.bounds, values, side="left"), 1)
            self.total += float(values.sum())

    def snapshot(self) -> dict[str, Any]:
        return {"buckets": self.bounds.tolist(), "counts": self.counts.tolist(), "sum": self.total}


class EngineMetrics:
    """What `GET /metrics` reports, kept by the engine core."""

    def __init__(self) -> None:
        self.gauges = {"running": 0, "waiting": 0, "kv_usage": 0.0}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished = dict.fromkeys(FINISH_REASONS, 0)
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)

    def set_state(self, num_running: int, num_waiting: int, kv_usage: float) -> None:
        self.gauges = {"running": num_running, "waiting": num_waiting, "kv_usage": kv_usage}

    def count_prompt_tokens(self, num: int) -> None:
        self.prompt_tokens += num

    def count_tokens(self, num_new_tokens: int, ttfts: Sequence[float], itls: Sequence[float]) -> None:
        self.generation_tokens += num_new_tokens
        self.ttft.observe(ttfts)
        self.itl.observe(itls)

    def count_finished(self, reason: str) -> None:
        self.finished[reason] = self.finished.get(reason, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        return {**self.gauges, "prompt_tokens": self.prompt_tokens,
                "generation_tokens": self.generation_tokens, "finished": dict(self.finished),
                "ttft": self.ttft.snapshot(), "itl": self.itl.snapshot()}


def _histogram_lines(name: str, help_text: str, h: dict[str, Any]) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
    cumulative = 0
    for bound, n in zip(h["buckets"], h["counts"]):
        cumulative += n
        lines.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
    total = sum(h["counts"])
    lines += [f'{name}_bucket{{le="+Inf"}} {total}', f"{name}_sum {h['sum']}", f"{name}_count {total}"]
    return lines


def render_prometheus(snap: dict[str, Any]) -> str:
    """A snapshot in the Prometheus text exposition format (version 0.0.4)."""
    def gauge(name: str, kind: str, help_text: str, value: Any) -> list[str]:
        return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]

    lines = (gauge("zllm_num_requests_running", "gauge", "Requests in the running batch.",
                   snap["running"])
             + gauge("zllm_num_requests_waiting", "gauge", "Requests queued for admission.",
                     snap["waiting"])
             + gauge("zllm_kv_cache_usage_ratio", "gauge",
                     "Fraction of KV cache blocks in use (0 to 1).", snap["kv_usage"])
             + gauge("zllm_prompt_tokens_total", "counter", "Prompt tokens prefilled.",
                     snap["prompt_tokens"])
             + gauge("zllm_generation_tokens_total", "counter", "Tokens generated.",
                     snap["generation_tokens"])
             + gauge("zllm_data_plane_rejected_frames_total", "counter",
                     "Worker replies dropped: unauthenticated, malformed or from the wrong rank.",
                     snap.get("rejected_frames", 0)))
    lines += ["# HELP zllm_request_finished_total Requests finished, by reason.",
              "# TYPE zllm_request_finished_total counter"]
    lines += [f'zllm_request_finished_total{{finished_reason="{r}"}} {n}'
              for r, n in snap["finished"].items()]
    lines += _histogram_lines("zllm_time_to_first_token_seconds",
                              "Time from arrival to the first generated token.", snap["ttft"])
    lines += _histogram_lines("zllm_inter_token_latency_seconds",
                              "Time between consecutive tokens of a request.", snap["itl"])
    return "\n".join(lines) + "\n"
