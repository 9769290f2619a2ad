"""The OpenAI wire format, responses: choices (whole or as stream deltas), usage, logprobs.

One `Choices` serves the samples of one prompt. A completions request with several prompts has
one per prompt, numbered in OpenAI's order: choice index = prompt index * n + sample index. In
chat, a tool-call parser (zllm/entrypoints/tool_parsers.py) splits each sample's text into
content and `tool_calls`; a sample that called tools and then stopped finishes with
"tool_calls".
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from zllm.entrypoints.tool_parsers import ToolCall, ToolCallDelta
from zllm.outputs import CompletionOutput, RequestOutput


def usage(prompt_tokens: int, completion_tokens: int,
          cached_tokens: Optional[int] = None) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                            "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens is not None:
        body["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return body


class Choices:
    """OpenAI choices of one prompt's samples.

    tokenizer: for logprob tokens; index_base: the first choice index; echo_text: the prompt's
    text to put before each completion (completions' echo); parser: makes a tool-call parser
    per sample (chat with tools), or None.
    """

    def __init__(self, tokenizer, n: int, chat: bool, num_top_logprobs: Optional[int],
                 index_base: int = 0, echo_text: Optional[str] = None,
                 parser: Optional[Callable[[], Any]] = None, token_ids: bool = False) -> None:
        self.tokenizer, self.chat, self.num_top = tokenizer, chat, num_top_logprobs
        self.index_base, self.echo_text = index_base, echo_text
        self.token_ids = token_ids  # vLLM's return_token_ids: each choice carries its token ids
        self.parsers = [parser() for _ in range(n)] if parser is not None else None
        self.text_offset, self.num_tokens = [0] * n, [0] * n
        self.started, self.done = [False] * n, [False] * n
        # Tokens (and their logprobs) not yet sent in a chunk: they made no text so far.
        self.unsent_ids: list[list[int]] = [[] for _ in range(n)]
        self.unsent_logprobs: list[list] = [[] for _ in range(n)]

    def logprobs(self, token_ids, logprobs, text_offset: int) -> Optional[dict[str, Any]]:
        if logprobs is None:
            return None
        if self.chat:
            return chat_logprobs(self.tokenizer, token_ids, logprobs, self.num_top or 0)
        return completion_logprobs(self.tokenizer, token_ids, logprobs, text_offset)

    def full(self, out: RequestOutput) -> list[dict[str, Any]]:
        """The finished choices of a (non-streaming) request's final output."""
        choices = []
        for c in out.outputs:
            self.num_tokens[c.index] = len(c.token_ids)
            choice: dict[str, Any] = {"index": self.index_base + c.index,
                                      "logprobs": self.logprobs(c.token_ids, c.logprobs, 0)}
            if self.chat:
                content, _ = self._parse(c.index, c.text, True)
                calls = self.parsers[c.index].calls if self.parsers is not None else []
                choice["message"] = _message(content, calls, self.parsers is not None)
                choice["finish_reason"] = _finish_reason(c.finish_reason, self._called(c.index))
            else:
                choice["text"] = (self.echo_text or "") + c.text
                choice["finish_reason"] = c.finish_reason
            if self.token_ids:
                choice["token_ids"] = c.token_ids
            choices.append(choice)
        return choices

    def deltas(self, out: RequestOutput) -> list[dict[str, Any]]:
        """Chunk choices for a delta output: one per sample with news (text, or its end)."""
        choices = []
        for c in out.outputs:
            i = c.index
            if self.done[i]:
                continue
            self.num_tokens[i] += len(c.token_ids)
            self.unsent_ids[i] += c.token_ids
            self.unsent_logprobs[i] += c.logprobs or []
            delta = self._delta(c)
            if delta is None:
                continue  # nothing to say yet (half a character, text held back)
            logprobs = self.logprobs(self.unsent_ids[i], self.unsent_logprobs[i],
                                     self.text_offset[i]) if c.logprobs is not None else None
            choice: dict[str, Any] = {"index": self.index_base + i, "logprobs": logprobs}
            if self.chat:
                choice["delta"] = delta
                choice["finish_reason"] = _finish_reason(c.finish_reason, self._called(i))
            else:
                choice["text"] = delta["content"]
                choice["finish_reason"] = c.finish_reason
            if self.token_ids:
                choice["token_ids"] = self.unsent_ids[i]
            choices.append(choice)
            self.started[i], self.done[i] = True, c.finished
            self.text_offset[i] += len(c.text)
            self.unsent_ids[i], self.unsent_logprobs[i] = [], []
        return choices

    def _delta(self, c: CompletionOutput) -> Optional[dict[str, Any]]:
        i, first = c.index, not self.started[c.index]
        content, calls = self._parse(i, c.text, c.finished)
        if first and self.echo_text:
            content = self.echo_text + content
        if not (content or calls or c.finished or first or (self.token_ids and c.token_ids)):
            return None
        delta: dict[str, Any] = {"role": "assistant"} if first and self.chat else {}
        if content or not calls:
            delta["content"] = content
        if calls:
            delta["tool_calls"] = [_call_delta(d) for d in calls]
        return delta

    def _parse(self, i: int, text: str, final: bool) -> tuple[str, list[ToolCallDelta]]:
        if self.parsers is None:
            return text, []
        return self.parsers[i].feed(text, final)

    def _called(self, i: int) -> bool:
        return self.parsers is not None and bool(self.parsers[i].calls)


def _message(content: str, calls: list[ToolCall], tools: bool) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content or (None if tools else "")}
    if calls:
        message["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.name, "arguments": c.arguments}}
                                 for c in calls]
    return message


def _call_delta(d: ToolCallDelta) -> dict[str, Any]:
    if d.id is None:
        return {"index": d.index, "function": {"arguments": d.arguments}}
    return {"index": d.index, "id": d.id, "type": "function",
            "function": {"name": d.name, "arguments": d.arguments}}


def _finish_reason(reason: Optional[str], called: bool) -> Optional[str]:
    return "tool_calls" if called and reason == "stop" else reason


def completion_logprobs(tokenizer, token_ids: list[int], logprobs: list[dict[int, float]],
                        text_offset: int) -> dict[str, list]:
    """The legacy completions format: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for token_id, top in zip(token_ids, logprobs):
        token = tokenizer.decode([token_id])
        tokens.append(token)
        token_lps.append(top.get(token_id))
        tops.append({tokenizer.decode([t]): lp for t, lp in top.items()})
        offsets.append(text_offset)
        text_offset += len(token)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
            "text_offset": offsets}


def chat_logprobs(tokenizer, token_ids: list[int], logprobs: list[dict[int, float]],
                  num_top: int) -> dict[str, list]:
    """The chat format: one entry per token with its top alternatives."""
    def entry(t: int, lp: float) -> dict[str, Any]:
        token = tokenizer.decode([t])
        return {"token": token, "logprob": lp, "bytes": list(token.encode())}

    content = []
    for token_id, top in zip(token_ids, logprobs):
        item = entry(token_id, top.get(token_id))
        ranked = sorted(top.items(), key=lambda kv: -kv[1])[:num_top]
        item["top_logprobs"] = [entry(t, lp) for t, lp in ranked]
        content.append(item)
    return {"content": content}
