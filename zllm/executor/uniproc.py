"""Runs the single worker in this process: TP=1 without Ray, for tests and debugging."""

from __future__ import annotations

import importlib
from typing import Any

from zllm.config import EngineConfig
from zllm.executor.base import Executor
from zllm.protocol import ModelRunnerOutput, SchedulerOutput


class UniprocExecutor(Executor):
    """The worker in this process. `worker_cls` names its class (a stub in benchmarks)."""

    def __init__(self, config: EngineConfig, worker_cls: str = "zllm.worker.worker.Worker") -> None:
        super().__init__(config)
        # The only place the driver side loads worker code.
        module, _, name = worker_cls.rpartition(".")
        self.worker = getattr(importlib.import_module(module), name)(
            config, rank=0, distributed_init_method=None)
        self.worker.init_distributed_environment()
        self.worker.init_model()

    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        return [getattr(self.worker, method)(*args)]

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.worker.execute_model(scheduler_output)

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.shutdown()
            self.worker = None
