"""Each step, choose which requests run and how many of their tokens, under the token budget.

There is no separate prefill or decode phase: a request simply has `num_tokens -
num_computed_tokens` tokens left to compute (a whole prompt, a chunk of one, or the one token
sampled last step). Running requests are served first, oldest first; when the KV cache is full
the newest running request is preempted by recompute (its blocks freed, its tokens kept, and it
goes back to the front of the waiting queue). Waiting requests are admitted in arrival order while
budget, `max_num_seqs` and blocks allow.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Iterable

from zllm.config import SchedulerConfig
from zllm.engine.block_manager import BlockManager
from zllm.engine.request import Request, RequestStatus
from zllm.protocol import CachedRequestData, NewRequestData, SchedulerOutput

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # Requests the workers must forget at the next step: finished, aborted or preempted.
        self._dropped_req_ids: list[str] = []
        self.num_preemptions = 0

    def add_request(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        num_scheduled: dict[str, int] = {}
        new_requests: list[NewRequestData] = []
        cached = CachedRequestData()
        preempted = False

        # 1. Running requests, oldest first. Victims are taken from the back of the list, so they
        #    have not been scheduled yet in this step (unless the victim is the request itself).
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            if num_new == 0:
                i += 1
                continue
            while (new_blocks := self.block_manager.allocate_slots(req, num_new)) is None:
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            if new_blocks is None:
                break  # req preempted itself: nothing after it is left in running either
            cached.req_ids.append(req.req_id)
            cached.new_block_ids.append(new_blocks)
            num_scheduled[req.req_id] = num_new
            budget -= num_new
            i += 1

        # 2. Waiting requests, in order, unless this step had to preempt (no room to grow).
        while self.waiting and budget > 0 and not preempted:
            if len(self.running) >= self.config.max_num_seqs:
                break
            req = self.waiting[0]
            remaining = req.num_tokens - req.num_computed_tokens
            num_new = min(remaining, budget)
            if num_new < remaining and not self.config.enable_chunked_prefill:
                break
            if not self.block_manager.can_allocate(req, num_new):
                break
            self.waiting.popleft()
            self.block_manager.allocate_slots(req, num_new)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            new_requests.append(NewRequestData(
                req_id=req.req_id,
                prompt_token_ids=req.prompt_token_ids,
                output_token_ids=req.output_token_ids,
                sampling_params=req.params,
                stop_token_ids=req.stop_token_ids,
                block_ids=list(self.block_manager.block_table(req.req_id)),
                num_computed_tokens=req.num_computed_tokens,
            ))
            num_scheduled[req.req_id] = num_new
            budget -= num_new

        # Progress is counted at scheduling time; a request whose computed tokens reach its
        # length this step gets a sampled token back.
        for req in self.running:
            req.num_computed_tokens += num_scheduled.get(req.req_id, 0)
        dropped, self._dropped_req_ids = self._dropped_req_ids, []
        return SchedulerOutput(new_requests, cached, num_scheduled,
                               self.config.max_num_batched_tokens - budget, dropped)

    def _preempt(self, req: Request) -> None:
        self.block_manager.free(req)
        req.status = RequestStatus.WAITING
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        self._dropped_req_ids.append(req.req_id)
        logger.debug("preempted %s (%d tokens); %d blocks free", req.req_id, req.num_tokens,
                     self.block_manager.num_free_blocks)

    def finish_requests(self, reqs: Iterable[Request], status: RequestStatus) -> None:
        """End requests (stopped, length or aborted) and free their blocks at once."""
        for req in reqs:
            if req.status.finished:
                continue
            if req.status == RequestStatus.RUNNING:
                self.running.remove(req)
                self._dropped_req_ids.append(req.req_id)
            else:  # waiting requests hold no blocks and no worker state
                self.waiting.remove(req)
            req.status = status
            self.block_manager.free(req)
