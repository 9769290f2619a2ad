"""Host time of each stage of a step, for benchmarks (`zllm bench control-path --worker`).

The model runner marks the end of each stage of `launch`; a benchmark switches the timer on and
reads the laps. Off (the default), a mark costs one attribute check, so the marks stay in the
hot path instead of a benchmark wrapping the runner's methods from outside.
"""

from __future__ import annotations

import time


class HostTimer:
    def __init__(self) -> None:
        self.enabled = False
        self.laps: dict[str, list[float]] = {}  # stage -> seconds, one entry per step
        self._last = 0.0

    def start(self) -> None:
        if self.enabled:
            self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        """The stage that ends now took the time since the previous mark."""
        if self.enabled:
            now = time.perf_counter()
            self.laps.setdefault(stage, []).append(now - self._last)
            self._last = now

    def reset(self) -> None:
        self.laps = {}
