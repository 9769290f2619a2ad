"""The worker's persistent batch: every request it holds, as rows of preallocated arrays.

The scheduler sends deltas: new requests in full, new blocks as (owner, block) arrays, the names
of finished and preempted requests. `update` applies them in place. A request keeps one slot (a
row of every array: token history, block table, progress, sampling settings) from arrival to
removal, so removing one moves nothing and the slots named by steps still in flight stay valid.
A step's requests are gathered by slot in the scheduler's batch order; that order is kept from
step to step, so a steady batch (the same requests, some finished, some new at the end) is
matched with one list comparison and no per-request Python.

`prepare` turns a step into flat model inputs (token ids, positions, K/V slots, the attention
layout, which requests sample) with vectorized numpy. A token sampled by a launched step reaches
the host later (`append_sampled`); until then it is pending, and a decode that continues from it
reads it from the previous step's device tensor (`StepInputs.fill_rows`), so the host prepares
step N+1 while the GPU runs step N. Penalties need the history itself on the host, and
`needs_sampled_tokens` says when a step must wait for in-flight tokens. Each slot's sampling
settings live in the same way, in `SamplingTable` (the end of this file).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from zllm.protocol import NewRequestData, SchedulerOutput
from zllm.worker.attention.base import AttentionBatch
from zllm.sampling_params import SamplingParams
from zllm.worker.sampler import SamplingInputs


@dataclass
class StepInputs:
    """One step, flattened: T tokens of R requests (padded to the CUDA graph's size if any)."""

    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    attention: AttentionBatch
    # input_ids[fill_rows] come from the previous step's sampled tokens[fill_from] (device).
    fill_rows: np.ndarray  # int64
    fill_from: np.ndarray  # int64
    sampled: Optional[np.ndarray]  # requests (batch index) that sample; None: all of them
    sample_rows: Optional[np.ndarray]  # their last token's flat index; None: tokens 0..R-1
    sampled_slots: np.ndarray  # their slots
    output_positions: np.ndarray  # tokens each had generated before this one
    prompt_logprobs: Optional["PromptLogprobRows"] = None  # prompt positions to score


@dataclass
class PromptLogprobRows:
    """The prompt positions of a step whose logits score the prompt token after them
    (SamplingParams.prompt_logprobs): their flat rows and those tokens, and per request its
    batch index, the prompt index of its first scored token, how many, and its top-N."""

    rows: np.ndarray  # int64
    targets: np.ndarray  # int64
    batch_index: np.ndarray
    first_indices: np.ndarray
    counts: np.ndarray
    num_top: np.ndarray


class InputBatch:
    def __init__(self, max_num_reqs: int, max_model_len: int, block_size: int, vocab_size: int,
                 scratch_block: int) -> None:
        # Running requests, plus removed ones whose last token is still in flight.
        self.capacity = 2 * max_num_reqs
        self.pad_slot = self.capacity  # its table row is the scratch block: CUDA-graph padding
        num_slots = self.capacity + 1
        self.block_size = block_size
        self.scratch_block = scratch_block
        # With async scheduling a request computes one token past its end (its extra sampled
        # token is dropped by the engine); zeroed memory is only paged in where written.
        self.max_len = max_model_len + 2
        self.token_ids = np.zeros((num_slots, self.max_len), np.int32)
        self.block_table = np.zeros((num_slots, -(-self.max_len // block_size)), np.int32)
        self.block_table[self.pad_slot, 0] = scratch_block
        self.num_blocks = np.zeros(num_slots, np.int64)  # blocks held
        self.num_tokens = np.zeros(num_slots, np.int64)  # tokens on the host: prompt + outputs
        self.num_prompt_tokens = np.zeros(num_slots, np.int64)
        self.num_computed_tokens = np.zeros(num_slots, np.int64)
        self.num_pending_tokens = np.zeros(num_slots, np.int64)  # sampled, not on the host yet
        self.prev_index = np.full(num_slots, -1, np.int64)  # row in the last step's tokens
        self.sampling = SamplingTable(num_slots, vocab_size)
        self.prompt_logprobs = np.full(num_slots, -1, np.int64)  # top-N, -1: not asked for
        self.num_prompt_logprobs = 0  # held requests that ask
        self.slot_of: dict[str, int] = {}
        self.free_slots = list(range(self.capacity - 1, -1, -1))
        self.draining: list[int] = []  # removed, with tokens in flight: free once they land
        # The requests held, in the order the last step listed them (unscheduled ones last).
        self.order_ids: list[str] = []
        self.order_slots = np.zeros(0, np.int64)
        self.last_sampled = np.zeros(0, np.int64)  # slots the last launched step sampled
        self._arange = np.arange(num_slots + 9)  # covers a CUDA graph's padded size

    # -- deltas ------------------------------------------------------------------------------------

    def update(self, sched: SchedulerOutput) -> np.ndarray:
        """Apply the step's deltas; returns the slots of its requests, in batch order."""
        removed = sched.finished_req_ids + sched.preempted_req_ids
        if removed:
            self._remove(removed)
        continuing = sched.continuing_requests
        if continuing.req_ids == self.order_ids:  # steady: the same requests, in the same order
            step_slots, rest_ids = self.order_slots, []
        else:
            step_slots, rest_ids, rest_slots = self._reorder(continuing.req_ids)
        if len(continuing.new_block_ids):
            self._add_blocks(step_slots, continuing.new_block_owners, continuing.new_block_ids)
        self.order_ids = continuing.req_ids
        if sched.new_requests:
            new_slots = [self._add(new) for new in sched.new_requests]
            step_slots = np.concatenate((step_slots, new_slots))
            self.order_ids = self.order_ids + [new.req_id for new in sched.new_requests]
        self.order_slots = step_slots
        if rest_ids:
            self.order_ids = self.order_ids + rest_ids
            self.order_slots = np.concatenate((step_slots, rest_slots))
        return step_slots

    def _reorder(self, req_ids: list[str]) -> tuple[np.ndarray, list[str], np.ndarray]:
        """Slots of req_ids, and the held requests this step leaves out (in their old order)."""
        slots = np.fromiter((self.slot_of[r] for r in req_ids), np.int64, len(req_ids))
        scheduled = set(req_ids)
        rest = [(r, s) for r, s in zip(self.order_ids, self.order_slots.tolist())
                if r not in scheduled]
        return slots, [r for r, _ in rest], np.asarray([s for _, s in rest], np.int64)

    def _remove(self, req_ids: list[str]) -> None:
        gone = []
        for req_id in req_ids:
            slot = self.slot_of.pop(req_id, None)
            if slot is None:
                continue
            gone.append(self.order_ids.index(req_id))
            self.sampling.remove(slot)
            if self.prompt_logprobs[slot] >= 0:
                self.prompt_logprobs[slot] = -1
                self.num_prompt_logprobs -= 1
            (self.draining if self.num_pending_tokens[slot] else self.free_slots).append(slot)
        if gone:
            keep = np.ones(len(self.order_ids), np.bool_)
            keep[gone] = False
            self.order_ids = [r for r, k in zip(self.order_ids, keep.tolist()) if k]
            self.order_slots = self.order_slots[keep]

    def _add(self, new: NewRequestData) -> int:
        if not self.free_slots:
            raise RuntimeError(f"input batch full: {self.capacity} slots")
        slot = self.free_slots.pop()
        num_prompt, num_output = len(new.prompt_token_ids), len(new.output_token_ids)
        self.token_ids[slot, :num_prompt] = new.prompt_token_ids
        self.token_ids[slot, num_prompt:num_prompt + num_output] = new.output_token_ids
        self.num_tokens[slot] = num_prompt + num_output
        self.num_prompt_tokens[slot] = num_prompt
        self.num_computed_tokens[slot] = new.num_computed_tokens
        self.num_pending_tokens[slot] = 0
        self.prev_index[slot] = -1
        self.block_table[slot, :len(new.block_ids)] = new.block_ids
        self.num_blocks[slot] = len(new.block_ids)
        self.sampling.add(slot, new.sampling_params, new.stop_token_ids)
        if new.sampling_params.prompt_logprobs is not None:
            self.prompt_logprobs[slot] = new.sampling_params.prompt_logprobs
            self.num_prompt_logprobs += 1
        self.slot_of[new.req_id] = slot
        return slot

    def _add_blocks(self, step_slots: np.ndarray, owners: np.ndarray, blocks: np.ndarray) -> None:
        """Append blocks[j] to the table of request owners[j] (an index into step_slots). One
        owner may gain several blocks (a prefill chunk), which keep their order."""
        if len(owners) > 1 and not (owners[1:] > owners[:-1]).all():
            order = np.argsort(owners, kind="stable")
            owners, blocks = owners[order], blocks[order]
            rank = np.arange(len(owners)) - np.searchsorted(owners, owners)  # j-th of its owner
            slots = step_slots[owners]
            self.block_table[slots, self.num_blocks[slots] + rank] = blocks
            np.add.at(self.num_blocks, slots, 1)
        else:  # each owner gains one block (decodes crossing a block boundary)
            slots = step_slots[owners]
            self.block_table[slots, self.num_blocks[slots]] = blocks
            self.num_blocks[slots] += 1

    # -- tokens sampled by launched steps ----------------------------------------------------------

    def append_sampled(self, slots: np.ndarray, tokens: np.ndarray) -> None:
        """A launched step's tokens reached the host (steps in launch order)."""
        end = np.minimum(self.num_tokens[slots], self.max_len - 1)
        self.token_ids[slots, end] = tokens
        self.num_tokens[slots] += 1
        self.num_pending_tokens[slots] -= 1
        if self.draining:
            landed = [s for s in self.draining if not self.num_pending_tokens[s]]
            self.draining = [s for s in self.draining if self.num_pending_tokens[s]]
            self.free_slots += landed

    def forget_previous(self) -> None:
        """The last launched step sampled nothing: no decode continues from its tokens."""
        self.prev_index.fill(-1)
        self.last_sampled = self.last_sampled[:0]

    def needs_sampled_tokens(self, slots: np.ndarray, num_scheduled: np.ndarray,
                             num_tokens: int) -> bool:
        """Whether the step needs tokens still in flight on the host: an input token that the
        last launched step did not sample for a one-token step, or a penalty's history."""
        if self.sampling.users["penalties"] and (
                self.sampling.has_penalties[slots] & (self.num_pending_tokens[slots] > 0)).any():
            return True
        if num_tokens == len(slots) and (slots is self.last_sampled  # (the steady batch's array)
                                         or np.array_equal(slots, self.last_sampled)):
            return False  # steady decoding: each continues from the last step's token
        missing = self.num_computed_tokens[slots] + num_scheduled > self.num_tokens[slots]
        return bool(missing.any()
                    and (missing & ((num_scheduled > 1) | (self.prev_index[slots] < 0))).any())

    # -- a step's inputs ---------------------------------------------------------------------------

    def prepare(self, slots: np.ndarray, num_scheduled: np.ndarray, num_tokens: int,
                graph_size: Optional[int] = None) -> StepInputs:
        """Flatten a step of `num_tokens` tokens and advance its requests' progress. A step of
        decodes that replays the CUDA graph of `graph_size` rows is padded to that size with rows
        that read token 0 at position 0 and write their K/V into the scratch block."""
        num_reqs, bs = len(slots), self.block_size
        num_rows = num_reqs if graph_size is None else graph_size
        start = self.num_computed_tokens[slots]
        end = start + num_scheduled
        if num_tokens == num_reqs:  # one token each: the decode fast path, no repeat
            starts = self._arange[:num_reqs + 1]
            token_slots, positions = slots, start
        else:
            starts = np.zeros(num_reqs + 1, np.int64)
            np.cumsum(num_scheduled, out=starts[1:])
            req_of = np.repeat(self._arange[:num_reqs], num_scheduled)
            token_slots = slots[req_of]
            positions = start[req_of] + (np.arange(num_tokens) - starts[req_of])
        slot_mapping = self.block_table[token_slots, positions // bs].astype(np.int64) * bs
        slot_mapping += positions % bs
        # Inputs past the host's tokens were sampled by the last launched step (the caller made
        # sure, `needs_sampled_tokens`): one token each, at flat index starts[request].
        known = self.num_tokens[slots]
        fill = np.flatnonzero(end > known)
        fill_rows, fill_from = None, None
        if len(fill) == num_tokens:  # decodes, every input still on the device: no gather
            input_ids = np.zeros(num_tokens, np.int64)  # (fresh: on a CPU it becomes the input)
            if slots is self.last_sampled:
                # Steady decoding (the batch's array, unchanged): request i sampled row i.
                fill_rows = fill_from = self._arange[:num_tokens]
        else:  # (the gather reads rows far apart: on a busy CPU it misses the caches)
            input_ids = self.token_ids[token_slots, positions].astype(np.int64)
        if fill_rows is None:
            fill_rows, fill_from = starts[fill], self.prev_index[slots[fill]]
        num_pad = num_rows - num_reqs  # padding rows: one token each, in the scratch block
        attention = AttentionBatch(
            query_start_loc=self._arange[:num_rows + 1] if num_pad else starts,
            seq_lens=_pad(end.astype(np.int32), num_rows, 1),
            num_blocks=_pad(((end + bs - 1) // bs).astype(np.int32), num_rows, 1),
            block_table=self.block_table, table_rows=_pad(slots, num_rows, self.pad_slot),
            slot_mapping=_pad(slot_mapping, num_tokens + num_pad, self.scratch_block * bs),
            max_query_len=1 if num_tokens == num_reqs else int(num_scheduled.max()),
            cuda_graph=graph_size is not None)
        step = StepInputs(_pad(input_ids, num_tokens + num_pad, 0),
                          _pad(positions, num_tokens + num_pad, 0), attention, fill_rows,
                          fill_from, *self._sampled(slots, starts, end, known, num_tokens))
        if self.num_prompt_logprobs:
            step.prompt_logprobs = self._prompt_logprob_rows(slots, start, end, starts)
        self.num_computed_tokens[slots] = end
        self.prev_index.fill(-1)
        self.prev_index[step.sampled_slots] = self._arange[:len(step.sampled_slots)]
        self.last_sampled = step.sampled_slots
        self.num_pending_tokens[step.sampled_slots] += 1
        return step

    def _sampled(self, slots: np.ndarray, starts: np.ndarray, end: np.ndarray, known: np.ndarray,
                 num_tokens: int):
        """Requests whose step reaches their last token (they sample): (batch indices or None
        for all, flat token rows or None for 0..R-1, slots, output tokens so far)."""
        total = known + self.num_pending_tokens[slots]
        output_positions = total - self.num_prompt_tokens[slots]
        reached = end == total
        if num_tokens == len(slots) and reached.all():
            return None, None, slots, output_positions
        sampled = np.flatnonzero(reached)
        return sampled, starts[sampled + 1] - 1, slots[sampled], output_positions[sampled]

    def _prompt_logprob_rows(self, slots: np.ndarray, start: np.ndarray, end: np.ndarray,
                             starts: np.ndarray) -> Optional[PromptLogprobRows]:
        """Positions p this step computes, of requests asking for prompt log-probabilities,
        whose next token p + 1 is still in the prompt."""
        asks = np.flatnonzero(self.prompt_logprobs[slots] >= 0)
        lo = start[asks]
        hi = np.minimum(end[asks], self.num_prompt_tokens[slots[asks]] - 1)
        some = hi > lo
        asks, lo, hi = asks[some], lo[some], hi[some]
        if not len(asks):
            return None
        counts = hi - lo
        rows = np.concatenate([np.arange(starts[i], starts[i] + c) for i, c in zip(asks, counts)])
        positions = np.concatenate([np.arange(a, b) for a, b in zip(lo, hi)])
        targets = self.token_ids[np.repeat(slots[asks], counts), positions + 1].astype(np.int64)
        return PromptLogprobRows(rows, targets, asks, lo + 1, counts,
                                 self.prompt_logprobs[slots[asks]])

    def sampling_inputs(self, step: StepInputs) -> Optional[SamplingInputs]:
        """The step's sampling settings, with penalty statistics from the host history; None
        when every request held samples greedily with nothing else."""
        if self.sampling.all_plain:
            return None
        slots, positions = step.sampled_slots, step.output_positions
        inputs = self.sampling.inputs(slots, positions)
        if inputs.repetition_penalty is not None:
            inputs.seen_flat, inputs.output_flat = self._history_indices(slots)
        rows, tokens = self.sampling.banned(slots, positions)
        if len(rows):
            inputs.banned_rows, inputs.banned_tokens = rows, tokens
        return inputs

    def _history_indices(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Flat (row * vocab + token) indices of the host history of the rows with penalties
        (other rows are not penalised, so their statistics stay empty): every token, and the
        output tokens only."""
        rows = np.flatnonzero(self.sampling.has_penalties[slots])
        owners = slots[rows]
        lengths = self.num_tokens[owners]
        offsets = np.zeros(len(rows) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
        tokens = self.token_ids[np.repeat(owners, lengths), within]
        flat = np.repeat(rows * self.sampling.vocab_size, lengths) + tokens
        return flat, flat[within >= np.repeat(self.num_prompt_tokens[owners], lengths)]


def _pad(values: np.ndarray, length: int, fill) -> np.ndarray:
    """values extended to `length` with `fill`."""
    if len(values) == length:
        return values
    out = np.full(length, fill, values.dtype)
    out[:len(values)] = values
    return out


# -- sampling settings -----------------------------------------------------------------------------

_SEED_MASK = 2**63 - 1
_FEATURES = ("random", "top_k", "top_p", "min_p", "penalties", "min_tokens", "logprobs",
             "logit_bias")


class SamplingTable:
    """The sampling settings of the requests the batch holds, one row per slot. A request's
    settings are written once, when it arrives; a step reads the rows of the requests it samples
    with one gather per column (`SamplingInputs`), which the sampler copies to the device in two
    transfers. Per feature the table counts the requests that use it, so a batch where nobody
    uses a feature (all greedy, say) does not even look at its column."""

    def __init__(self, num_slots: int, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.temperature = np.zeros(num_slots, np.float32)
        self.top_k = np.full(num_slots, vocab_size, np.int64)  # vocab_size where off
        self.top_p = np.ones(num_slots, np.float32)
        self.min_p = np.zeros(num_slots, np.float32)
        self.seed = np.zeros(num_slots, np.int64)
        self.repetition_penalty = np.ones(num_slots, np.float32)
        self.presence_penalty = np.zeros(num_slots, np.float32)
        self.frequency_penalty = np.zeros(num_slots, np.float32)
        self.has_penalties = np.zeros(num_slots, np.bool_)
        self.min_tokens = np.zeros(num_slots, np.int64)
        self.logprobs = np.full(num_slots, -1, np.int64)  # -1: not asked for
        self.stop_token_ids: list[list[int]] = [[] for _ in range(num_slots)]
        self.logit_bias: list[dict[int, float]] = [{} for _ in range(num_slots)]
        self.has_bias = np.zeros(num_slots, np.bool_)
        self.users = dict.fromkeys(_FEATURES, 0)  # held requests using each feature
        self._features: dict[int, tuple[str, ...]] = {}  # slot -> the features it uses

    def add(self, slot: int, params: SamplingParams, stop_token_ids: np.ndarray) -> None:
        top_k = params.top_k if 0 < params.top_k < self.vocab_size else self.vocab_size
        penalties = bool(params.repetition_penalty != 1 or params.presence_penalty
                         or params.frequency_penalty)
        self.temperature[slot] = params.temperature
        self.top_k[slot] = top_k
        self.top_p[slot] = params.top_p
        self.min_p[slot] = params.min_p
        self.seed[slot] = (params.seed or 0) & _SEED_MASK
        self.repetition_penalty[slot] = params.repetition_penalty
        self.presence_penalty[slot] = params.presence_penalty
        self.frequency_penalty[slot] = params.frequency_penalty
        self.has_penalties[slot] = penalties
        self.min_tokens[slot] = params.min_tokens
        self.logprobs[slot] = -1 if params.logprobs is None else params.logprobs
        self.stop_token_ids[slot] = stop_token_ids.tolist() if params.min_tokens else []
        self.logit_bias[slot] = params.logit_bias or {}
        self.has_bias[slot] = bool(params.logit_bias)
        used = (params.temperature > 0, top_k < self.vocab_size, params.top_p < 1,
                params.min_p > 0, penalties, params.min_tokens > 0, params.logprobs is not None,
                bool(params.logit_bias))
        self._features[slot] = tuple(f for f, on in zip(_FEATURES, used) if on)
        for feature in self._features[slot]:
            self.users[feature] += 1

    @property
    def all_plain(self) -> bool:
        """No held request uses any feature: greedy sampling with nothing else."""
        return not any(self.users.values())

    def remove(self, slot: int) -> None:
        for feature in self._features.pop(slot):
            self.users[feature] -= 1

    def inputs(self, slots: np.ndarray, output_positions: np.ndarray) -> SamplingInputs:
        """The columns of `slots` (the requests sampled this step, in order); a column nobody in
        the step uses stays None. Penalty statistics and banned tokens are the caller's part."""
        out = SamplingInputs(num_rows=len(slots))
        users = self.users
        if users["random"] and self.temperature[slots].any():
            out.temperature = self.temperature[slots]
            out.seeds = self.seed[slots]
            out.output_positions = output_positions
            if users["top_k"] and (top_k := self.top_k[slots]).min() < self.vocab_size:
                out.top_k = top_k
            if users["top_p"] and (top_p := self.top_p[slots]).min() < 1:
                out.top_p = top_p
            if users["min_p"] and (min_p := self.min_p[slots]).max() > 0:
                out.min_p = min_p
        if users["logprobs"] and (asked := self.logprobs[slots].max()) >= 0:
            out.num_logprobs = int(asked)
        if users["penalties"] and self.has_penalties[slots].any():
            out.repetition_penalty = self.repetition_penalty[slots]
            out.presence_penalty = self.presence_penalty[slots]
            out.frequency_penalty = self.frequency_penalty[slots]
        if users["logit_bias"]:
            self._logit_bias(out, slots)
        return out

    def _logit_bias(self, out: SamplingInputs, slots: np.ndarray) -> None:
        """(row, token, bias) triples of the rows with a logit_bias (a loop over those only)."""
        rows = np.flatnonzero(self.has_bias[slots]).tolist()
        triples = [(row, t, b) for row in rows for t, b in self.logit_bias[slots[row]].items()]
        if triples:
            rows, tokens, values = zip(*triples)
            out.bias_rows, out.bias_tokens = np.asarray(rows, np.int64), np.asarray(tokens, np.int64)
            out.bias_values = np.asarray(values, np.float32)

    def banned(self, slots: np.ndarray,
               output_positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, token ids) to forbid: the stop tokens of requests still short of min_tokens.
        A loop over those requests only (rare, and each has its own stop list)."""
        if not self.users["min_tokens"]:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        short = np.flatnonzero(output_positions < self.min_tokens[slots]).tolist()
        pairs = [(row, t) for row in short for t in self.stop_token_ids[slots[row]]]
        rows, tokens = zip(*pairs) if pairs else ((), ())
        return np.asarray(rows, np.int64), np.asarray(tokens, np.int64)
