"""How many worker-group restarts the engine core may still make: `max_worker_restarts` within
a rolling `worker_restart_window_s`. A group that keeps dying (a bad node, a kernel that crashes
on some input) uses the budget up, and the engine then fails as it would with no restarts, so
that a supervisor sees it instead of a server that restarts forever."""

from __future__ import annotations

import collections
import time
from typing import Callable


class RestartBudget:
    def __init__(self, max_restarts: int, window_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_restarts, self.window_s, self.clock = max_restarts, window_s, clock
        self.times: collections.deque[float] = collections.deque()

    def take(self) -> bool:
        """Count one restart now if the budget allows it; False when it is used up."""
        now = self.clock()
        while self.times and now - self.times[0] >= self.window_s:
            self.times.popleft()
        if len(self.times) >= self.max_restarts:
            return False
        self.times.append(now)
        return True

    def describe(self) -> str:
        return (f"{self.max_restarts} worker restart(s) per {self.window_s:.0f} s "
                f"(max_worker_restarts, worker_restart_window_s)")
