"""A worker whose every step takes at least STEP_FLOOR_S longer: on a machine that decodes the
tiny model fast, a test's first request still runs long enough for the test to queue others
behind it (the test waits for each to be queued; the pace only widens the margin)."""

from __future__ import annotations

import time

from zllm.worker.worker import Worker

STEP_FLOOR_S = 0.02


class PacedWorker(Worker):
    def launch(self, scheduler_output) -> None:
        super().launch(scheduler_output)
        time.sleep(STEP_FLOOR_S)
