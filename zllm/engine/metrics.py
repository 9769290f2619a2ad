"""Serving metrics: counters and latency histograms, rendered in the Prometheus text format.

Written by the engine loop thread, read by the HTTP server thread. Every update and every
snapshot takes one lock, so a scrape never sees a histogram whose count and buckets disagree.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field

# Seconds. TTFT spans a queue wait and a prefill; inter-token latency is one decode step.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
               0.4, 0.5, 0.75, 1.0, 2.5)


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bucket, not cumulative; last is +Inf
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def render(self, name: str, help_text: str) -> list[str]:
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        cumulative = 0
        for bound, n in zip(self.buckets, self.counts):
            cumulative += n
            lines.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        lines.append(f"{name}_sum {self.total}")
        lines.append(f"{name}_count {self.count}")
        return lines


class EngineMetrics:
    """What `GET /metrics` reports about the engine loop."""

    FINISH_REASONS = ("stop", "length", "abort", "error")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.num_running = 0
        self.num_waiting = 0
        self.kv_usage = 0.0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished = dict.fromkeys(self.FINISH_REASONS, 0)
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)

    def set_state(self, num_running: int, num_waiting: int, kv_usage: float) -> None:
        with self.lock:
            self.num_running, self.num_waiting, self.kv_usage = num_running, num_waiting, kv_usage

    def count_first_token(self, num_prompt_tokens: int, ttft: float) -> None:
        with self.lock:
            self.prompt_tokens += num_prompt_tokens
            self.ttft.observe(ttft)

    def count_tokens(self, num_new_tokens: int, itl: float | None) -> None:
        with self.lock:
            self.generation_tokens += num_new_tokens
            if itl is not None:
                self.itl.observe(itl)

    def count_finished(self, reason: str) -> None:
        with self.lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1

    def snapshot(self) -> dict[str, float]:
        """The gauges and counters, for the periodic log line."""
        with self.lock:
            return {"running": self.num_running, "waiting": self.num_waiting,
                    "kv_usage": self.kv_usage, "prompt_tokens": self.prompt_tokens,
                    "generation_tokens": self.generation_tokens}

    def render(self, model_name: str) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        del model_name  # one model per server; kept for a future label
        with self.lock:
            lines = [
                "# HELP zllm_num_requests_running Requests in the running batch.",
                "# TYPE zllm_num_requests_running gauge",
                f"zllm_num_requests_running {self.num_running}",
                "# HELP zllm_num_requests_waiting Requests queued for admission.",
                "# TYPE zllm_num_requests_waiting gauge",
                f"zllm_num_requests_waiting {self.num_waiting}",
                "# HELP zllm_kv_cache_usage_ratio Fraction of KV cache blocks in use (0 to 1).",
                "# TYPE zllm_kv_cache_usage_ratio gauge",
                f"zllm_kv_cache_usage_ratio {self.kv_usage}",
                "# HELP zllm_prompt_tokens_total Prompt tokens prefilled.",
                "# TYPE zllm_prompt_tokens_total counter",
                f"zllm_prompt_tokens_total {self.prompt_tokens}",
                "# HELP zllm_generation_tokens_total Tokens generated.",
                "# TYPE zllm_generation_tokens_total counter",
                f"zllm_generation_tokens_total {self.generation_tokens}",
                "# HELP zllm_request_finished_total Requests finished, by reason.",
                "# TYPE zllm_request_finished_total counter",
            ]
            lines += [f'zllm_request_finished_total{{finished_reason="{r}"}} {n}'
                      for r, n in self.finished.items()]
            lines += self.ttft.render("zllm_time_to_first_token_seconds",
                                      "Time from arrival to the first generated token.")
            lines += self.itl.render("zllm_inter_token_latency_seconds",
                                     "Time between consecutive tokens of a request.")
        return "\n".join(lines) + "\n"
