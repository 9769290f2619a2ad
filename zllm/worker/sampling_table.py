"""The sampling settings of the requests a worker holds, one row per input-batch slot.

A request's settings are written once, when it arrives; a step reads the rows of the requests it
samples with one gather per column (`SamplingInputs`), which the sampler copies to the device in
two transfers. Per feature the table counts the requests that use it, so a batch where nobody
uses a feature (all greedy, say) does not even look at its column.
"""

from __future__ import annotations

import numpy as np

from zllm.sampling_params import SamplingParams
from zllm.worker.sampler import SamplingInputs

_SEED_MASK = 2**63 - 1
_FEATURES = ("random", "top_k", "top_p", "min_p", "penalties", "min_tokens", "logprobs",
             "logit_bias")


class SamplingTable:
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
