"""What a user gets back for each prompt."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class CompletionOutput:
    """One generated sample of a prompt (there are `n`)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: Optional[str] = None  # "stop" | "length" | "abort" | "error"; None while running
    stop_reason: Optional[str | int] = None  # the stop string or token id that ended it
    # One dict per generated token: token id -> log-probability, the sampled token included.
    logprobs: Optional[list[dict[int, float]]] = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """All samples of one prompt."""

    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    # With SamplingParams.prompt_logprobs: per prompt token, token id -> log-probability (the
    # prompt's own token included); None for the first token, which has nothing before it. A
    # stream carries it in its first update.
    prompt_logprobs: Optional[list[Optional[dict[int, float]]]] = None
    prompt_token_ranks: Optional[list[Optional[int]]] = None  # each prompt token's rank (1: top)
    # A streaming update: each output holds only what is new since the previous update (text,
    # token ids, logprobs); otherwise everything so far.
    delta: bool = False

    @property
    def finished(self) -> bool:
        return all(o.finished for o in self.outputs)
