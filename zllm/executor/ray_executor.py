"""Runs one Worker per tensor-parallel rank as Ray actors, on one node or many.

Start-up (Ray calls, once): connect to or start Ray, reserve one placement-group bundle per rank,
start the actors, rendezvous torch.distributed at rank 0's node, load the model, hand each rank
its data-plane keys (made once per executor). Each step (no Ray calls): publish the msgpack
scheduler output on the data plane and wait for rank 0's reply, checking between polls that every
actor's step loop is still running. A reply that does not authenticate, does not fit the schema
or comes from a rank that may not send it is dropped and counted. Any failure turns the executor
dead: that call and every later one raise EngineDeadError, or WorkerLostError when a rank died or
went silent; then `restart` rebuilds the whole group through the start-up path (same keys).
"""

from __future__ import annotations

import copy
import logging
import os
import time
import uuid
from typing import Any, Optional

from zllm.config import EngineConfig, ServerConfig
from zllm.errors import EngineDeadError, WorkerLostError
from zllm.executor.base import Executor
from zllm.executor.data_plane import DriverEndpoint, PlaneKeys, wait_for_subscribers
from zllm.executor.ray_worker import RayWorker
from zllm.codec import decode, encode
from zllm.protocol import WORKER_REPLIES, ModelRunnerOutput, SchedulerOutput, WorkerError

logger = logging.getLogger(__name__)

# How long collect waits on the reply socket before checking that the actors are alive:
# the bound on how late a dead rank is noticed, not a cost on steps that answer in time.
_LIVENESS_POLL_S = 0.2
_ACTOR_NAME_PREFIX = "zllm-worker-"
# How long a rank's error waits for Ray to report a peer's death (which makes the error a lost
# worker, recoverable, not a rank that raised). Ray usually knows within ~0.1 s; this bound is
# for a loaded host, and only a genuine worker exception pays all of it.
_BLAME_WAIT_S = 3.0


class RayExecutor(Executor):
    """TP ranks as Ray actors; steps over ZeroMQ (see zllm/executor/data_plane.py)."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self.tp_size = config.parallel.tensor_parallel_size
        self.actors: list[Any] = []
        self.loop_refs: list[Any] = []
        self.endpoint: Optional[DriverEndpoint] = None
        self.data_plane_host = "127.0.0.1"  # the driver node's address when ranks span nodes
        # This run's data-plane authentication: made once, handed to every (re)started rank.
        self.plane_keys = PlaneKeys.generate(self.tp_size)
        self._num_rejected_earlier = 0  # frames dropped by data-plane sockets since closed
        self.placement_group: Any = None
        self.owns_ray = False
        self._dead: Optional[tuple[str, type]] = None  # (message, EngineDeadError or a subclass)
        self.single_node = True
        self.node_ids: list[str] = []
        self._closed = False
        try:
            self._start()
        except BaseException:
            self.shutdown()
            raise

    # -- start-up ----------------------------------------------------------------------------------

    def _start(self) -> None:
        """The start-up path, for the first start and for every restart: Ray, the placement
        group, the actors (model loaded), the data plane."""
        import ray

        self.startup = _Phases()
        if not ray.is_initialized():
            self._init_ray()
            self.startup.mark("ray.init")
        use_gpu = self.config.device.device == "cuda" or (
            self.config.device.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
        self._reserve_placement_group({"GPU": 1} if use_gpu else {"CPU": 1})
        self.startup.mark("placement group")
        self._start_actors(use_gpu)
        self._connect_data_plane()
        self.startup.mark("data plane")
        logger.info("ray executor started: %s", self.startup)

    def _reserve_placement_group(self, bundle: dict[str, int]) -> None:
        """One bundle per rank; a placement group kept from before a restart is reused."""
        import ray
        from ray.util.placement_group import placement_group

        p = self.config.parallel
        if self.placement_group is None:
            self.placement_group = placement_group([dict(bundle)] * self.tp_size,
                                                   strategy=p.placement_strategy)
        try:
            ray.get(self.placement_group.ready(), timeout=p.placement_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(
                f"Ray could not place {self.tp_size} bundles of {bundle} with strategy "
                f"{p.placement_strategy} within {p.placement_timeout_s:.0f} s (placement_timeout_s); "
                f"cluster resources: {ray.cluster_resources()}") from None

    def _start_actors(self, use_gpu: bool) -> None:
        """One actor per rank in its bundle; torch.distributed joined and the model loaded."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        worker_config = copy.deepcopy(self.config)
        worker_config.device.device = "cuda" if use_gpu else "cpu"
        worker_config.server = ServerConfig()  # no secret (api_key) goes to the workers
        actor_cls = ray.remote(RayWorker)
        instance = uuid.uuid4().hex[:8]
        for rank in range(self.tp_size):
            self.actors.append(actor_cls.options(
                name=f"{_ACTOR_NAME_PREFIX}{instance}-rank{rank}",
                num_cpus=0 if use_gpu else 1,
                num_gpus=1 if use_gpu else 0,
                max_concurrency=4,  # run_loop holds one thread; control calls use the others
                max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.placement_group, placement_group_bundle_index=rank),
            ).remote(worker_config, rank))

        # Bounded: a kept placement group whose node has just left may not be placed again.
        nodes = self._ray_get([a.node_info.remote() for a in self.actors], "node_info",
                              timeout_s=self.config.parallel.placement_timeout_s)
        self.node_ids = [node_id for node_id, _ in nodes]
        self.startup.mark("actors up")
        driver_ip = ray.util.get_node_ip_address()
        self.single_node = all(ip == driver_ip for _, ip in nodes)
        rank0_ip = "127.0.0.1" if self.single_node else nodes[0][1]
        port = self._ray_get([self.actors[0].free_port.remote()], "free_port")[0]
        init_method = f"tcp://{rank0_ip}:{port}"
        self.distributed_init_method = init_method  # rank 0's TCPStore listens there only
        self._ray_get([a.init_worker.remote(init_method) for a in self.actors], "init_worker")
        self.startup.mark("worker built")
        self.collective_rpc("init_distributed_environment")
        self.startup.mark("torch.distributed")
        self.collective_rpc("init_model")
        self.startup.mark("model loaded")
        self.data_plane_host = "127.0.0.1" if self.single_node else driver_ip

    def _connect_data_plane(self) -> None:
        """Bind the driver's sockets and start every actor's step loop with its rank's keys. A
        restarted group calls this again: fresh sockets (no stale subscription or reply of the
        old group), the same keys."""
        if self.endpoint is not None:
            self._num_rejected_earlier += self.endpoint.num_rejected
            self.endpoint.close()
        self.endpoint = DriverEndpoint(self.data_plane_host, self.plane_keys)
        self.loop_refs = [a.run_loop.remote(self.endpoint.sched_address, self.endpoint.reply_address,
                                            self.plane_keys.ranks[rank])
                          for rank, a in enumerate(self.actors)]
        wait_for_subscribers(self.endpoint, self.tp_size, self.config.parallel.placement_timeout_s,
                             self._check_loops)
        logger.info("ray executor: %d ranks on %d node(s), data plane %s (%s)", self.tp_size,
                    len(set(self.node_ids)), self.endpoint.sched_address, self.plane_keys.mechanism)

    def restart(self) -> None:
        """Tear the group down (every actor killed, so its communicators and KV cache go with it;
        the data plane's sockets closed) and start it again through the start-up path. The
        placement group is kept while Ray still has it placed (a node that left makes Ray
        reschedule it: then a new one is made, and placement_timeout_s bounds the wait)."""
        import ray

        self._stop_group()
        if self.placement_group is not None and _placement_state(self.placement_group) != "CREATED":
            ray.util.remove_placement_group(self.placement_group)
            self.placement_group = None
        self._dead = None
        t0 = time.perf_counter()
        self._start()
        logger.warning("ray executor: worker group restarted in %.1f s", time.perf_counter() - t0)

    def _init_ray(self) -> None:
        import ray

        p = self.config.parallel
        common = dict(logging_level=logging.WARNING, log_to_driver=True)
        if p.ray_address:
            ray.init(address=p.ray_address, **common)
        else:
            # A CPU bundle per rank must fit even when TP exceeds the core count (tests, demos).
            # address="local": a fresh instance, never a cluster someone else left running.
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, self.tp_size),
                     include_dashboard=False, object_store_memory=128 * 2**20, **common)
        self.owns_ray = True

    # -- control path --------------------------------------------------------------------------------

    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        self._raise_if_dead()
        return self._ray_get([a.execute_method.remote(method, *args) for a in self.actors], method)

    def _ray_get(self, refs: list[Any], what: str, timeout_s: Optional[float] = None) -> list[Any]:
        """The results of actor calls; WorkerLostError naming the rank if an actor died."""
        import ray

        try:
            return ray.get(refs, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"the worker actors did not answer {what} within {timeout_s:.0f} s "
                               f"(placement_timeout_s); cluster resources: "
                               f"{ray.cluster_resources()}") from None
        except ray.exceptions.RayActorError as e:
            dead_id = getattr(e, "actor_id", None)  # a hex string, when Ray knows it
            rank = next((r for r, a in enumerate(self.actors) if a._actor_id.hex() == dead_id), -1)
            raise self._die(rank, f"actor died during {what}: {_first_line(e)}", lost=True) from e

    def check_health(self) -> None:
        self._raise_if_dead()
        self._check_loops()

    # -- data path -------------------------------------------------------------------------------------

    def launch(self, scheduler_output: SchedulerOutput) -> None:
        self._raise_if_dead()
        self.endpoint.publish(encode(scheduler_output))

    def collect(self) -> ModelRunnerOutput:
        """Rank 0 replies in step order, so the next reply belongs to the oldest step."""
        self._raise_if_dead()
        timeout = self.config.parallel.execute_timeout_s
        deadline = time.monotonic() + timeout
        while True:
            reply = self.endpoint.receive(_LIVENESS_POLL_S)
            result = self._accept(*reply) if reply is not None else None
            if isinstance(result, WorkerError):
                self._blame_dead_rank(result)
                raise self._die(result.rank, f"raised {result.message}")
            if result is not None:
                return result
            self._check_loops()
            if time.monotonic() > deadline:
                raise self._die(0, f"sent no result within {timeout:.0f} s (execute_timeout_s)",
                                lost=True)

    def _accept(self, rank: int, reply: bytes) -> Optional[ModelRunnerOutput | WorkerError]:
        """An authenticated reply if it fits the schema and its sender may send it: tokens come
        from rank 0 only, and an error names its own rank. Anything else is dropped and counted."""
        try:
            result = decode(reply, *WORKER_REPLIES)
        except ValueError as e:
            self.endpoint.rejects.reject(f"rank {rank} sent a malformed reply: {e}")
            return None
        claimed = result.rank if isinstance(result, WorkerError) else 0
        if claimed != rank:
            self.endpoint.rejects.reject(f"rank {rank} sent a {type(result).__name__} of rank "
                                         f"{claimed}")
            return None
        return result

    @property
    def num_rejected_frames(self) -> int:
        """Data-plane frames dropped so far: unauthenticated, malformed or from the wrong rank."""
        return self._num_rejected_earlier + (self.endpoint.num_rejected if self.endpoint else 0)

    # -- failure -----------------------------------------------------------------------------------------

    def _check_loops(self) -> None:
        """Raise EngineDeadError if any actor's step loop ended (the actor died, most likely)."""
        import ray

        done, _ = ray.wait(self.loop_refs, num_returns=1, timeout=0)
        if not done:
            return
        rank, cause, lost = self._loop_end(done[0])
        if not lost:
            # A rank whose peer died can fail in a collective before Ray reports the death: give
            # Ray a moment, and blame a rank that died rather than its survivor.
            done, _ = ray.wait(self.loop_refs, num_returns=len(self.loop_refs), timeout=_BLAME_WAIT_S)
            rank, cause, lost = next((end for end in map(self._loop_end, done) if end[2]),
                                     (rank, cause, lost))
        raise self._die(rank, cause, lost)

    def _loop_end(self, ref: Any) -> tuple[int, str, bool]:
        """(rank, why its step loop ended, whether the actor died) for a finished loop ref."""
        import ray

        rank = self.loop_refs.index(ref)
        try:
            ray.get(ref)
            return rank, "stopped its step loop unexpectedly", False
        except ray.exceptions.RayActorError as e:
            return rank, f"died: {_first_line(e)}", True
        except Exception as e:
            return rank, f"step loop failed: {_first_line(e)}", False

    def _blame_dead_rank(self, error: WorkerError) -> None:
        """A rank whose peer died fails in its next collective, often before Ray reports the
        death; give Ray a moment so the error names the rank that died, not its survivor. (A
        lone rank has no peer: its error is its own, reported at once.)"""
        import ray

        if self.tp_size == 1:
            return
        ray.wait(self.loop_refs, num_returns=1, timeout=_BLAME_WAIT_S)
        try:
            self._check_loops()
        except EngineDeadError:
            logger.error("rank %d also failed: %s", error.rank, error.message)
            raise

    def _die(self, rank: int, cause: str, lost: bool = False) -> EngineDeadError:
        """Mark the group dead; the error for this call and every later one (WorkerLostError
        when the rank died or went silent: a restart can bring the group back)."""
        if self._dead is None:
            self._dead = (f"worker rank {rank} {cause}", WorkerLostError if lost else EngineDeadError)
            logger.error("worker group dead: %s", self._dead[0])
        message, error_cls = self._dead
        return error_cls(message)

    def _raise_if_dead(self) -> None:
        if self._dead is not None:
            message, error_cls = self._dead
            raise error_cls(message)
        if self._closed:
            raise EngineDeadError("the executor was shut down")

    # -- shutdown ------------------------------------------------------------------------------------------

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        import ray

        if not ray.is_initialized():
            return
        self._stop_group()
        if self.placement_group is not None:
            ray.util.remove_placement_group(self.placement_group)
        if self.owns_ray:
            ray.shutdown()

    def _stop_group(self) -> None:
        """Kill every actor and close the data plane (the placement group stays)."""
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        # A loop ref fails once Ray has recorded its actor's death (and dropped its name), so
        # waiting for all of them means no actor of ours is left when this returns.
        if self.loop_refs:
            ray.wait(self.loop_refs, num_returns=len(self.loop_refs), timeout=10)
        if self.endpoint is not None:
            self._num_rejected_earlier += self.endpoint.num_rejected
            self.endpoint.close()
        self.actors, self.loop_refs, self.endpoint = [], [], None


class _Phases:
    """Seconds spent in each start-up phase, for the log line that says where start-up went."""

    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = now - self.last
        self.last = now

    def __str__(self) -> str:
        parts = ", ".join(f"{name} {s:.1f} s" for name, s in self.seconds.items())
        return f"{sum(self.seconds.values()):.1f} s ({parts})"


def _placement_state(group: Any) -> str:
    """CREATED while every bundle is placed; RESCHEDULING after a node left, REMOVED, ..."""
    from ray.util import placement_group_table

    return placement_group_table(group).get("state", "UNKNOWN")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
