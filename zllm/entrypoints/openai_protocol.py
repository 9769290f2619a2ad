"""The OpenAI wire format: checking request bodies, and the shapes of responses and errors.

Requests are checked field by field where they enter, so a bad one gets a 400 that names the
field (`param`), the value and what is allowed, before the engine sees it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional, Union

from zllm.sampling_params import SamplingParams

# JSON type names as the error messages say them, and the Python types that match each.
_KINDS: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
    "object": (dict,), "array": (list,), "null": (type(None),),
}


class APIError(Exception):
    """An error the client caused (or a server failure), sent as OpenAI's error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def _field(body: dict[str, Any], name: str, kinds: str, default: Any = None,
           required: bool = False) -> Any:
    """body[name], checked against `kinds` ("integer|null"); 400 naming the field otherwise.

    A missing field, or null where null is allowed, gives `default`.
    """
    if name not in body or (body[name] is None and "null" in kinds):
        if required:
            raise APIError(400, f"'{name}' is a required field", param=name, code="missing_field")
        return default
    value = body[name]
    for kind in kinds.split("|"):
        # bool is an int in Python, but not in JSON.
        if isinstance(value, _KINDS[kind]) and not (kind in ("integer", "number")
                                                     and isinstance(value, bool)):
            return value
    raise APIError(400, f"'{name}' must be {' or '.join(kinds.split('|'))}, got {value!r}",
                   param=name, code="invalid_type")


@dataclass
class GenerateRequest:
    """A checked completion or chat request."""

    model: str
    prompt: Union[str, list[int], None]  # None for chat: messages instead
    messages: Optional[list[dict[str, str]]]
    params: SamplingParams
    stream: bool
    include_usage: bool
    chat_logprobs: bool = False
    # vLLM's extension: each choice (and each stream chunk's) carries its new token ids, so a
    # client counts tokens exactly even where they make no text yet.
    return_token_ids: bool = False


def _sampling_params(body: dict[str, Any], max_tokens: int, logprobs: Optional[int]) -> SamplingParams:
    stop = _field(body, "stop", "string|array|null")
    if isinstance(stop, list) and not all(isinstance(s, str) for s in stop):
        raise APIError(400, f"'stop' must be a string or a list of strings, got {stop!r}", param="stop",
                       code="invalid_type")
    stop_token_ids = _field(body, "stop_token_ids", "array|null", [])
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_token_ids):
        raise APIError(400, "'stop_token_ids' must be a list of integers", param="stop_token_ids",
                       code="invalid_type")
    kwargs = dict(
        n=_field(body, "n", "integer|null", 1),
        temperature=_field(body, "temperature", "number|null", 1.0),
        top_p=_field(body, "top_p", "number|null", 1.0),
        top_k=_field(body, "top_k", "integer|null", -1),
        min_p=_field(body, "min_p", "number|null", 0.0),
        seed=_field(body, "seed", "integer|null"),
        presence_penalty=_field(body, "presence_penalty", "number|null", 0.0),
        frequency_penalty=_field(body, "frequency_penalty", "number|null", 0.0),
        repetition_penalty=_field(body, "repetition_penalty", "number|null", 1.0),
        max_tokens=max_tokens,
        min_tokens=_field(body, "min_tokens", "integer|null", 0),
        stop=stop,
        stop_token_ids=stop_token_ids,
        ignore_eos=_field(body, "ignore_eos", "boolean|null", False),
        logprobs=logprobs,
        skip_special_tokens=_field(body, "skip_special_tokens", "boolean|null", True),
    )
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:
        # "SamplingParams.top_p = 2 is out of range ..." -> param "top_p"
        name = str(e).split(" ", 1)[0].removeprefix("SamplingParams.")
        raise APIError(400, str(e), param=name if name in kwargs else None,
                       code="out_of_range") from None


def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = _field(body, "stream", "boolean|null", False)
    options = _field(body, "stream_options", "object|null", {})
    return stream, bool(stream and options.get("include_usage"))


def parse_completion(body: dict[str, Any]) -> GenerateRequest:
    model = _field(body, "model", "string", required=True)
    prompt = _field(body, "prompt", "string|array", required=True)
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list) and not all(isinstance(t, int) and not isinstance(t, bool)
                                            for t in prompt):
        raise APIError(400, "'prompt' must be a string or a list of token ids (one prompt per "
                       "request)", param="prompt", code="invalid_type")
    max_tokens = _field(body, "max_tokens", "integer|null")
    logprobs = _field(body, "logprobs", "integer|null")
    params = _sampling_params(body, 16 if max_tokens is None else max_tokens, logprobs)
    stream, include_usage = _stream_flags(body)
    return GenerateRequest(model, prompt, None, params, stream, include_usage,
                           return_token_ids=_field(body, "return_token_ids", "boolean|null", False))


def parse_chat(body: dict[str, Any], max_model_len: int) -> GenerateRequest:
    model = _field(body, "model", "string", required=True)
    messages = _field(body, "messages", "array", required=True)
    if not messages:
        raise APIError(400, "'messages' must not be empty", param="messages", code="invalid_value")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
            raise APIError(400, f"'messages[{i}]' must be an object with string 'role' and "
                           f"'content', got {m!r}", param=f"messages[{i}]", code="invalid_type")
    max_tokens = _field(body, "max_completion_tokens", "integer|null")
    if max_tokens is None:
        max_tokens = _field(body, "max_tokens", "integer|null")
    want_logprobs = _field(body, "logprobs", "boolean|null", False)
    top = _field(body, "top_logprobs", "integer|null", 0)
    logprobs = top if want_logprobs else None
    # Without max_tokens a reply may run to the context limit (the engine stops it there).
    params = _sampling_params(body, max_model_len if max_tokens is None else max_tokens, logprobs)
    stream, include_usage = _stream_flags(body)
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    return GenerateRequest(model, None, messages, params, stream, include_usage, want_logprobs,
                           _field(body, "return_token_ids", "boolean|null", False))


# -- responses -----------------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def now() -> int:
    return int(time.time())


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
