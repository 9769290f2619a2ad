"""Queue policy: in which order the scheduler serves requests, and whom it preempts first.

"fcfs" orders by turn, then arrival: a request's sample i takes its turn after i more admissions
(the scheduler sets `turn`), so a request with a large `n` shares the queue with later ones
instead of going first with all of its samples; for single samples this is arrival order.
"priority" orders by (priority, turn, arrival), lower values first; a request
that has been *waiting* (since it arrived, or since it was last preempted) for longer than
`starvation_timeout_s` is served as if it had the best priority, so low priorities are delayed,
never starved. Time spent running does not count: a long-running low-priority request keeps its
priority and stays the first candidate for preemption.
"""

from __future__ import annotations

from typing import Iterator

from zllm.config import SchedulerConfig
from zllm.engine.request import Request

_STARVING = float("-inf")


class RequestQueue:
    """Requests kept in service order. `waiting` queues (waiting, swapped) apply the starvation
    rule; the running queue does not."""

    def __init__(self, config: SchedulerConfig, waiting: bool) -> None:
        self.by_priority = config.policy == "priority"
        self.starvation_timeout_s = config.starvation_timeout_s
        self.waiting = waiting
        self.items: list[Request] = []

    def key(self, req: Request, now: float) -> tuple:
        if not self.by_priority:
            return (0, req.turn, req.arrival)
        if self.waiting and now - req.waiting_since > self.starvation_timeout_s:
            return (_STARVING, 0, req.arrival)
        return (req.priority, req.turn, req.arrival)

    def add(self, req: Request, now: float) -> None:
        """Insert at the place the order gives it (after equals: a stable order)."""
        key = self.key(req, now)
        i = len(self.items)
        while i > 0 and self.key(self.items[i - 1], now) > key:
            i -= 1
        self.items.insert(i, req)

    def append(self, req: Request) -> None:
        """Add at the end (the running queue: in the order requests were started)."""
        self.items.append(req)

    def reorder(self, now: float) -> None:
        """Re-sort under the priority policy, where keys change as requests wait."""
        if self.by_priority:
            self.items.sort(key=lambda r: self.key(r, now))

    def remove(self, req: Request) -> None:
        self.items.remove(req)

    def pop(self, index: int = -1) -> Request:
        return self.items.pop(index)

    def __getitem__(self, index: int) -> Request:
        return self.items[index]

    def __len__(self) -> int:
        return len(self.items)

    def __bool__(self) -> bool:
        return bool(self.items)

    def __iter__(self) -> Iterator[Request]:
        return iter(self.items)
