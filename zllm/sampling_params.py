"""How to pick each next token, and when to stop. Checked where it enters (`__post_init__`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

from zllm.structured_outputs import StructuredOutputs

MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0
# A seed is a signed 64-bit integer, as in vLLM's OpenAI server (torch.long): every value
# survives msgpack on the way to the engine core and the workers.
MIN_SEED, MAX_SEED = -2**63, 2**63 - 1
# Stop strings are matched (and held back from streams) after every token, so their number and
# length are bounded. OpenAI allows 4; vLLM sets no limit.
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256


@dataclass
class SamplingParams:
    """Sampling and stopping settings of one request, as in vLLM and the OpenAI API.

    temperature 0 is greedy. top_k -1 (or 0) and top_p 1 switch those filters off. With a seed,
    a request samples the same tokens whatever else is in the batch. max_tokens None lets the
    output run to the end of the context (max_model_len minus the prompt). logit_bias adds to
    the logits of the token ids it names (OpenAI's logit_bias); structured_outputs constrains the
    text to a JSON schema, a regex, a choice or a grammar.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: Optional[int] = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    stop: Union[None, str, list[str]] = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: Optional[int] = None  # top-N log-probabilities per generated token
    skip_special_tokens: bool = True
    logit_bias: Optional[dict[int, float]] = None
    structured_outputs: Optional[StructuredOutputs] = None
    # top-N log-probabilities at each prompt token after the first (vLLM's extension); such a
    # request skips the prefix cache, whose positions would have no logits.
    prompt_logprobs: Optional[int] = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        _require("n", self.n, _is_int(self.n) and self.n >= 1, ">= 1")
        _require("temperature", self.temperature, _finite(self.temperature) and self.temperature >= 0,
                 ">= 0 and finite")
        _require("top_p", self.top_p, _finite(self.top_p) and 0 < self.top_p <= 1, "in (0, 1]")
        _require("top_k", self.top_k, _is_int(self.top_k) and self.top_k >= -1,
                 "-1 (off), 0 (off) or a positive integer")
        _require("min_p", self.min_p, _finite(self.min_p) and 0 <= self.min_p <= 1, "in [0, 1]")
        _require("seed", self.seed, self.seed is None or (_is_int(self.seed)
                                                          and MIN_SEED <= self.seed <= MAX_SEED),
                 f"a signed 64-bit integer, in [{MIN_SEED}, {MAX_SEED}] (or None)")
        _require("repetition_penalty", self.repetition_penalty,
                 _finite(self.repetition_penalty) and self.repetition_penalty > 0, "> 0 and finite")
        _require("presence_penalty", self.presence_penalty,
                 _finite(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "in [-2, 2]")
        _require("frequency_penalty", self.frequency_penalty,
                 _finite(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
                 "in [-2, 2]")
        if self.max_tokens is not None:
            _require("max_tokens", self.max_tokens,
                     _is_int(self.max_tokens) and self.max_tokens >= 1, ">= 1 (or None)")
        _require("min_tokens", self.min_tokens, _is_int(self.min_tokens)
                 and 0 <= self.min_tokens <= (self.max_tokens or self.min_tokens),
                 f"in [0, max_tokens={self.max_tokens}]")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _require(name, value, _is_int(value) and 0 <= value <= MAX_LOGPROBS,
                         f"in [0, {MAX_LOGPROBS}]")
        self._check_stops()
        if self.logit_bias is not None:
            bad = {t: b for t, b in self.logit_bias.items()
                   if not (_is_int(t) and isinstance(b, (int, float)) and not isinstance(b, bool)
                           and -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS)}
            _require("logit_bias", bad, not bad,
                     f"token id -> bias in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")

    def _check_stops(self) -> None:
        _require("stop", f"{len(self.stop)} strings", len(self.stop) <= MAX_STOP_STRINGS,
                 f"at most {MAX_STOP_STRINGS} strings")
        for s in self.stop:
            _require("stop", s, isinstance(s, str) and 0 < len(s) <= MAX_STOP_LENGTH,
                     f"non-empty strings of at most {MAX_STOP_LENGTH} characters")
        _require("stop_token_ids", self.stop_token_ids,
                 all(_is_int(t) for t in self.stop_token_ids), "a list of token ids (integers)")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: object) -> bool:
    """A real number that is not inf or NaN (JSON's 1e999 parses as inf)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require(name: str, value: object, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name} = {value!r:.100} is out of range: must be "
                         f"{allowed}")
