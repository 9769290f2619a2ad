"""Turn sampled tokens into text and decide when each request stops."""

from __future__ import annotations

from typing import Optional

from zllm.engine.request import Request, RequestStatus
from zllm.protocol import ModelRunnerOutput


class IncrementalDetokenizer:
    """Text deltas as tokens arrive, never splitting a multi-byte character.

    Decodes a short window of tokens twice per step: the tokens already turned into text
    (`prefix_offset:read_offset`) and the same window plus the new ones. The difference is the
    new text, held back while it ends in U+FFFD (a character whose bytes are not all here yet).
    A few prompt tokens seed the window so that tokenizers which drop a leading space of the
    first token (SentencePiece) see the context they would in the full text.
    """

    CONTEXT_TOKENS = 5

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_token_ids[-self.CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset:self.read_offset],
                        skip_special_tokens=self.skip_special_tokens)
        full = decode(self.ids[self.prefix_offset:], skip_special_tokens=self.skip_special_tokens)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return full[len(prefix):]
        return ""


class OutputProcessor:
    """Appends sampled tokens to their requests, keeps text, and checks stop conditions.

    Text is built incrementally only for requests that need it as they go (stop strings or
    streaming); the others are decoded once when they finish, which keeps the per-step cost of a
    large batch low.
    """

    def __init__(self, tokenizer, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.texts: dict[str, str] = {}
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}

    def add_request(self, req: Request, stream: bool = False) -> None:
        self.texts[req.req_id] = ""
        if stream or req.params.stop:
            self.detokenizers[req.req_id] = IncrementalDetokenizer(
                self.tokenizer, req.prompt_token_ids, req.params.skip_special_tokens)

    def process(self, requests: dict[str, Request],
                output: ModelRunnerOutput) -> list[tuple[Request, RequestStatus]]:
        """Apply one step's sampled tokens; returns the requests that must stop, and why."""
        finished = []
        lp = output.logprobs
        for i, (req_id, token_id) in enumerate(zip(output.req_ids, output.sampled_token_ids.tolist())):
            req = requests.get(req_id)
            if req is None or req.status.finished:
                continue  # finished or aborted while the step ran: an extra token, dropped
            req.num_pending_tokens -= 1
            req.output_token_ids.append(token_id)
            if lp is not None and req.params.logprobs is not None:
                top = dict(zip(lp.top_ids[i][:req.params.logprobs], lp.top_logprobs[i]))
                top[token_id] = lp.sampled[i]
                req.logprobs.append(top)
            new_text = ""
            detok = self.detokenizers.get(req_id)
            if detok is not None:
                new_text = detok.add(token_id)
                self.texts[req_id] += new_text
            status = self._check_stop(req, token_id, new_text)
            if status is not None:
                finished.append((req, status))
        return finished

    def _check_stop(self, req: Request, token_id: int, new_text: str) -> Optional[RequestStatus]:
        params = req.params
        num_output = len(req.output_token_ids)
        if num_output >= params.min_tokens:
            if token_id in req.stop_token_ids:
                req.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
            if new_text and params.stop and self._truncate_at_stop_string(req, new_text):
                return RequestStatus.FINISHED_STOPPED
        if num_output >= params.max_tokens or req.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _truncate_at_stop_string(self, req: Request, new_text: str) -> bool:
        text = self.texts[req.req_id]
        for stop in req.params.stop:
            # Only the tail can hold a new match: the new text plus a stop string's length.
            start = max(0, len(text) - len(new_text) - len(stop) + 1)
            idx = text.find(stop, start)
            if idx != -1:
                self.texts[req.req_id] = text[:idx]  # the stop string is not returned
                req.stop_reason = stop
                return True
        return False

    def text(self, req: Request) -> str:
        if req.req_id in self.detokenizers:
            return self.texts[req.req_id]
        return self.tokenizer.decode(req.output_token_ids,
                                     skip_special_tokens=req.params.skip_special_tokens)

    def remove(self, req_id: str) -> None:
        self.texts.pop(req_id, None)
        self.detokenizers.pop(req_id, None)
