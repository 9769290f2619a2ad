"""The Ray actor around one Worker: control calls through Ray, steps through ZeroMQ.

`run_loop` is a Ray call that never returns: it runs the step loop
(receive, decode, execute, reply) on one of the actor's threads, while other threads keep
answering control calls. The driver holds its object ref; when the actor process dies, the ref
raises, which is how the driver notices a dead rank without a heartbeat. Shutdown kills the actor.
"""

from __future__ import annotations

import logging
import os
import socket
import traceback
from typing import Any

from zllm.config import EngineConfig
from zllm.executor.base import worker_class
from zllm.executor.data_plane import RankKeys, RejectLog, WorkerEndpoint
from zllm.codec import decode, encode
from zllm.protocol import SchedulerOutput, WorkerError

logger = logging.getLogger(__name__)

# While a launched step runs on the device, the step loop polls the data plane this often (ms;
# 0: spin) for the next step, so that one is launched before the reply is sent.
_OVERLAP_POLL_MS = 0


class RayWorker:
    """One rank: builds the worker (config.parallel.worker_cls) inside the actor."""

    def __init__(self, config: EngineConfig, rank: int) -> None:
        if config.device.device == "cuda":
            # NVLink SHARP (NVLS) multicast off unless the cluster's environment says otherwise:
            # it needs fabric support that is not always there. Set here, before NCCL starts,
            # rather than as a Ray runtime_env, which makes Ray start a worker process of its own.
            os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        self.config = config
        self.rank = rank
        self.worker: Any = None
        self.rejects = RejectLog(f"data plane (rank {rank})")
        self.num_steps = 0

    def node_info(self) -> tuple[str, str]:
        import ray

        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()

    def free_port(self) -> int:
        """A TCP port free on this node, for torch.distributed's rendezvous at rank 0."""
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def init_worker(self, distributed_init_method: str) -> None:
        import ray

        # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU, so its device is always index 0.
        local_rank = 0
        if ray.get_gpu_ids():
            logger.info("rank %d: GPU %s", self.rank, ray.get_gpu_ids())
        self.worker = worker_class(self.config)(self.config, self.rank, distributed_init_method,
                                                local_rank)

    def execute_method(self, method: str, *args: Any) -> Any:
        return getattr(self.worker, method)(*args)

    def stats(self) -> dict[str, int]:
        return {"num_rejected_messages": self.rejects.count, "num_steps": self.num_steps}

    def run_loop(self, sched_address: str, reply_address: str, keys: RankKeys) -> None:
        """Serve steps until the actor is killed. Bad messages are dropped; a failed step is
        reported to the driver. `keys`: this rank's data-plane keys, handed over by Ray."""
        endpoint = WorkerEndpoint(sched_address, reply_address, keys)
        pending = 0  # launched steps not collected yet (0 or 1)
        try:
            while True:
                # While a step runs on the device, a next step that arrives is launched behind
                # it (its host work overlaps the device's); once the device is done, reply.
                message = endpoint.receive(None if not pending else 0)
                while message is None and not self.worker.step_done():
                    message = endpoint.receive(_OVERLAP_POLL_MS)
                if message is not None:
                    try:
                        sched = decode(message, SchedulerOutput)
                    except ValueError as e:
                        # Executing a half-understood step would desynchronise the ranks'
                        # state; dropping it leaves the driver to time out: the safe failure.
                        self.rejects.reject(f"a malformed message ({len(message)} bytes): {e}")
                        continue
                    if not self._run(endpoint, self.worker.launch, sched):
                        pending = 0  # the error reply stands for the pending step too
                        continue
                    pending += 1
                    if pending == 1:
                        continue
                if self._run(endpoint, self.worker.collect):
                    pending -= 1
                else:
                    pending = 0
        finally:
            endpoint.close()

    def _run(self, endpoint: WorkerEndpoint, fn, *args) -> bool:
        """Launch or collect a step; the driver gets rank 0's tokens, or any rank's error."""
        try:
            output = fn(*args)
        except Exception as e:
            logger.exception("rank %d: step failed", self.rank)
            detail = "".join(traceback.format_exception_only(type(e), e)).strip()
            endpoint.send(encode(WorkerError(self.rank, detail)))
            return False
        if output is not None:
            self.num_steps += 1
            if self.rank == 0:
                endpoint.send(encode(output))
        return True

    def get_pid(self) -> int:
        return os.getpid()
