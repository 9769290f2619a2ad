"""Each step, choose which requests run and how many of their tokens, under the token budget.

There is no separate prefill or decode phase: a request simply has `num_tokens -
num_computed_tokens` tokens left to compute (a whole prompt, a chunk of one, or the one token
sampled last step). So chunked prefill is the natural case: a long prompt takes what budget is
left, over as many steps as it needs.

1. Running requests are served first, in order (arrival, or priority then arrival), so the
   decodes of requests admitted earlier are never delayed by a newcomer's long prompt. When the
   KV cache is full, the running request that comes last in that order is preempted. By
   recompute (default): its blocks are freed (they stay in the prefix cache), its tokens are
   kept, and it goes back to the waiting queue at the place its order gives it. By swap
   (`preemption_mode: swap`, when CPU blocks are free): its blocks are copied to CPU memory and
   it waits in the swapped queue, to be copied back later with its progress intact.
2. Swapped requests come back first, then waiting requests are admitted, in order, while
   budget, `max_num_seqs` and blocks allow, each starting from the longest prefix of its prompt
   found in the prefix cache. Nothing is admitted in a step that had to preempt.

Policies: "fcfs" orders by arrival; "priority" by (priority, arrival), lower priority value
first. A request waiting longer than `starvation_timeout_s` is served as if it had the best
priority, so low priorities are delayed, never starved.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Iterable

from zllm.config import SchedulerConfig
from zllm.engine.block_manager import BlockManager
from zllm.engine.request import Request, RequestStatus
import numpy as np

from zllm.protocol import CachedRequestData, NewRequestData, SchedulerOutput

logger = logging.getLogger(__name__)


@dataclass
class StepStats:
    """What one scheduled step contained."""

    num_prefill_tokens: int = 0  # prompt (or recomputed) tokens
    num_decode_tokens: int = 0  # one per request generating its next token
    num_preemptions: int = 0
    num_cache_hit_tokens: int = 0  # prompt tokens found in the prefix cache at admission
    num_running: int = 0
    num_waiting: int = 0


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager,
                 preemption_mode: str = "recompute") -> None:
        self.config = config
        self.block_manager = block_manager
        self.preemption_mode = preemption_mode
        self.waiting: list[Request] = []  # kept in service order
        self.running: list[Request] = []  # kept in service order
        self.swapped: list[Request] = []  # kept in service order
        self._swap_out: list[int] = []  # flat (device block, CPU block) pairs
        self.num_swaps = 0
        # Requests the workers must forget at the next step.
        self._finished_req_ids: list[str] = []  # finished or aborted
        self._preempted_req_ids: list[str] = []
        self.num_preemptions = 0
        self.last_stats = StepStats()

    def _order(self, req: Request, now: float) -> tuple:
        if self.config.policy == "fcfs":
            return (0, req.arrival)
        starving = now - req.arrival > self.config.starvation_timeout_s
        return (float("-inf") if starving else req.priority, req.arrival)

    def _insert(self, queue: list[Request], req: Request, now: float) -> None:
        key = self._order(req, now)
        i = len(queue)
        while i > 0 and self._order(queue[i - 1], now) > key:
            i -= 1
        queue.insert(i, req)

    def add_request(self, req: Request) -> None:
        self._insert(self.waiting, req, time.monotonic())

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def _chunk(self, remaining: int, budget: int) -> int:
        """Tokens to compute this step out of `remaining`: capped by the budget and, for long
        prefills, by long_prefill_token_threshold."""
        threshold = self.config.long_prefill_token_threshold
        return min(remaining, budget, threshold) if threshold > 0 else min(remaining, budget)

    def schedule(self) -> SchedulerOutput:
        now = time.monotonic()
        if self.config.policy == "priority":
            for queue in (self.running, self.swapped, self.waiting):
                queue.sort(key=lambda r: self._order(r, now))
        budget = self.config.max_num_batched_tokens
        num_scheduled: dict[str, int] = {}
        new_requests: list[NewRequestData] = []
        cached_ids: list[str] = []
        block_owners: list[int] = []
        new_blocks_flat: list[int] = []
        stats = StepStats()

        # 1. Running requests. Victims come from the back of the list, so they have not been
        #    scheduled in this step (unless the victim is the request itself).
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = self._chunk(req.num_tokens_to_compute, budget)
            if num_new == 0:
                i += 1
                continue
            while (new_blocks := self.block_manager.allocate_slots(req, num_new)) is None:
                victim = self.running.pop()
                self._preempt(victim, now)
                stats.num_preemptions += 1
                if victim is req:
                    break
            if new_blocks is None:
                break  # req preempted itself: nothing after it is left in running either
            if new_blocks:
                block_owners += [len(cached_ids)] * len(new_blocks)
                new_blocks_flat += new_blocks
            cached_ids.append(req.req_id)
            num_scheduled[req.req_id] = num_new
            budget -= num_new
            i += 1

        # 2. Swapped, then waiting requests, in order, unless this step had to preempt.
        swap_in: list[int] = []  # flat (CPU block, device block) pairs
        while self.swapped and budget > 0 and not stats.num_preemptions:
            req = self.swapped[0]
            if req.num_pending_tokens:
                break  # swapped out while its last token was on its way: wait for it
            num_new = self._chunk(req.num_tokens_to_compute, budget)
            if (len(self.running) >= self.config.max_num_seqs
                    or not self.block_manager.can_swap_in(req, num_new)):
                break
            self.swapped.pop(0)
            swap_in += self.block_manager.swap_in(req)
            self._start(req, num_new, new_requests, num_scheduled)
            budget -= num_new
        while self.waiting and budget > 0 and not stats.num_preemptions and not self.swapped:
            if len(self.running) >= self.config.max_num_seqs:
                break
            req = self.waiting[0]
            if req.num_pending_tokens:
                break  # preempted while its last token was on its way: wait for it
            prefix = self.block_manager.find_cached_prefix(req)
            remaining = req.num_tokens - len(prefix) * self.block_manager.block_size
            num_new = self._chunk(remaining, budget)
            if num_new < remaining and not self.config.enable_chunked_prefill:
                break
            if not self.block_manager.can_admit(req, prefix, num_new):
                break
            self.waiting.pop(0)
            self.block_manager.admit(req, prefix)
            stats.num_cache_hit_tokens += req.num_computed_tokens
            if not req.num_preemptions:  # what usage reports as the prompt's cached tokens
                req.num_cached_prompt_tokens = req.num_computed_tokens
            self._start(req, num_new, new_requests, num_scheduled)
            budget -= num_new

        # Progress is counted at scheduling time; a request whose computed tokens reach its
        # length this step gets a sampled token back (pending until the engine processes it).
        # Blocks it filled join the prefix cache.
        for req in self.running:
            num_new = num_scheduled.get(req.req_id, 0)
            if num_new == 0:
                continue
            is_decode = num_new == 1 and req.num_computed_tokens >= len(req.prompt_token_ids)
            if is_decode:
                stats.num_decode_tokens += 1
            else:
                stats.num_prefill_tokens += num_new
            req.num_computed_tokens += num_new
            if req.num_tokens_to_compute == 0:
                req.num_pending_tokens += 1
            self.block_manager.cache_full_blocks(req)
        stats.num_running, stats.num_waiting = len(self.running), len(self.waiting)
        self.last_stats = stats
        finished, self._finished_req_ids = self._finished_req_ids, []
        preempted, self._preempted_req_ids = self._preempted_req_ids, []
        swap_out, self._swap_out = self._swap_out, []
        batch_order = cached_ids + [r.req_id for r in new_requests]
        cached = CachedRequestData(cached_ids, np.asarray(block_owners, dtype=np.int32),
                                   np.asarray(new_blocks_flat, dtype=np.int32))
        return SchedulerOutput(new_requests, cached,
                               np.fromiter((num_scheduled[r] for r in batch_order), np.int32,
                                           len(batch_order)),
                               self.config.max_num_batched_tokens - budget, finished, preempted,
                               np.asarray(swap_out, dtype=np.int32), np.asarray(swap_in, dtype=np.int32))

    def _start(self, req: Request, num_new: int, new_requests: list[NewRequestData],
               num_scheduled: dict[str, int]) -> None:
        """Make req running with num_new tokens this step; the workers get it in full."""
        self.block_manager.allocate_slots(req, num_new)
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        new_requests.append(NewRequestData(
            req_id=req.req_id,
            prompt_token_ids=np.asarray(req.prompt_token_ids, dtype=np.int32),
            output_token_ids=np.asarray(req.output_token_ids, dtype=np.int32),
            sampling_params=req.params,
            stop_token_ids=np.asarray(req.stop_token_ids, dtype=np.int32),
            block_ids=np.asarray(self.block_manager.block_table(req.req_id), dtype=np.int32),
            num_computed_tokens=req.num_computed_tokens,
        ))
        num_scheduled[req.req_id] = num_new

    def _preempt(self, req: Request, now: float) -> None:
        req.num_preemptions += 1
        self.num_preemptions += 1
        self._preempted_req_ids.append(req.req_id)  # swapped or not, workers rebuild it later
        if self.preemption_mode == "swap" and self.block_manager.can_swap_out(req):
            self._swap_out += self.block_manager.swap_out(req)
            req.status = RequestStatus.SWAPPED
            self.num_swaps += 1
            self._insert(self.swapped, req, now)
            return
        self.block_manager.free(req)
        req.status = RequestStatus.WAITING
        req.num_computed_tokens = 0
        self._insert(self.waiting, req, now)
        logger.debug("preempted %s (%d tokens); %d blocks free", req.req_id, req.num_tokens,
                     self.block_manager.num_free_blocks)

    def finish_requests(self, reqs: Iterable[Request], status: RequestStatus) -> None:
        """End requests (stopped, length or aborted) and free their blocks at once."""
        for req in reqs:
            if req.status.finished:
                continue
            if req.status == RequestStatus.RUNNING:
                self.running.remove(req)
                self._finished_req_ids.append(req.req_id)
            elif req.status == RequestStatus.SWAPPED:
                self.swapped.remove(req)
                self.block_manager.free_swapped(req)
            else:  # waiting requests hold no blocks and no worker state
                self.waiting.remove(req)
            req.status = status
            self.block_manager.free(req)
