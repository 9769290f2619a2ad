"""Each step, choose which requests run and how many of their tokens, under the token budget.

There is no separate prefill or decode phase: a request simply has `num_tokens -
num_computed_tokens` tokens left to compute (a whole prompt, a chunk of one, or the one token
sampled last step). So chunked prefill is the natural case: a long prompt takes what budget is
left, over as many steps as it needs.

1. Running requests are served first, in order, so the decodes of requests admitted earlier are
   never delayed by a newcomer's long prompt. When the KV cache is full, the running request
   that comes last in that order is preempted. By recompute (default): its blocks are freed
   (they stay in the prefix cache), its tokens are kept, and it goes back to the waiting queue
   at the place its order gives it. By swap (`preemption_mode: swap`, when CPU blocks are free):
   its blocks are copied to CPU memory and it waits in the swapped queue, to be copied back
   later with its progress intact.
2. Swapped requests come back first, then waiting requests are admitted, in order, while
   budget, `max_num_seqs` and blocks allow, each starting from the longest prefix of its prompt
   found in the prefix cache. Nothing is admitted in a step that had to preempt.

The order is the queue policy's (zllm/engine/request_queue.py). A decode step costs a few
attribute updates per running request; blocks are touched only when a request crosses a block
boundary.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np

from zllm.config import SchedulerConfig
from zllm.engine.block_manager import BlockManager
from zllm.engine.request import Request, RequestStatus
from zllm.engine.request_queue import RequestQueue
from zllm.protocol import ContinuingRequestData, NewRequestData, SchedulerOutput

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


@dataclass
class _Step:
    """The step being built."""

    budget: int
    # Requests in batch order (the running ones, then the started ones) and their tokens.
    scheduled: list[Request] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    num_continuing: int = 0  # the running ones
    block_owners: list[int] = field(default_factory=list)  # new blocks: index in scheduled
    new_blocks: list[int] = field(default_factory=list)
    new_requests: list[NewRequestData] = field(default_factory=list)
    swap_in: list[int] = field(default_factory=list)  # flat (CPU block, device block) pairs
    stats: StepStats = field(default_factory=StepStats)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager,
                 preemption_mode: str = "recompute") -> None:
        self.config = config
        self.block_manager = block_manager
        self.preemption_mode = preemption_mode
        self.waiting = RequestQueue(config, waiting=True)
        self.running = RequestQueue(config, waiting=False)
        self.swapped = RequestQueue(config, waiting=True)
        self._swap_out: list[int] = []  # flat (device block, CPU block) pairs
        self.num_swaps = 0
        # Requests the workers must forget at the next step.
        self._finished_req_ids: list[str] = []  # finished or aborted
        self._preempted_req_ids: list[str] = []
        self.num_preemptions = 0
        self.num_admitted = 0  # requests admitted for the first time: the clock of turns
        self.last_stats = StepStats()

    def add_request(self, req: Request) -> None:
        # Samples take turns with other requests: sample i of a request arriving after k
        # admissions queues as if it came after k + i of them, so a request with a large n
        # cannot hold every later request back until all of its samples have run.
        req.turn = self.num_admitted + req.sample_index
        self.waiting.add(req, time.monotonic())

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def _chunk(self, remaining: int, budget: int) -> int:
        """Tokens to compute this step out of `remaining`: capped by the budget and, for long
        prefills, by long_prefill_token_threshold."""
        threshold = self.config.long_prefill_token_threshold
        return min(remaining, budget, threshold) if threshold > 0 else min(remaining, budget)

    def schedule(self) -> SchedulerOutput:
        now = time.monotonic()
        for queue in (self.running, self.swapped, self.waiting):
            queue.reorder(now)
        step = _Step(budget=self.config.max_num_batched_tokens)
        self._schedule_running(step, now)
        if not step.stats.num_preemptions:
            self._schedule_swapped(step)
            if not self.swapped:
                self._schedule_waiting(step)
        self._advance(step)
        return self._output(step)

    # -- the three phases ----------------------------------------------------------------------------

    def _schedule_running(self, step: _Step, now: float) -> None:
        """Every running request that has tokens to compute, in order, while budget lasts."""
        bs = self.block_manager.block_size
        tables = self.block_manager.block_tables
        threshold = self.config.long_prefill_token_threshold
        budget = step.budget
        scheduled, counts = step.scheduled, step.counts
        # A preemption pops requests off the back of the list, which the loop has not reached.
        for req in self.running.items:
            if budget <= 0:
                break
            num_tokens, num_pending = req.num_tokens, req.num_pending_tokens
            if num_pending and num_tokens + num_pending >= req.max_num_tokens:
                continue  # its last token is on its way: computing it would sample one to drop
            num_new = num_tokens + num_pending - req.num_computed_tokens
            if num_new > budget or (threshold and num_new > threshold):
                num_new = self._chunk(num_new, budget)
            if num_new == 0:
                continue
            if req.num_computed_tokens + num_new > len(tables[req.req_id]) * bs:
                new_blocks = self._allocate_or_preempt(req, num_new, step, now)
                if new_blocks is None:
                    break  # req preempted itself: nothing after it is left in running either
                step.block_owners += [len(scheduled)] * len(new_blocks)
                step.new_blocks += new_blocks
            scheduled.append(req)
            counts.append(num_new)
            budget -= num_new
        step.budget = budget
        step.num_continuing = len(scheduled)

    def _schedule_swapped(self, step: _Step) -> None:
        """Swapped requests come back, in order, while budget, max_num_seqs and blocks allow."""
        while self.swapped and step.budget > 0:
            req = self.swapped[0]
            if req.num_pending_tokens:
                break  # swapped out while its last token was on its way: wait for it
            num_new = self._chunk(req.num_tokens - req.num_computed_tokens, step.budget)
            if (len(self.running) >= self.config.max_num_seqs
                    or not self.block_manager.can_swap_in(req, num_new)):
                break
            self.swapped.pop(0)
            step.swap_in += self.block_manager.swap_in(req)
            self._start(req, num_new, step)

    def _schedule_waiting(self, step: _Step) -> None:
        """Waiting requests are admitted, in order, each from its longest cached prefix."""
        bm = self.block_manager
        while self.waiting and step.budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if req.num_pending_tokens:
                break  # preempted while its last token was on its way: wait for it
            prefix = bm.find_cached_prefix(req)
            remaining = req.num_tokens - len(prefix) * bm.block_size
            num_new = self._chunk(remaining, step.budget)
            if num_new < remaining and not self.config.enable_chunked_prefill:
                break
            if not bm.can_admit(req, prefix, num_new):
                break
            self.waiting.pop(0)
            if not req.num_preemptions:
                self.num_admitted += 1
            bm.admit(req, prefix)
            step.stats.num_cache_hit_tokens += req.num_computed_tokens
            if not req.num_preemptions:  # what usage reports as the prompt's cached tokens
                req.num_cached_prompt_tokens = req.num_computed_tokens
            self._start(req, num_new, step)

    # -- pieces --------------------------------------------------------------------------------------------

    def _allocate_or_preempt(self, req: Request, num_new: int, step: _Step,
                             now: float) -> Optional[list[int]]:
        """New blocks for req, preempting from the back of the running queue until they fit;
        None if req itself had to go. Victims come from the back, so none has been scheduled
        in this step."""
        while (new_blocks := self.block_manager.allocate_slots(req, num_new)) is None:
            victim = self.running.pop()
            self._preempt(victim, now)
            step.stats.num_preemptions += 1
            if victim is req:
                return None
        return new_blocks

    def _advance(self, step: _Step) -> None:
        """Count the step's scheduled tokens as computed, once every phase has chosen (so no
        request admitted in this step counts on blocks that others fill in it). A request whose
        computed tokens reach its length gets a sampled token back (pending until the engine
        applies it). One loop with no call per request: it runs for every running request at
        every step."""
        bm = self.block_manager
        bs, caching = bm.block_size, bm.enable_prefix_caching
        num_decode = 0
        for req, num_new in zip(step.scheduled, step.counts):
            num_computed, num_tokens = req.num_computed_tokens, req.num_tokens
            if num_new == 1 and num_computed >= req.num_prompt_tokens:
                num_decode += 1
            num_computed += num_new
            req.num_computed_tokens = num_computed
            if num_computed == num_tokens + req.num_pending_tokens:
                req.num_pending_tokens += 1
            # Blocks full of known tokens join the prefix cache (min() is written out: a call
            # of it costs as much as the rest of this line).
            known = num_tokens if num_computed > num_tokens else num_computed
            if caching and known // bs > req.num_cached_blocks:
                bm.cache_full_blocks(req)
        num_tokens = self.config.max_num_batched_tokens - step.budget
        step.stats.num_decode_tokens += num_decode
        step.stats.num_prefill_tokens += num_tokens - num_decode

    def _start(self, req: Request, num_new: int, step: _Step) -> None:
        """Make req running with num_new tokens this step; the workers get it in full."""
        self.block_manager.allocate_slots(req, num_new)
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        step.new_requests.append(NewRequestData(
            req_id=req.req_id,
            prompt_token_ids=np.asarray(req.prompt_token_ids, dtype=np.int32),
            output_token_ids=np.asarray(req.output_token_ids, dtype=np.int32),
            sampling_params=req.sampling_params,
            stop_token_ids=np.asarray(req.stop_token_ids, dtype=np.int32),
            block_ids=np.asarray(self.block_manager.block_table(req.req_id), dtype=np.int32),
            num_computed_tokens=req.num_computed_tokens,
        ))
        step.scheduled.append(req)
        step.counts.append(num_new)
        step.budget -= num_new

    def _output(self, step: _Step) -> SchedulerOutput:
        stats = step.stats
        stats.num_running, stats.num_waiting = len(self.running), len(self.waiting)
        self.last_stats = stats
        finished, self._finished_req_ids = self._finished_req_ids, []
        preempted, self._preempted_req_ids = self._preempted_req_ids, []
        swap_out, self._swap_out = self._swap_out, []
        continuing_ids = [req.req_id for req in step.scheduled[:step.num_continuing]]
        continuing = ContinuingRequestData(continuing_ids,
                                           np.asarray(step.block_owners, dtype=np.int32),
                                           np.asarray(step.new_blocks, dtype=np.int32))
        return SchedulerOutput(step.new_requests, continuing,
                               np.asarray(step.counts, dtype=np.int32),
                               self.config.max_num_batched_tokens - step.budget, finished,
                               preempted, np.asarray(swap_out, dtype=np.int32),
                               np.asarray(step.swap_in, dtype=np.int32))

    def _preempt(self, req: Request, now: float) -> None:
        self.num_preemptions += 1
        self._preempted_req_ids.append(req.req_id)  # swapped or not, workers rebuild it later
        swap = self.preemption_mode == "swap" and self.block_manager.can_swap_out(req)
        req.preempt(now, swapped=swap)
        if swap:
            self._swap_out += self.block_manager.swap_out(req)
            self.num_swaps += 1
            self.swapped.add(req, now)
            return
        self.block_manager.free(req)
        self.waiting.add(req, now)
        logger.debug("preempted %s (%d tokens); %d blocks free", req.req_id, req.num_tokens,
                     self.block_manager.num_free_blocks)

    def recompute_all(self, block_manager: BlockManager) -> int:
        """The workers were rebuilt, with a new (empty) KV cache and swap space: take
        `block_manager` for it, and preempt every running and swapped request by recompute
        (their prompt and generated tokens are computed again). Waiting requests keep their
        places. Whatever the old workers were still to be told is moot. Returns how many requests
        were preempted."""
        now = time.monotonic()
        victims = list(self.running) + list(self.swapped)
        self.running.items.clear()
        self.swapped.items.clear()
        self.block_manager = block_manager
        self._swap_out, self._finished_req_ids, self._preempted_req_ids = [], [], []
        for req in self.waiting:
            req.forget_progress()  # a waiting request may still expect a token of a lost step
        for req in victims:
            req.forget_progress()
            req.preempt(now, swapped=False)
            self.waiting.add(req, now)
        self.num_preemptions += len(victims)
        return len(victims)

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

