"""The engine core: scheduler, block manager and executor. Token ids in, token ids out.

It knows no tokenizer, chat template or HTTP: a frontend sends tokenized `EngineCoreRequest`s and
aborts, and gets back each step's new token per request and the requests that ended. The core
enforces what needs no text: stop token ids (after `min_tokens`), `max_tokens` and
`max_model_len`. Stop strings are the frontend's; it aborts the request here when one matches.

One call of `step` collects the oldest step in flight, applies its tokens, and schedules and
submits the next step before returning, so the workers get step N+2 as soon as step N's tokens
are applied. With async scheduling two steps are in flight: while the GPU runs one, the host
schedules and prepares the next (see `in_flight`).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import random
import time
from typing import Any, Callable, Optional

import numpy as np

from zllm.config import EngineConfig
from zllm.engine.block_manager import BlockManager
from zllm.engine.request import Request, RequestStatus
from zllm.engine.restart_budget import RestartBudget
from zllm.engine.scheduler import Scheduler, StepStats
from zllm.errors import EngineDeadError, WorkerLostError
from zllm.executor import Executor, make_executor
from zllm.metrics import EngineMetrics
from zllm.model_files import resolve_model
from zllm.protocol import (EngineCoreOutputs, EngineCoreRequest, EngineStats, FinishedRequest,
                           LogprobsRows, ModelRunnerOutput)

logger = logging.getLogger(__name__)

# The engine core asks the executor whether every worker lives at most this often (seconds);
# /health may be polled much more often than that.
HEALTH_CHECK_INTERVAL_S = 1.0


class EngineCore:
    def __init__(self, config: EngineConfig,
                 on_state: Optional[Callable[[str, str], None]] = None) -> None:
        """`on_state(state, message)` hears the core's state changes: "recovering" while a lost
        worker group is rebuilt, then "running" (a frontend's /health reports them)."""
        config, self.arch = resolve_model(config)
        self.config = config
        requested = config.model.max_model_len
        if requested is not None and requested > self.arch.max_position_embeddings:
            raise ValueError(f"config key 'max_model_len' = {requested} is larger than the "
                             f"model's max_position_embeddings ({self.arch.max_position_embeddings})")

        t0 = time.perf_counter()
        self.executor: Executor = make_executor(config)
        try:
            num_blocks, num_swap_blocks = self._init_kv_cache()
            self.max_model_len = self._resolve_max_model_len(num_blocks * config.cache.block_size)
        except BaseException:
            self.executor.shutdown()
            raise
        logger.info("engine core ready in %.1f s: %d KV blocks of %d tokens (%d tokens), "
                    "max_model_len %d", time.perf_counter() - t0, num_blocks,
                    config.cache.block_size, num_blocks * config.cache.block_size, self.max_model_len)

        self.block_manager = self._new_block_manager(num_blocks, num_swap_blocks)
        self.scheduler = Scheduler(config.scheduler, self.block_manager, config.cache.preemption_mode)
        self.requests: dict[str, Request] = {}
        self._seed_rng = random.Random(config.model.seed)
        self.stats = EngineStats(num_blocks=num_blocks)  # totals; engine_stats() adds the state
        self.metrics = EngineMetrics()
        self.in_flight = 0  # steps submitted to the executor and not collected yet
        self.num_submitted = 0  # steps submitted so far; the k-th is step k
        # Requests that ended while steps that may carry a token of theirs were in flight: id ->
        # the last such step. A new request reusing the id takes no token from those steps.
        self.retired: dict[str, int] = {}
        sched = config.scheduler
        self.pipeline_depth = 1 + sched.async_steps_ahead if sched.async_scheduling else 1
        # Per step() call: (this process's time outside collect(), running requests, all decodes).
        self.host_times: collections.deque[tuple[float, int, bool]] = collections.deque(maxlen=8192)
        self.step_log: Optional[StepLog] = StepLog() if config.scheduler.record_steps else None
        self._health: dict[str, Any] = {"status": "ok"}
        self._health_checked_at = float("-inf")
        self._lost: Optional[WorkerLostError] = None  # a death that health() found between steps
        self.on_state = on_state
        self.state, self.state_message = "running", ""
        self.restarts = RestartBudget(config.parallel.max_worker_restarts,
                                      config.parallel.worker_restart_window_s)

    def _init_kv_cache(self) -> tuple[int, int]:
        """Size and allocate the workers' KV cache and swap space; (device, CPU) blocks."""
        num_blocks = self.executor.determine_num_available_blocks()
        num_swap_blocks = self.executor.determine_num_swap_blocks()
        self.executor.init_kv_cache(num_blocks, num_swap_blocks)
        return num_blocks, num_swap_blocks

    def _new_block_manager(self, num_blocks: int, num_swap_blocks: int) -> BlockManager:
        c = self.config.cache
        return BlockManager(num_blocks, c.block_size, c.watermark, c.enable_prefix_caching,
                            num_swap_blocks)

    def _resolve_max_model_len(self, kv_capacity: int) -> int:
        requested = self.config.model.max_model_len
        limit = self.arch.max_position_embeddings
        if requested is not None:
            if requested > kv_capacity:
                raise ValueError(f"config key 'max_model_len' = {requested} does not fit in the KV "
                                 f"cache ({kv_capacity} tokens); lower it or give the cache more memory")
            return requested
        if limit > kv_capacity:
            logger.warning("max_model_len capped at the KV cache capacity, %d tokens (the model "
                           "allows %d)", kv_capacity, limit)
        return min(limit, kv_capacity)

    def ready_info(self) -> dict[str, Any]:
        """What a frontend needs to validate requests before it sends them."""
        return {"max_model_len": self.max_model_len, "vocab_size": self.arch.vocab_size,
                "num_kv_blocks": self.stats.num_blocks, "block_size": self.config.cache.block_size,
                "model": self.config.model.model, "load_format": self.config.model.load_format}

    # -- requests --------------------------------------------------------------------------------

    def add_request(self, request: EngineCoreRequest) -> None:
        """Queue a tokenized request; raises ValueError if it cannot be served (the frontend has
        checked it already: this guards the core against a malformed message)."""
        req_id, prompt, params = request.request_id, request.prompt_token_ids, request.sampling_params
        if req_id in self.requests:
            raise ValueError(f"request id {req_id!r} is already in use")
        if not 0 < len(prompt) < self.max_model_len:
            raise ValueError(f"prompt has {len(prompt)} tokens; it must have 1 to "
                             f"{self.max_model_len - 1} (max_model_len {self.max_model_len})")
        vocab = self.arch.vocab_size
        ids = np.concatenate([prompt, request.eos_token_ids,
                              np.asarray(params.stop_token_ids, dtype=np.int64)])
        if ids.min() < 0 or ids.max() >= vocab:
            raise ValueError(f"a token id is outside the vocabulary [0, {vocab})")
        if params.n != 1:
            raise ValueError(f"the frontend fans out n samples; the core takes n = 1, got {params.n}")
        if params.seed is None:
            # Every request gets a seed, so that all TP ranks draw the same tokens.
            params = dataclasses.replace(params, seed=self._seed_rng.getrandbits(63))
        if params.max_tokens is None:  # the frontend resolves it; this keeps the core total
            params = dataclasses.replace(params, max_tokens=self.max_model_len - len(prompt))
        stop_ids = list(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids += [t for t in request.eos_token_ids.tolist() if t not in stop_ids]
        req = Request(req_id, prompt.tolist(), params, stop_ids, request.arrival_time,
                      priority=request.priority, sample_index=request.sample_index)
        self.requests[req_id] = req
        self.scheduler.add_request(req)

    def abort(self, request_ids: list[str]) -> None:
        """End requests at once and free their blocks (unknown or finished ids are ignored)."""
        reqs = [self._retire(r) for r in request_ids if r in self.requests]
        self.scheduler.finish_requests(reqs, RequestStatus.FINISHED_ABORTED)
        for _ in reqs:
            self.metrics.count_finished("abort")

    def _retire(self, req_id: str) -> Request:
        """Forget a request that ends; steps in flight may still carry a token of it."""
        if self.in_flight:
            self.retired[req_id] = self.num_submitted
        return self.requests.pop(req_id)

    def has_work(self) -> bool:
        return self.scheduler.has_unfinished() or self.in_flight > 0 or self._lost is not None

    # -- the step ----------------------------------------------------------------------------------

    def step(self) -> Optional[EngineCoreOutputs]:
        """Collect the oldest step in flight and apply its tokens (None if none was in flight);
        the next step is scheduled and submitted before this returns. If a worker is lost, the
        group is rebuilt here (see `_recover`) and the tokens applied before, if any, returned."""
        outputs: list[EngineCoreOutputs] = []
        try:
            if self._lost is not None:  # a worker found dead between steps (see health)
                raise self._lost
            self._step(outputs)
        except WorkerLostError as e:
            self._recover(e)
        return outputs[0] if outputs else None

    def _step(self, outputs: list[EngineCoreOutputs]) -> None:
        """The step; its outputs go in `outputs` as soon as they are applied, so that a worker
        lost afterwards (at the next submit) cannot lose them."""
        t0 = time.perf_counter()
        logged = self.step_log.cost_s if self.step_log is not None else 0.0
        self._fill_pipeline()
        if not self.in_flight:
            return
        t1 = time.perf_counter()
        runner_output = self.executor.collect()
        t2 = time.perf_counter()
        step_number = self.num_submitted - self.in_flight + 1
        self.in_flight -= 1
        if self.step_log is not None:
            self.step_log.done(t2, len(runner_output.req_ids))
        outputs.append(self._apply(runner_output, step_number))
        if not self.in_flight:
            self.retired.clear()
        self._fill_pipeline()
        last = self.scheduler.last_stats
        host = time.perf_counter() - t2 + t1 - t0
        if self.step_log is not None:  # a benchmark's bookkeeping is not the core's work
            host -= self.step_log.cost_s - logged
        self.host_times.append((host, last.num_running, last.num_prefill_tokens == 0))
        if not self.scheduler.has_unfinished():
            # Steps still in flight carry only finished requests' extra tokens: let them land,
            # so that an idle core holds nothing in the workers.
            while self.in_flight:
                self.executor.collect()
                self.in_flight -= 1

    # -- recovery from a lost worker -------------------------------------------------------------

    def _recover(self, error: WorkerLostError) -> None:
        """Rebuild the worker group (model, KV cache sized again) and preempt every running and
        swapped request by recompute; the steps in flight are discarded (their tokens were never
        applied, so nothing already sent is sent again). Raises EngineDeadError when the restart
        budget is used up, or RuntimeError if the cluster no longer fits the group."""
        self._lost = None
        self._take_restart(error)
        logger.error("worker lost (%s); rebuilding the worker group", error)
        self._set_state("recovering", f"rebuilding the worker group: {error}")
        t0 = time.perf_counter()
        self.in_flight = 0
        self.retired.clear()
        if self.step_log is not None:
            self.step_log.discard_pending()
        while True:
            try:
                self.executor.restart()
                num_blocks, num_swap_blocks = self._init_kv_cache()
                break
            except WorkerLostError as again:  # died again while starting: another restart
                self._take_restart(again)
        capacity = num_blocks * self.config.cache.block_size
        if capacity < self.max_model_len:
            raise EngineDeadError(f"after a worker restart the KV cache holds {capacity} tokens, "
                                  f"fewer than max_model_len ({self.max_model_len})")
        self.block_manager = self._new_block_manager(num_blocks, num_swap_blocks)
        num_preempted = self.scheduler.recompute_all(self.block_manager)
        self.stats.num_blocks = num_blocks
        self.stats.num_preemptions += num_preempted
        self.stats.num_worker_restarts += 1
        logger.warning("worker group rebuilt in %.1f s: %d KV blocks; %d requests to recompute",
                       time.perf_counter() - t0, num_blocks, num_preempted)
        self._set_state("running", "")

    def _take_restart(self, error: WorkerLostError) -> None:
        if not self.restarts.take():
            raise EngineDeadError(f"{error}; not restarting: used up {self.restarts.describe()}") \
                from error

    def _set_state(self, state: str, message: str) -> None:
        self.state, self.state_message = state, message
        self._health_checked_at = float("-inf")  # the next /health asks the new group
        if self.on_state is not None:
            self.on_state(state, message)

    def _fill_pipeline(self) -> None:
        while self.in_flight < self.pipeline_depth and self.scheduler.has_unfinished():
            sched = self.scheduler.schedule()
            if not (sched.total_num_scheduled_tokens or len(sched.blocks_to_swap_out)
                    or sched.finished_req_ids or sched.preempted_req_ids):
                if not self.in_flight:
                    # Nothing fits (cannot happen with a valid config); fail loudly over spinning.
                    s = self.scheduler
                    raise RuntimeError(f"scheduler made no progress: {len(s.running)} running, "
                                       f"{len(s.waiting)} waiting, {len(s.swapped)} swapped")
                return
            self._record(self.scheduler.last_stats)
            if self.step_log is not None:
                self.step_log.submitted(sched, self.requests)
            self.executor.launch(sched)
            self.in_flight += 1
            self.num_submitted += 1

    def _record(self, step: StepStats) -> None:
        s = self.stats
        s.num_steps += 1
        s.num_prefill_tokens += step.num_prefill_tokens
        s.num_decode_tokens += step.num_decode_tokens
        s.num_preemptions += step.num_preemptions
        s.num_cache_hit_tokens += step.num_cache_hit_tokens

    def _apply(self, out: ModelRunnerOutput, step_number: int) -> EngineCoreOutputs:
        """Append each sampled token of step `step_number` to its request and end the requests
        that must stop."""
        now = time.monotonic()
        requests, retired, max_len = self.requests, self.retired, self.max_model_len
        tokens = out.sampled_token_ids.tolist()
        cached, itls, ttfts = [], [], []
        dropped: list[int] = []  # rows of requests that ended while the step ran
        finished: list[FinishedRequest] = []
        logprob_rows: list[tuple[int, int, int]] = []  # (index in the outputs, row in out, top-N)
        for row, req_id in enumerate(out.req_ids):
            req = requests.get(req_id)
            if req is None or (retired and retired.get(req_id, 0) >= step_number):
                dropped.append(row)  # finished or aborted while the step ran: an extra token
                continue
            status = req.append_output_token(tokens[row], max_len)
            last = req.last_token_time
            if last is None:
                ttfts.append(now - req.arrival)
                self.metrics.count_prompt_tokens(req.num_prompt_tokens)
            else:
                itls.append(now - last)
            req.last_token_time = now
            if req.sampling_params.logprobs is not None:
                logprob_rows.append((row - len(dropped), row, req.sampling_params.logprobs))
            cached.append(req.num_cached_prompt_tokens)
            if status is not None:
                finished.append(FinishedRequest(req_id, status.value, req.stop_reason))
                self.scheduler.finish_requests([self._retire(req_id)], status)
        ids, new_tokens = out.req_ids, np.asarray(out.sampled_token_ids, dtype=np.int32)
        if dropped:  # rare: the other rows, as they are
            keep = np.delete(np.arange(len(ids)), dropped)
            ids, new_tokens = [ids[i] for i in keep.tolist()], new_tokens[keep]
        self.metrics.count_tokens(len(ids), ttfts, itls)
        for f in finished:
            self.metrics.count_finished(f.finish_reason)
        logprobs = _logprob_rows(out, logprob_rows) if logprob_rows else None
        return EngineCoreOutputs(ids, new_tokens, np.asarray(cached, dtype=np.int32), finished,
                                 logprobs, out.prompt_logprobs)

    # -- control calls -------------------------------------------------------------------------------

    def call(self, method: str, *args: Any) -> Any:
        """A frontend's control call by name; raises ValueError for an unknown one."""
        handlers = {
            "ready": self.ready_info,
            "health": self.health,
            "stats": lambda: dataclasses.asdict(self.engine_stats()),
            "metrics": self.metrics_snapshot,
            "host_times": self._host_times,
            "step_log": lambda: self.step_log.take() if self.step_log is not None else [],
            "state": lambda: {"state": self.state, "message": self.state_message},
        }
        if method not in handlers:
            raise ValueError(f"unknown engine core call {method!r} (known: {sorted(handlers)})")
        return handlers[method](*args)

    def health(self) -> dict[str, Any]:
        """{"status": "ok"}; {"status": "recovering", "message": why} once a worker is found dead
        (the next step rebuilds the group); {"status": "error", "error": why} if the group failed
        otherwise. The executor is asked at most once per HEALTH_CHECK_INTERVAL_S."""
        now = time.monotonic()
        if now - self._health_checked_at >= HEALTH_CHECK_INTERVAL_S:
            self._health_checked_at = now
            try:
                self.executor.check_health()
                self._health = {"status": "ok"}
            except WorkerLostError as e:  # found idle: the loop rebuilds the group (has_work)
                self._lost = e
                self._health = {"status": "recovering",
                                "message": f"rebuilding the worker group: {e}"}
            except Exception as e:
                self._health = {"status": "error", "error": f"{type(e).__name__}: {e}"}
        return self._health

    def charge_host_time(self, seconds: float) -> None:
        """Add work done for the last step outside step() (sending its outputs) to its host time."""
        if self.host_times:
            host, num_running, decodes = self.host_times[-1]
            self.host_times[-1] = (host + seconds, num_running, decodes)

    def _host_times(self) -> dict[str, list]:
        """Host time per step, (seconds, running requests, all decodes), of the engine core and of
        the workers' launch (rank 0; with a fourth field, the seconds of it spent waiting for the
        GPU, which the first leaves out); rank 0's grammar work per constrained step, (fill seconds,
        accept seconds, constrained rows); and its GPU's per step where it records them, (idle
        seconds before it, busy seconds, requests, all decodes). Cleared as read."""
        core = list(self.host_times)
        self.host_times.clear()
        worker = self.executor.collective_rpc("take_host_times")[0]
        return {"engine_core": core, "worker": worker["launch"], "grammar": worker["grammar"],
                "gpu": worker["gpu"]}

    def engine_stats(self) -> EngineStats:
        s, bm = self.scheduler, self.block_manager
        return dataclasses.replace(self.stats, num_swaps=s.num_swaps, num_running=len(s.running),
                                   num_waiting=len(s.waiting), num_swapped=len(s.swapped),
                                   num_free_blocks=bm.num_free_blocks,
                                   num_used_cpu_blocks=sum(map(len, bm.cpu_block_tables.values())))

    def metrics_snapshot(self) -> dict[str, Any]:
        s = self.scheduler
        self.metrics.set_state(len(s.running), len(s.waiting), self.block_manager.usage)
        return {**self.metrics.snapshot(), "rejected_frames": self.executor.num_rejected_frames}

    def shutdown(self) -> None:
        self.executor.shutdown()


def _logprob_rows(out: ModelRunnerOutput, rows: list[tuple[int, int, int]]) -> LogprobsRows:
    """Log-probabilities of the requests that asked: (index in the outputs, row in the runner's
    output, how many top entries the request wants)."""
    lp = out.logprobs
    top_ids: list[int] = []
    top_lps: list[float] = []
    counts = []
    for _, row, k in rows:
        top_ids += lp.top_ids[row][:k]
        top_lps += lp.top_logprobs[row][:k]
        counts.append(min(k, len(lp.top_ids[row])))
    return LogprobsRows(np.asarray([i for i, _, _ in rows], np.int32),
                        np.asarray([lp.sampled[r] for _, r, _ in rows], np.float32),
                        np.asarray(counts, np.int32), np.asarray(top_ids, np.int32),
                        np.asarray(top_lps, np.float32))


class StepLog:
    """Per step, for benchmarks: when it was submitted and completed, and each scheduled
    request's context (tokens already computed) and new tokens. A step's floor and its time on
    the workers are computed from these."""

    def __init__(self) -> None:
        self.entries: list[list] = []  # [submit_s, done_s, contexts, new_tokens, num_sampled]
        self.pending: collections.deque[list] = collections.deque()
        self.cost_s = 0.0  # host time spent in `submitted`, which the core's host time leaves out

    def submitted(self, sched, requests: dict[str, Request]) -> None:
        start = time.perf_counter()
        new = sched.num_scheduled_tokens.tolist()
        contexts = [requests[r].num_computed_tokens - n for r, n in zip(sched.scheduled_req_ids, new)]
        entry = [start, None, contexts, new, 0]
        self.entries.append(entry)
        self.pending.append(entry)
        self.cost_s += time.perf_counter() - start

    def done(self, when: float, num_sampled: int) -> None:
        entry = self.pending.popleft()
        entry[1], entry[4] = when, num_sampled

    def discard_pending(self) -> None:
        """Forget the steps in flight: they were lost with a worker and never complete."""
        lost = {id(e) for e in self.pending}
        self.entries = [e for e in self.entries if id(e) not in lost]
        self.pending.clear()

    def take(self) -> list[list]:
        """The completed entries so far (removed from the log)."""
        done = [e for e in self.entries if e[1] is not None]
        self.entries = [e for e in self.entries if e[1] is None]
        return done
