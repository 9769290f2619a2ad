"""Runs the single worker in this process: TP=1 without Ray, for tests and debugging.

`launch` has the worker launch the step (on a GPU, kernels are queued and the call returns);
`collect` reads its tokens back. With async scheduling the engine schedules the next step in
between, overlapping the GPU's work on this one, with no thread (and no GIL contention).
"""

from __future__ import annotations

from typing import Any

from zllm.config import EngineConfig
from zllm.executor.base import Executor, worker_class
from zllm.protocol import ModelRunnerOutput, SchedulerOutput


class UniprocExecutor(Executor):
    """The worker (config.parallel.worker_cls) in this process."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        # The only place the engine core's process loads worker code.
        self.worker = worker_class(config)(config, rank=0, distributed_init_method=None)
        self.worker.init_distributed_environment()
        self.worker.init_model()

    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        return [getattr(self.worker, method)(*args)]

    def launch(self, scheduler_output: SchedulerOutput) -> None:
        self.worker.launch(scheduler_output)

    def collect(self) -> ModelRunnerOutput:
        return self.worker.collect()

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.shutdown()
            self.worker = None
