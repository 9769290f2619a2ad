"""The executor interface: start workers, move scheduler outputs to them, bring results back.

It knows nothing about scheduling; the engine knows nothing about where workers run.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import Any

from zllm.config import EngineConfig
from zllm.errors import EngineDeadError
from zllm.protocol import ModelRunnerOutput, SchedulerOutput


class Executor(ABC):
    num_rejected_frames = 0  # data-plane frames dropped (unauthenticated, malformed, wrong rank)

    def __init__(self, config: EngineConfig) -> None:
        self.config = config

    @abstractmethod
    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        """Run a worker method on every rank once; returns the results in rank order."""

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step on all ranks; returns rank 0's sampled tokens."""
        self.launch(scheduler_output)
        return self.collect()

    @abstractmethod
    def launch(self, scheduler_output: SchedulerOutput) -> None:
        """Start a step on every rank (each worker `launch`es it). Workers run steps in order; with
        async scheduling the engine launches step N+1 before collecting step N."""

    @abstractmethod
    def collect(self) -> ModelRunnerOutput:
        """Wait for the oldest launched step that has not been collected; its result."""

    def determine_num_available_blocks(self) -> int:
        # Every rank holds the same blocks for its shard, so the smallest count wins.
        return min(self.collective_rpc("determine_num_available_blocks"))

    def determine_num_swap_blocks(self) -> int:
        return min(self.collective_rpc("determine_num_swap_blocks"))

    def init_kv_cache(self, num_blocks: int, num_swap_blocks: int = 0) -> None:
        self.collective_rpc("init_kv_cache", num_blocks, num_swap_blocks)

    def check_health(self) -> None:
        """Raise if a worker is gone."""

    def restart(self) -> None:
        """Rebuild every worker from scratch after WorkerLostError: model loaded, no KV cache
        yet (the engine sizes it again). Executors whose workers cannot die alone cannot."""
        raise EngineDeadError(f"the {type(self).__name__} cannot restart its workers")

    @abstractmethod
    def shutdown(self) -> None:
        """Stop the workers and release what they hold. Safe to call twice."""


def worker_class(config: EngineConfig) -> type:
    """The class config.parallel.worker_cls names (a dotted path), imported."""
    module, _, name = config.parallel.worker_cls.rpartition(".")
    return getattr(importlib.import_module(module), name)
