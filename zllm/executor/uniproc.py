"""Runs the single worker in this process: TP=1 without Ray, for tests and debugging.

With async scheduling the worker runs steps on a thread of its own, so the engine's scheduling
and output processing overlap the step (the worker thread spends most of a GPU step waiting on
the device, with the GIL released); otherwise a step runs inline.
"""

from __future__ import annotations

import collections
import importlib
from concurrent.futures import Future, ThreadPoolExecutor
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
        self.in_flight: collections.deque[Future] = collections.deque()
        self.thread = (ThreadPoolExecutor(1, thread_name_prefix="zllm-worker")
                       if config.scheduler.async_scheduling else None)

    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        return [getattr(self.worker, method)(*args)]

    def submit(self, scheduler_output: SchedulerOutput) -> None:
        if self.thread is not None:
            self.in_flight.append(self.thread.submit(self.worker.execute_model, scheduler_output))
            return
        done: Future = Future()
        done.set_result(self.worker.execute_model(scheduler_output))
        self.in_flight.append(done)

    def collect(self) -> ModelRunnerOutput:
        return self.in_flight.popleft().result()

    def shutdown(self) -> None:
        if self.thread is not None:
            self.thread.shutdown(wait=True)
            self.thread = None
        if self.worker is not None:
            self.worker.shutdown()
            self.worker = None
