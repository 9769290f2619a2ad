"""From what a user gives to what the engine core takes: tokenize, validate once, fan out `n`.

Every check that can name the user's own value happens here, before anything is queued, with a
RequestError (a ValueError) that says the value, the limit and the request field. The engine core re-checks only the shape of what
arrives on its socket.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional, Union

import numpy as np

from zllm.architecture import ModelArchitecture
from zllm.errors import RequestError
from zllm.protocol import EngineCoreRequest
from zllm.sampling_params import MAX_SEED, MIN_SEED, SamplingParams
from zllm.structured_outputs import build_grammar

Prompt = Union[str, list[int]]


def sample_request_ids(request_id: str, n: int) -> list[str]:
    """The engine core's id for each of a request's n samples."""
    return [request_id] if n == 1 else [f"{request_id}#{i}" for i in range(n)]


# msgpack carries a priority as a signed 64-bit integer, as it does a seed.
PRIORITY_RANGE = (MIN_SEED, MAX_SEED)


class Processor:
    def __init__(self, tokenizer, arch: ModelArchitecture, max_model_len: int,
                 max_n: int = 128, policy: str = "fcfs") -> None:
        self.tokenizer = tokenizer
        self.vocab_size = arch.vocab_size
        self.max_model_len = max_model_len
        self.max_n = max_n
        self.policy = policy
        eos = arch.eos_token_ids or [tokenizer.eos_token_id]
        self.eos_token_ids = np.asarray([t for t in eos if t is not None], dtype=np.int32)

    def tokenize(self, prompt: Prompt) -> tuple[Optional[str], list[int]]:
        """(text or None, token ids) of a prompt given as text or as token ids."""
        if isinstance(prompt, str):
            check_text(prompt, "prompt")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)):
            return None, list(prompt)
        raise ValueError(f"a prompt must be a string or a list of token ids, got "
                         f"{type(prompt).__name__}")

    def check(self, prompt_ids: list[int], params: SamplingParams, priority: int = 0) -> None:
        """Raise RequestError (a ValueError naming the request field) if the request cannot be
        served: a prompt that is empty, outside the vocabulary or too long for the context with
        its max_tokens, stop token ids or logit_bias outside the vocabulary, an invalid
        structured-output spec, a priority the policy does not take. The one check a request
        passes: make_requests trusts it."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        self.check_priority(priority)
        if not prompt_ids:
            raise RequestError("prompt is empty: give at least one token", "prompt")
        self.check_limits(params)
        self.check_context(len(prompt_ids), params.max_tokens)
        vocab = self.vocab_size
        for pos, t in enumerate(prompt_ids):
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                raise RequestError(f"prompt token id {t!r:.60} at position {pos} is outside the "
                                   f"vocabulary [0, {vocab})", "prompt")
        for name, what, ids in (("stop_token_ids", "stop token id", params.stop_token_ids),
                                ("logit_bias", "logit_bias token id", params.logit_bias or ())):
            for t in ids:
                if not 0 <= t < vocab:
                    raise RequestError(f"{what} {t!r:.60} is outside the vocabulary [0, {vocab})", name)
        if params.structured_outputs is not None:
            try:
                build_grammar(params.structured_outputs)
            except ValueError as e:
                raise RequestError(str(e), "structured_outputs") from None

    def check_limits(self, params: SamplingParams) -> None:
        """The bounds that depend on the model and the config: n, top_k, max_tokens and
        min_tokens (SamplingParams has checked the rest)."""
        if params.n > self.max_n:
            raise RequestError(f"n = {params.n!r:.100} is larger than max_n = {self.max_n} samples "
                               f"per request", "n")
        if params.top_k > self.vocab_size:
            raise RequestError(f"top_k = {params.top_k!r:.100} is larger than the vocabulary "
                               f"({self.vocab_size} tokens)", "top_k")
        for name, value in (("max_tokens", params.max_tokens), ("min_tokens", params.min_tokens)):
            if value is not None and value >= self.max_model_len:
                raise RequestError(f"{name} = {value!r:.100} must be less than this model's maximum "
                                   f"context length, {self.max_model_len} tokens", name)

    def check_context(self, num_prompt_tokens: int, max_tokens: Optional[int]) -> None:
        """The prompt and the tokens asked for must fit in max_model_len (vLLM's messages)."""
        limit = self.max_model_len
        if max_tokens is None and num_prompt_tokens >= limit:
            raise RequestError(f"This model's maximum context length is {limit} tokens. However, "
                               f"your request has {num_prompt_tokens} input tokens. Please reduce "
                               f"the length of the input messages.", "prompt",
                               "context_length_exceeded")
        if max_tokens is not None and num_prompt_tokens + max_tokens > limit:
            raise RequestError(f"This model's maximum context length is {limit} tokens. However, "
                               f"you requested {num_prompt_tokens + max_tokens} tokens "
                               f"({num_prompt_tokens} in the messages, {max_tokens} in the "
                               f"completion). Please reduce the length of the messages or "
                               f"completion.", "prompt", "context_length_exceeded")

    def check_priority(self, priority: int) -> None:
        """A request's priority is an integer, and only the priority policy takes one other than
        0: under fcfs it would be silently ignored, so it is refused (as vLLM does)."""
        lo, hi = PRIORITY_RANGE
        if not (isinstance(priority, int) and not isinstance(priority, bool)
                and lo <= priority <= hi):
            raise RequestError(f"priority {priority!r} must be an integer in [{lo}, {hi}]",
                               "priority")
        if priority != 0 and self.policy != "priority":
            raise RequestError(f"Got priority {priority} but Priority scheduling is not enabled "
                               f"(scheduler policy is {self.policy!r}; set policy: priority)",
                               "priority")

    def make_requests(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                      priority: int = 0) -> list[EngineCoreRequest]:
        """One engine core request per sample; sample i of a seeded request uses seed + i.
        Stop strings stay here (the frontend matches them), so no text travels to the core.
        max_tokens None becomes the rest of the context. Only the first sample scores the
        prompt (prompt_logprobs): the others share its prompt, and may take it from the cache."""
        ids = np.asarray(prompt_ids, dtype=np.int32)
        max_tokens = params.max_tokens or self.max_model_len - len(prompt_ids)
        arrival = time.monotonic()
        requests = []
        for i, core_id in enumerate(sample_request_ids(request_id, params.n)):
            seed = None if params.seed is None else sample_seed(params.seed, i)
            child = dataclasses.replace(params, n=1, seed=seed, stop=[], max_tokens=max_tokens,
                                        prompt_logprobs=params.prompt_logprobs if i == 0 else None)
            requests.append(EngineCoreRequest(core_id, ids, child, self.eos_token_ids, arrival,
                                              priority, sample_index=i))
        return requests


def sample_seed(seed: int, index: int) -> int:
    """Sample `index`'s seed: seed + index, wrapped to stay a signed 64-bit integer."""
    return (seed + index - MIN_SEED) % 2**64 + MIN_SEED


def check_text(text: str, param: str) -> None:
    """Text must be encodable as UTF-8: JSON's "\\ud800" escape gives a lone surrogate, which no
    tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(f"{param} holds {text[e.start]!r} at position {e.start}, a lone UTF-16 "
                           f"surrogate, which is not a character", param) from None
