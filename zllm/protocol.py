"""What the engine and the workers say to each other, and its msgpack encoding.

The engine and the workers share only these dataclasses (and `zllm.config`). A scheduler output
is incremental: a request's prompt, sampling settings and block table travel once, in
`NewRequestData`; afterwards it appears only as a name, its newly scheduled token count and any
new blocks. Workers keep the rest. The encoding is an explicit schema (no pickle, no arbitrary
classes); token and block id lists travel as raw little-endian int32 bytes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import msgpack
import numpy as np

from zllm.sampling_params import SamplingParams

# Fields of SamplingParams that a worker needs to sample; stop strings and the like stay on the
# driver.
WORKER_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "repetition_penalty",
                          "presence_penalty", "frequency_penalty", "min_tokens", "logprobs")


@dataclass
class NewRequestData:
    """A request the workers have not seen (or must rebuild after preemption)."""

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # non-empty when a preempted request is resumed
    sampling_params: SamplingParams  # seed always set: the engine picks one when the user did not
    stop_token_ids: list[int]  # masked until min_tokens are generated (EOS included)
    block_ids: list[int]
    num_computed_tokens: int


@dataclass
class CachedRequestData:
    """Requests the workers already hold: only the blocks added this step."""

    req_ids: list[str] = field(default_factory=list)
    new_block_ids: list[list[int]] = field(default_factory=list)


@dataclass
class SchedulerOutput:
    """One step: which requests run and how many of their tokens are computed."""

    new_requests: list[NewRequestData]
    cached_requests: CachedRequestData
    # Batch order: the cached requests, then the new ones (the encoding sends only the counts).
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    finished_req_ids: list[str]  # finished, aborted or preempted: workers drop their state
    # Block copies done before the step's forward: (device block, CPU block) and back.
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)

    @classmethod
    def empty(cls) -> "SchedulerOutput":
        return cls([], CachedRequestData(), {}, 0, [])


@dataclass
class Logprobs:
    """Per sampled token: its own log-probability and the top-N (ids, log-probabilities)."""

    sampled: list[float]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]


@dataclass
class ModelRunnerOutput:
    """The tokens sampled this step, for requests whose scheduled tokens reached their end."""

    req_ids: list[str]
    sampled_token_ids: list[int]
    logprobs: Optional[Logprobs] = None  # rows follow req_ids; present if any request asked


# ---------------------------------------------------------------------------------------------
# Encoding. Each message is [kind, fields...] with a fixed field order.

_IDS = 1  # msgpack ext type: int32 array


def _ids(values: list[int]) -> msgpack.ExtType:
    return msgpack.ExtType(_IDS, np.asarray(values, dtype="<i4").tobytes())


def _ext_hook(code: int, data: bytes) -> Any:
    if code != _IDS:
        raise ValueError(f"unknown msgpack ext type {code}")
    return np.frombuffer(data, dtype="<i4").tolist()


def encode_scheduler_output(out: SchedulerOutput) -> bytes:
    new = [
        [r.req_id, _ids(r.prompt_token_ids), _ids(r.output_token_ids),
         [getattr(r.sampling_params, f) for f in WORKER_SAMPLING_FIELDS],
         _ids(r.stop_token_ids), _ids(r.block_ids), r.num_computed_tokens]
        for r in out.new_requests
    ]
    # New blocks of cached requests travel as two flat arrays, (owner position, block id): in a
    # decode step only the few requests that cross a block boundary get one, and one array per
    # request would cost more than the rest of the message at hundreds of requests.
    cached_ids = out.cached_requests.req_ids
    owners: list[int] = []
    flat: list[int] = []
    for i, blocks in enumerate(out.cached_requests.new_block_ids):
        if blocks:
            owners += [i] * len(blocks)
            flat += blocks
    cached = [cached_ids, _ids(owners), _ids(flat)]
    # Token counts in batch order, which is cached requests then new ones: the names are not
    # sent twice.
    num = out.num_scheduled_tokens
    if len(num) != len(cached_ids) + len(out.new_requests):
        raise ValueError("num_scheduled_tokens must name exactly the cached and new requests")
    scheduled = _ids([num[r] for r in cached_ids] + [num[r.req_id] for r in out.new_requests])
    swaps = [_ids([b for pair in out.blocks_to_swap_out for b in pair]),
             _ids([b for pair in out.blocks_to_swap_in for b in pair])]
    return msgpack.packb(["sched", new, cached, scheduled, out.total_num_scheduled_tokens,
                          out.finished_req_ids, swaps])


def decode_scheduler_output(data: bytes) -> SchedulerOutput:
    kind, new, cached, scheduled, total, finished, swaps = _unpack(data, "sched", 7)
    try:
        new_requests = []
        for req_id, prompt, output, sampling, stop_ids, blocks, computed in new:
            params = SamplingParams(**dict(zip(WORKER_SAMPLING_FIELDS, sampling)))
            new_requests.append(NewRequestData(req_id, prompt, output, params, stop_ids, blocks,
                                               computed))
        cached_ids, owners, flat_blocks = cached
        names = list(cached_ids) + [r.req_id for r in new_requests]
        if len(names) != len(scheduled) or len(owners) != len(flat_blocks):
            raise ValueError("mismatched list lengths")
        new_block_ids: list[list[int]] = [[] for _ in cached_ids]
        for owner, block in zip(owners, flat_blocks):
            if not 0 <= owner < len(cached_ids):
                raise ValueError(f"block owner {owner} out of range")
            new_block_ids[owner].append(block)
        swap_out, swap_in = (list(zip(flat[0::2], flat[1::2])) for flat in swaps)
    except (TypeError, ValueError) as e:  # a field of the wrong shape or type
        raise ValueError(f"malformed sched message: {e}") from e
    return SchedulerOutput(new_requests, CachedRequestData(cached_ids, new_block_ids),
                           dict(zip(names, scheduled)), total, finished, swap_out, swap_in)


def encode_model_runner_output(out: ModelRunnerOutput) -> bytes:
    lp = None if out.logprobs is None else dataclasses.astuple(out.logprobs)
    return msgpack.packb(["output", out.req_ids, _ids(out.sampled_token_ids), lp])


def decode_model_runner_output(data: bytes) -> ModelRunnerOutput:
    return _model_runner_output(_unpack(data, "output", 4))


def _model_runner_output(msg: list[Any]) -> ModelRunnerOutput:
    _, req_ids, sampled, lp = msg
    if not isinstance(req_ids, list) or len(req_ids) != len(sampled):
        raise ValueError("malformed output message: req_ids and sampled tokens differ in length")
    return ModelRunnerOutput(req_ids, sampled, None if lp is None else Logprobs(*lp))


@dataclass
class WorkerError:
    """A worker's step failed; travels back in place of a ModelRunnerOutput."""

    rank: int
    message: str


def encode_worker_error(err: WorkerError) -> bytes:
    return msgpack.packb(["error", err.rank, err.message])


def decode_worker_reply(data: bytes) -> ModelRunnerOutput | WorkerError:
    """A worker's answer to one step: its output, or the error that stopped it."""
    try:
        msg = msgpack.unpackb(data, ext_hook=_ext_hook, strict_map_key=False)
    except Exception as e:  # msgpack raises several types for truncated or bad data
        raise ValueError(f"malformed worker reply: {e}") from e
    if isinstance(msg, list) and len(msg) == 3 and msg[0] == "error":
        return WorkerError(msg[1], msg[2])
    if not isinstance(msg, list) or len(msg) != 4 or msg[0] != "output":
        raise ValueError("malformed worker reply: expected an 'output' or 'error' message")
    return _model_runner_output(msg)


def _unpack(data: bytes, kind: str, length: int) -> list[Any]:
    """Unpack one message and check its kind and shape; anything else raises ValueError."""
    try:
        msg = msgpack.unpackb(data, ext_hook=_ext_hook, strict_map_key=False)
    except Exception as e:  # msgpack raises several types for truncated or bad data
        raise ValueError(f"malformed {kind} message: {e}") from e
    if not isinstance(msg, list) or len(msg) != length or msg[0] != kind:
        raise ValueError(f"malformed {kind} message: expected a list of {length} starting with {kind!r}")
    return msg
