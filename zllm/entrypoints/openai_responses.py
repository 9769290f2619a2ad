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
    text to put before each completion (completions' echo; with logprobs, the echoed prompt's
    tokens lead the logprobs too); parser: makes a tool-call parser per sample (chat with
    tools), or None; prompt_logprobs: completions' choices carry vLLM's `prompt_logprobs`.
    """

    def __init__(self, tokenizer, n: int, chat: bool, num_top_logprobs: Optional[int],
                 index_base: int = 0, echo_text: Optional[str] = None,
                 parser: Optional[Callable[[], Any]] = None, token_ids: bool = False,
                 prompt_logprobs: bool = False) -> None:
        self.tokenizer, self.chat, self.num_top = tokenizer, chat, num_top_logprobs
        self.index_base, self.echo_text = index_base, echo_text
        self.show_prompt_logprobs = prompt_logprobs
        self.prompt: Optional[RequestOutput] = None  # the output that carried prompt logprobs
        self.token_ids = token_ids  # vLLM's return_token_ids: each choice carries its token ids
        self.parsers = [parser() for _ in range(n)] if parser is not None else None
        self.text_offset, self.num_tokens = [0] * n, [0] * n
        self.started, self.done = [False] * n, [False] * n
        # Tokens (and their logprobs) not yet sent in a chunk: they made no text so far.
        self.unsent_ids: list[list[int]] = [[] for _ in range(n)]
        self.unsent_logprobs: list[list] = [[] for _ in range(n)]

    def logprobs(self, token_ids, logprobs, text_offset: int,
                  first: bool = False) -> Optional[dict[str, Any]]:
        """A sample's logprobs object for these tokens; the `first` of a completion with echo
        leads with the prompt's tokens."""
        if logprobs is None:
            return None
        if self.chat:
            return chat_logprobs(self.tokenizer, token_ids, logprobs, self.num_top or 0)
        if first and self.echo_text is not None and self.prompt is not None:
            ids, prompt = self.prompt.prompt_token_ids, self.prompt.prompt_logprobs
            echoed = [None if top is None else _top(top, t, self.num_top or 0)
                      for t, top in zip(ids, prompt)]
            return completion_logprobs(self.tokenizer, ids + token_ids, echoed + logprobs, 0)
        return completion_logprobs(self.tokenizer, token_ids, logprobs, text_offset)

    def prompt_logprobs(self) -> Optional[list[Optional[dict[str, Any]]]]:
        """vLLM's `prompt_logprobs`: per prompt token (None for the first), token id -> its
        log-probability, rank and text, the prompt's own token first."""
        if self.prompt is None:
            return None
        out: list[Optional[dict[str, Any]]] = [None]
        p = self.prompt
        for token, top, rank in zip(p.prompt_token_ids[1:], p.prompt_logprobs[1:],
                                    p.prompt_token_ranks[1:]):
            ranks = {t: 1 + sum(v > lp for v in top.values()) for t, lp in top.items()}
            ranks[token] = rank
            out.append({str(t): {"logprob": top[t], "rank": ranks[t],
                                 "decoded_token": self.tokenizer.decode([t])}
                        for t in [token] + [t for t in top if t != token]})
        return out

    def _note_prompt(self, out: RequestOutput) -> None:
        if out.prompt_logprobs is not None and self.prompt is None:
            self.prompt = out

    def full(self, out: RequestOutput) -> list[dict[str, Any]]:
        """The finished choices of a (non-streaming) request's final output."""
        self._note_prompt(out)
        choices = []
        for c in out.outputs:
            self.num_tokens[c.index] = len(c.token_ids)
            choice: dict[str, Any] = {"index": self.index_base + c.index,
                                      "logprobs": self.logprobs(c.token_ids, c.logprobs, 0, True)}
            if self.chat:
                content, _ = self._parse(c.index, c.text, True)
                calls = self.parsers[c.index].calls if self.parsers is not None else []
                choice["message"] = _message(content, calls, self.parsers is not None)
                choice["finish_reason"] = _finish_reason(c.finish_reason, self._called(c.index))
            else:
                choice["text"] = (self.echo_text or "") + c.text
                choice["finish_reason"] = c.finish_reason
                if self.show_prompt_logprobs:
                    choice["prompt_logprobs"] = self.prompt_logprobs()
            if self.token_ids:
                choice["token_ids"] = c.token_ids
            choices.append(choice)
        return choices

    def deltas(self, out: RequestOutput) -> list[dict[str, Any]]:
        """Chunk choices for a delta output: one per sample with news (text, or its end)."""
        self._note_prompt(out)
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
            first = not self.started[i]
            logprobs = self.logprobs(self.unsent_ids[i], self.unsent_logprobs[i],
                                     self.text_offset[i], first) if c.logprobs is not None else None
            choice: dict[str, Any] = {"index": self.index_base + i, "logprobs": logprobs}
            if self.chat:
                choice["delta"] = delta
                choice["finish_reason"] = _finish_reason(c.finish_reason, self._called(i))
            else:
                choice["text"] = delta["content"]
                choice["finish_reason"] = c.finish_reason
                if first and self.show_prompt_logprobs:
                    choice["prompt_logprobs"] = self.prompt_logprobs()
                if first and self.echo_text:
                    self.text_offset[i] += len(self.echo_text)
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
    for token_id, top in zip(token_ids, logprobs):  # top is None for an echoed first token
        token = tokenizer.decode([token_id])
        tokens.append(token)
        token_lps.append(None if top is None else top.get(token_id))
        tops.append(None if top is None else {tokenizer.decode([t]): lp for t, lp in top.items()})
        offsets.append(text_offset)
        text_offset += len(token)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
            "text_offset": offsets}


def _ranked(top: dict[int, float], k: int) -> list[tuple[int, float]]:
    """The k likeliest (token id, log-probability) entries of `top`, likeliest first."""
    return sorted(top.items(), key=lambda kv: -kv[1])[:k]


def _top(top: dict[int, float], token: int, k: int) -> dict[int, float]:
    """The k likeliest entries of `top`, and the token's own."""
    kept = dict(_ranked(top, k))
    kept[token] = top[token]
    return kept


def chat_logprobs(tokenizer, token_ids: list[int], logprobs: list[dict[int, float]],
                  num_top: int) -> dict[str, list]:
    """The chat format: one entry per token with its top alternatives."""
    def entry(t: int, lp: float) -> dict[str, Any]:
        token = tokenizer.decode([t])
        return {"token": token, "logprob": lp, "bytes": list(token.encode())}

    content = []
    for token_id, top in zip(token_ids, logprobs):
        item = entry(token_id, top.get(token_id))
        item["top_logprobs"] = [entry(t, lp) for t, lp in _ranked(top, num_top)]
        content.append(item)
    return {"content": content}
