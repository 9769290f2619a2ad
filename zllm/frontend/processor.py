"""From what a user gives to what the engine core takes: tokenize, validate once, fan out `n`.

Every check that can name the user's own value happens here, before anything is queued, with a
ValueError that says the value and the limit. The engine core re-checks only the shape of what
arrives on its socket.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional, Union

import numpy as np

from zllm.architecture import ModelArchitecture
from zllm.protocol import EngineCoreRequest
from zllm.sampling_params import SamplingParams

Prompt = Union[str, list[int]]


def sample_request_ids(request_id: str, n: int) -> list[str]:
    """The engine core's id for each of a request's n samples."""
    return [request_id] if n == 1 else [f"{request_id}#{i}" for i in range(n)]


class Processor:
    def __init__(self, tokenizer, arch: ModelArchitecture, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = arch.vocab_size
        self.max_model_len = max_model_len
        eos = arch.eos_token_ids or [tokenizer.eos_token_id]
        self.eos_token_ids = np.asarray([t for t in eos if t is not None], dtype=np.int32)

    def tokenize(self, prompt: Prompt) -> tuple[Optional[str], list[int]]:
        """(text or None, token ids) of a prompt given as text or as token ids."""
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)):
            return None, list(prompt)
        raise ValueError(f"a prompt must be a string or a list of token ids, got "
                         f"{type(prompt).__name__}")

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError if the request cannot be served."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        if not prompt_ids:
            raise ValueError("prompt is empty: give at least one token")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens; max_model_len is "
                             f"{self.max_model_len}, so a prompt may have at most "
                             f"{self.max_model_len - 1} (one is kept for output)")
        vocab = self.vocab_size
        for pos, t in enumerate(prompt_ids):
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                raise ValueError(f"prompt token id {t!r} at position {pos} is outside the "
                                 f"vocabulary [0, {vocab})")
        for t in params.stop_token_ids:
            if not 0 <= t < vocab:
                raise ValueError(f"stop token id {t} is outside the vocabulary [0, {vocab})")

    def make_requests(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                      priority: int = 0) -> list[EngineCoreRequest]:
        """One engine core request per sample; sample i of a seeded request uses seed + i.
        Stop strings stay here (the frontend matches them), so no text travels to the core."""
        ids = np.asarray(prompt_ids, dtype=np.int32)
        arrival = time.monotonic()
        requests = []
        for i, core_id in enumerate(sample_request_ids(request_id, params.n)):
            seed = None if params.seed is None else params.seed + i
            child = dataclasses.replace(params, n=1, seed=seed, stop=[])
            requests.append(EngineCoreRequest(core_id, ids, child, self.eos_token_ids, arrival,
                                              priority))
        return requests
