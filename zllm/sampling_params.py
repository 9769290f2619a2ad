"""How to pick each next token, and when to stop. Checked where it enters (`__post_init__`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from zllm.structured_outputs import StructuredOutputs

MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0


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

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        _require("n", self.n, isinstance(self.n, int) and self.n >= 1, ">= 1")
        _require("temperature", self.temperature, self.temperature >= 0, ">= 0")
        _require("top_p", self.top_p, 0 < self.top_p <= 1, "in (0, 1]")
        _require("top_k", self.top_k, isinstance(self.top_k, int) and self.top_k >= -1,
                 "-1 (off), 0 (off) or a positive integer")
        _require("min_p", self.min_p, 0 <= self.min_p <= 1, "in [0, 1]")
        _require("repetition_penalty", self.repetition_penalty, self.repetition_penalty > 0, "> 0")
        _require("presence_penalty", self.presence_penalty, -2 <= self.presence_penalty <= 2,
                 "in [-2, 2]")
        _require("frequency_penalty", self.frequency_penalty, -2 <= self.frequency_penalty <= 2,
                 "in [-2, 2]")
        if self.max_tokens is not None:
            _require("max_tokens", self.max_tokens,
                     isinstance(self.max_tokens, int) and self.max_tokens >= 1, ">= 1 (or None)")
        _require("min_tokens", self.min_tokens, 0 <= self.min_tokens <= (self.max_tokens or self.min_tokens),
                 f"in [0, max_tokens={self.max_tokens}]")
        if self.logprobs is not None:
            _require("logprobs", self.logprobs, 0 <= self.logprobs <= MAX_LOGPROBS,
                     f"in [0, {MAX_LOGPROBS}]")
        _require("stop", self.stop, all(isinstance(s, str) and s for s in self.stop),
                 "non-empty strings")
        if self.logit_bias is not None:
            bad = {t: b for t, b in self.logit_bias.items()
                   if not (isinstance(t, int) and isinstance(b, (int, float))
                           and -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS)}
            _require("logit_bias", bad, not bad,
                     f"token id -> bias in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _require(name: str, value: object, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name} = {value!r} is out of range: must be {allowed}")
