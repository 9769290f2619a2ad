"""A request as the engine tracks it: tokens, progress, blocks and how it ended."""

from __future__ import annotations

import enum
from typing import Optional

from zllm.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"  # preempted with its KV blocks copied to CPU memory
    FINISHED_STOPPED = "stop"  # EOS or a stop token id (stop strings end requests in the frontend)
    FINISHED_LENGTH = "length"  # max_tokens or max_model_len
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset({RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                       RequestStatus.FINISHED_ABORTED})


class Request:
    """One sequence being generated (the frontend fans a request's n samples out into n).

    `num_computed_tokens` counts tokens whose K/V sit in the cache. A request needs more compute
    while `num_computed_tokens < num_tokens + num_pending_tokens`; when a step brings it there,
    the worker samples its next token. `num_pending_tokens` counts tokens sampled by steps whose
    results the engine has not applied yet (with async scheduling, up to 1 +
    async_steps_ahead; the workers already hold them, so the next step can compute them).
    """

    def __init__(self, req_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 stop_token_ids: list[int], arrival: float, priority: int = 0,
                 sample_index: int = 0) -> None:
        self.req_id = req_id
        self.prompt_token_ids = prompt_token_ids
        self.output_token_ids: list[int] = []
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_tokens = self.num_prompt_tokens  # prompt + output, kept as tokens arrive
        self.sampling_params = params
        # Its length at max_tokens (the core resolves a max_tokens of None before this).
        self.max_num_tokens = self.num_prompt_tokens + params.max_tokens
        self.stop_token_ids = stop_token_ids  # EOS (unless ignore_eos) and params.stop_token_ids
        self._stop_set = frozenset(stop_token_ids)
        self.arrival = arrival
        self.waiting_since = arrival  # arrival, or the last preemption (starvation counts from it)
        self.priority = priority
        self.sample_index = sample_index  # which of its request's n samples this is
        self.turn = sample_index  # its place in the queue's rounds (the scheduler sets it)
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_pending_tokens = 0
        self.block_hashes: list[int] = []  # chained hashes of full blocks, filled as needed
        self.num_cached_blocks = 0  # leading blocks of its table registered in the prefix cache
        self.num_preemptions = 0
        self.stop_reason: Optional[int] = None  # the stop token that ended it
        self.num_cached_prompt_tokens = 0  # found in the prefix cache when first admitted
        self.last_token_time: Optional[float] = None  # when the engine got its latest token

    # -- progress outside the step: admission, preemption, a lost worker group ---------------
    # (Each step's advance is the scheduler's `_advance`, one loop over the step's requests
    # with no call per request: it runs for every running request at every step, where a
    # method and a property per request cost ~35 µs at 256 requests on the CI CPU.)

    def start_from_cache(self, num_cached_blocks: int, block_size: int) -> None:
        """Admitted with its first num_cached_blocks blocks found in the prefix cache."""
        self.num_cached_blocks = num_cached_blocks
        self.num_computed_tokens = num_cached_blocks * block_size

    def preempt(self, now: float, swapped: bool) -> None:
        """Out of the running batch: swapped (its K/V kept in CPU memory), or to be computed
        again from its first token."""
        self.num_preemptions += 1
        self.waiting_since = now
        self.status = RequestStatus.SWAPPED if swapped else RequestStatus.WAITING
        if not swapped:
            self.num_computed_tokens = 0

    def forget_progress(self) -> None:
        """Nothing of it is in any KV cache, and no sampled token of it is on its way (the
        workers that held them were lost)."""
        self.num_computed_tokens = 0
        self.num_pending_tokens = 0
        self.num_cached_blocks = 0

    def append_output_token(self, token: int, max_model_len: int) -> Optional[RequestStatus]:
        """Take the token a step sampled; returns how the request ends, if it must stop now."""
        self.num_pending_tokens -= 1
        self.output_token_ids.append(token)
        self.num_tokens += 1
        # The set first: it rules out almost every token in one test.
        if token in self._stop_set and \
                self.num_tokens - self.num_prompt_tokens >= self.sampling_params.min_tokens:
            self.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        if self.num_tokens >= self.max_num_tokens or self.num_tokens >= max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def token_ids_between(self, start: int, end: int) -> tuple[int, ...]:
        """Token ids start..end-1 of prompt + output, without joining the two lists (a block's
        worth, at every block boundary a decode crosses: joining would cost the whole length)."""
        p = self.num_prompt_tokens
        if end <= p:
            return tuple(self.prompt_token_ids[start:end])
        if start >= p:
            return tuple(self.output_token_ids[start - p:end - p])
        return tuple(self.prompt_token_ids[start:]) + tuple(self.output_token_ids[:end - p])

    def __repr__(self) -> str:
        return (f"Request({self.req_id}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens})")
