"""A Worker stand-in with no model: it answers every step at once, so timing a step through an
executor measures only the executor's own cost (serialisation, transport, wake-ups)."""

from __future__ import annotations

import collections
import os
from typing import Optional

import numpy as np

from zllm.config import EngineConfig
from zllm.protocol import ModelRunnerOutput, SchedulerOutput


class StubWorker:
    """Same control calls as zllm.worker.worker.Worker; every step samples token 0 for every
    scheduled request."""

    def __init__(self, config: EngineConfig, rank: int, distributed_init_method: Optional[str],
                 local_rank: int = 0) -> None:
        self.config = config
        self.rank = rank
        self.launched: collections.deque[ModelRunnerOutput] = collections.deque()

    def init_distributed_environment(self) -> None:
        pass

    def init_model(self) -> None:
        pass

    def determine_num_available_blocks(self) -> int:
        return self.config.cache.num_kv_blocks or 1

    def determine_num_swap_blocks(self) -> int:
        return 0

    def init_kv_cache(self, num_blocks: int, num_swap_blocks: int = 0) -> None:
        pass

    def launch(self, scheduler_output: SchedulerOutput) -> None:
        req_ids = scheduler_output.scheduled_req_ids
        self.launched.append(ModelRunnerOutput(req_ids, np.zeros(len(req_ids), dtype=np.int32)))

    def collect(self) -> ModelRunnerOutput:
        return self.launched.popleft()

    def step_done(self) -> bool:
        return True

    def take_host_times(self) -> dict[str, list]:
        return {"launch": [], "grammar": [], "gpu": []}

    def get_pid(self) -> int:
        return os.getpid()

    def shutdown(self) -> None:
        pass
