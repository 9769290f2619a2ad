"""What the processes say to each other: the frontend and the engine core, the engine core and
the workers. Every message is a dataclass here; `zllm.codec` derives its msgpack encoding from the
fields, so there is no hand-kept field list and no pickle on any wire.

A scheduler output is incremental: a request's prompt, sampling settings and block table travel
once, in `NewRequestData`; afterwards it appears only as a name, its scheduled token count and any
new blocks. Token and block ids travel as int32 arrays (one msgpack extension each), so a step
with hundreds of requests costs a few array copies, not a Python object per number.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from zllm.codec import Float32Array, Int32Array
from zllm.sampling_params import SamplingParams


def _ints(values=()) -> np.ndarray:
    return np.asarray(values, dtype=np.int32)


# -- engine core -> workers ------------------------------------------------------------------------

@dataclass
class NewRequestData:
    """A request the workers have not seen (or must rebuild after preemption)."""

    req_id: str
    prompt_token_ids: Int32Array
    output_token_ids: Int32Array  # non-empty when a preempted request is resumed
    sampling_params: SamplingParams  # seed always set: the engine picks one when the user did not
    stop_token_ids: Int32Array  # masked until min_tokens are generated (EOS included)
    block_ids: Int32Array
    num_computed_tokens: int


@dataclass
class ContinuingRequestData:
    """Requests the workers already hold, in batch order, and the blocks they gained this step:
    block `new_block_ids[j]` is appended to request `req_ids[new_block_owners[j]]`."""

    req_ids: list[str] = field(default_factory=list)
    new_block_owners: Int32Array = field(default_factory=_ints)
    new_block_ids: Int32Array = field(default_factory=_ints)

    def __post_init__(self) -> None:
        owners = self.new_block_owners
        if len(owners) != len(self.new_block_ids):
            raise ValueError(f"{len(owners)} block owners for {len(self.new_block_ids)} new blocks")
        if len(owners) and not (0 <= int(owners.min()) and int(owners.max()) < len(self.req_ids)):
            raise ValueError(f"a new block's owner is outside [0, {len(self.req_ids)})")


@dataclass
class SchedulerOutput:
    """One step: which requests run and how many of their tokens are computed."""

    new_requests: list[NewRequestData]
    continuing_requests: ContinuingRequestData
    # Tokens to compute per request, in batch order: the continuing requests, then the new ones.
    num_scheduled_tokens: Int32Array
    total_num_scheduled_tokens: int
    finished_req_ids: list[str]  # finished or aborted: workers drop their state
    preempted_req_ids: list[str] = field(default_factory=list)  # workers drop it; it comes back new
    # Block copies done before the step's forward, as flat pairs: (device, CPU) out, (CPU, device) in.
    blocks_to_swap_out: Int32Array = field(default_factory=_ints)
    blocks_to_swap_in: Int32Array = field(default_factory=_ints)

    def __post_init__(self) -> None:
        num_reqs = len(self.continuing_requests.req_ids) + len(self.new_requests)
        if len(self.num_scheduled_tokens) != num_reqs:
            raise ValueError(f"{len(self.num_scheduled_tokens)} scheduled token counts for "
                             f"{num_reqs} requests")
        if len(self.blocks_to_swap_out) % 2 or len(self.blocks_to_swap_in) % 2:
            raise ValueError("block swaps must come in (source, destination) pairs")

    @property
    def scheduled_req_ids(self) -> list[str]:
        """Request ids in batch order (aligned with num_scheduled_tokens)."""
        return self.continuing_requests.req_ids + [r.req_id for r in self.new_requests]

    def num_scheduled_by_id(self) -> dict[str, int]:
        return dict(zip(self.scheduled_req_ids, self.num_scheduled_tokens.tolist()))

    @classmethod
    def empty(cls) -> "SchedulerOutput":
        return cls([], ContinuingRequestData(), _ints(), 0, [])


@dataclass
class Logprobs:
    """Per sampled token: its own log-probability and the top-N (ids, log-probabilities)."""

    sampled: list[float]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]


@dataclass
class PromptLogprobs:
    """Log-probabilities of prompt tokens (SamplingParams.prompt_logprobs), from the positions a
    step computed: request_ids[i] gets counts[i] consecutive prompt tokens, from prompt index
    first_indices[i] (>= 1: the first token has nothing before it); per token, its own
    log-probability (`logprobs`) and rank in the vocabulary (1: the likeliest), and num_top[i]
    top (id, log-probability) entries, flat in top_ids / top_logprobs. The same positions may
    come twice (a request recomputed after preemption); the frontend keeps the first."""

    request_ids: list[str]
    first_indices: Int32Array
    counts: Int32Array
    num_top: Int32Array
    logprobs: Float32Array
    ranks: Int32Array
    top_ids: Int32Array
    top_logprobs: Float32Array

    def __post_init__(self) -> None:
        _same_length("first indices", self.first_indices, self.request_ids)
        _same_length("prompt token ranks", self.ranks, self.logprobs)
        _same_length("counts", self.counts, self.request_ids)
        _same_length("top counts", self.num_top, self.request_ids)
        if int(self.counts.sum()) != len(self.logprobs):
            raise ValueError("prompt log-probability counts do not add up to the entries")
        if int((self.counts * self.num_top).sum()) != len(self.top_ids):
            raise ValueError("prompt top counts do not add up to the top entries")
        _same_length("top log-probabilities", self.top_logprobs, self.top_ids)

    def entries(self) -> list[tuple[str, int, list[tuple[float, int, dict[int, float]]]]]:
        """Per request: (id, first prompt index, [(log-probability, rank, {top id: logprob})])."""
        out, pos, top = [], 0, 0
        ids, lps = self.top_ids.tolist(), self.top_logprobs.tolist()
        for req_id, first, count, k in zip(self.request_ids, self.first_indices.tolist(),
                                           self.counts.tolist(), self.num_top.tolist()):
            rows = []
            for lp, rank in zip(self.logprobs[pos:pos + count].tolist(),
                                self.ranks[pos:pos + count].tolist()):
                rows.append((lp, rank, dict(zip(ids[top:top + k], lps[top:top + k]))))
                top += k
            out.append((req_id, first, rows))
            pos += count
        return out

    def select(self, request_ids: set[str]) -> Optional["PromptLogprobs"]:
        """The entries of these requests; None if none."""
        keep = [i for i, r in enumerate(self.request_ids) if r in request_ids]
        if not keep:
            return None
        rows = _flat_entries(self.counts, keep)
        top = _flat_entries(self.counts * self.num_top, keep)
        return PromptLogprobs([self.request_ids[i] for i in keep], self.first_indices[keep],
                              self.counts[keep], self.num_top[keep], self.logprobs[rows],
                              self.ranks[rows], self.top_ids[top], self.top_logprobs[top])


@dataclass
class ModelRunnerOutput:
    """The tokens sampled this step, for requests whose scheduled tokens reached their end."""

    req_ids: list[str]
    sampled_token_ids: Int32Array
    logprobs: Optional[Logprobs] = None  # rows follow req_ids; present if any request asked
    prompt_logprobs: Optional[PromptLogprobs] = None  # of the prompt positions computed

    def __post_init__(self) -> None:
        _same_length("sampled tokens", self.sampled_token_ids, self.req_ids)


@dataclass
class WorkerError:
    """A worker's step failed; travels back in place of a ModelRunnerOutput."""

    rank: int
    message: str


# -- frontend <-> engine core -------------------------------------------------------------------------

@dataclass
class EngineCoreRequest:
    """A tokenized, validated request. The frontend fans `n` out into n requests (`n` is 1 here)
    and gives each a seed when the user did not."""

    request_id: str
    prompt_token_ids: Int32Array
    sampling_params: SamplingParams
    eos_token_ids: Int32Array  # the model's end tokens: a stop unless sampling_params.ignore_eos
    arrival_time: float  # time.monotonic() in the frontend: TTFT counts from here
    priority: int = 0
    sample_index: int = 0  # which of its request's n samples (the queue takes turns by it)


@dataclass
class EngineCoreRequests:
    """Several requests in one message (an offline batch, or one request's n samples): the
    engine core admits them all before its next step. Sent one by one, a batch's first step
    would hold only those that had arrived, and every later step shift by that much."""

    requests: list[EngineCoreRequest]


@dataclass
class EngineCoreAbort:
    request_ids: list[str]


@dataclass
class EngineCoreCall:
    """A control call (`method` of the engine core, e.g. "stats", "health"); answered by an
    EngineCoreReply with the same call_id."""

    call_id: int
    method: str
    args: list[Any] = field(default_factory=list)


@dataclass
class EngineCoreReply:
    call_id: int
    result: Any
    error: Optional[str] = None


@dataclass
class FinishedRequest:
    request_id: str
    finish_reason: str  # "stop" | "length" | "abort" | "error"
    stop_reason: Optional[int] = None  # the stop token id, when one ended it
    message: Optional[str] = None  # why, for "error" (a request the core rejected)


@dataclass
class LogprobsRows:
    """Log-probabilities of some of a step's tokens: row i belongs to request_ids[rows[i]] and has
    counts[i] top entries in the flat top arrays."""

    rows: Int32Array
    sampled: Float32Array
    counts: Int32Array
    top_ids: Int32Array
    top_logprobs: Float32Array

    def select(self, take: np.ndarray) -> Optional["LogprobsRows"]:
        """The rows of the requests at positions `take` (renumbered in that order)."""
        where = {int(r): i for i, r in enumerate(self.rows)}
        keep = [(new, where[int(old)]) for new, old in enumerate(take) if int(old) in where]
        if not keep:
            return None
        picked = [i for _, i in keep]
        top = _flat_entries(self.counts, picked)
        return LogprobsRows(np.asarray([n for n, _ in keep], np.int32), self.sampled[picked],
                            self.counts[picked], self.top_ids[top], self.top_logprobs[top])

    def __post_init__(self) -> None:
        _same_length("sampled log-probabilities", self.sampled, self.rows)
        _same_length("top counts", self.counts, self.rows)
        _same_length("top log-probabilities", self.top_logprobs, self.top_ids)
        if int(self.counts.sum()) != len(self.top_ids) or (len(self.counts) and self.counts.min() < 0):
            raise ValueError("top counts do not add up to the top entries")


@dataclass
class EngineCoreOutputs:
    """One step's news for one frontend: a new token per request in request_ids (aligned with
    new_token_ids and num_cached_tokens), and the requests that ended."""

    request_ids: list[str]
    new_token_ids: Int32Array
    num_cached_tokens: Int32Array  # prompt tokens found in the prefix cache
    finished: list[FinishedRequest] = field(default_factory=list)
    logprobs: Optional[LogprobsRows] = None
    prompt_logprobs: Optional[PromptLogprobs] = None

    def __post_init__(self) -> None:
        _same_length("new tokens", self.new_token_ids, self.request_ids)
        _same_length("cached-token counts", self.num_cached_tokens, self.request_ids)
        rows = self.logprobs.rows if self.logprobs is not None else ()
        if len(rows) and not (0 <= int(rows.min()) and int(rows.max()) < len(self.request_ids)):
            raise ValueError("a log-probability row is outside the step's requests")

    @classmethod
    def only_finished(cls, finished: list[FinishedRequest]) -> "EngineCoreOutputs":
        return cls([], _ints(), _ints(), finished)

    def split_by(self, owners: dict[str, Any]) -> dict[Any, "EngineCoreOutputs"]:
        """The outputs of each owner's requests (owners maps request id -> owner)."""
        rows: dict[Any, list[int]] = {}
        for i, req_id in enumerate(self.request_ids):
            rows.setdefault(owners.get(req_id), []).append(i)
        for f in self.finished:
            rows.setdefault(owners.get(f.request_id), [])
        prompt = self.prompt_logprobs
        for req_id in prompt.request_ids if prompt is not None else ():
            rows.setdefault(owners.get(req_id), [])
        parts = {}
        for owner, idx in rows.items():
            if owner is None:
                continue
            take = np.asarray(idx, dtype=np.int64)
            parts[owner] = EngineCoreOutputs(
                [self.request_ids[i] for i in idx], self.new_token_ids[take],
                self.num_cached_tokens[take],
                [f for f in self.finished if owners.get(f.request_id) == owner],
                self.logprobs.select(take) if self.logprobs is not None else None,
                prompt.select({r for r in prompt.request_ids if owners.get(r) == owner})
                if prompt is not None else None)
        return parts


def _flat_entries(counts: np.ndarray, items: list[int]) -> np.ndarray:
    """Indices, in a flat array where item i owns the next counts[i] entries, of the entries of
    `items` (in that order)."""
    starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    return np.concatenate([np.arange(starts[i], starts[i + 1]) for i in items]).astype(np.int64)


def _same_length(what: str, values, owners) -> None:
    if len(values) != len(owners):
        raise ValueError(f"{len(values)} {what} for {len(owners)} entries")


@dataclass
class EngineStats:
    """The engine core's totals over its life, and the state of its queues and cache now
    (the reply to the "stats" call)."""

    num_steps: int = 0
    num_prefill_tokens: int = 0  # prompt (or recomputed) tokens computed
    num_decode_tokens: int = 0
    num_preemptions: int = 0
    num_swaps: int = 0
    num_cache_hit_tokens: int = 0  # prompt tokens found in the prefix cache
    num_running: int = 0
    num_waiting: int = 0
    num_swapped: int = 0
    num_free_blocks: int = 0
    num_blocks: int = 0
    num_used_cpu_blocks: int = 0  # holding swapped-out requests
    num_worker_restarts: int = 0  # worker groups rebuilt after a rank died or went silent

    def __str__(self) -> str:
        return self.summary()

    def summary(self) -> str:
        return (f"{self.num_steps} steps: {self.num_prefill_tokens} prefill tokens computed, "
                f"{self.num_cache_hit_tokens} prompt tokens from the prefix cache, "
                f"{self.num_decode_tokens} decode tokens, {self.num_preemptions} preemptions")


@dataclass
class EngineCoreDead:
    """The engine core failed (a worker died, say) and is exiting; nothing in flight finishes."""

    message: str


@dataclass
class EngineCoreState:
    """The engine core's state changed: "recovering" (a lost worker group is being rebuilt;
    requests wait, and `message` says why) or "running" again."""

    state: str
    message: str


# The messages each end accepts.
CORE_INPUTS = (EngineCoreRequest, EngineCoreRequests, EngineCoreAbort, EngineCoreCall)
CORE_OUTPUTS = (EngineCoreOutputs, EngineCoreReply, EngineCoreDead, EngineCoreState)
WORKER_REPLIES = (ModelRunnerOutput, WorkerError)
