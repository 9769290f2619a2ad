"""The OpenAI wire format, requests: checking request bodies field by field where they enter.

A bad request gets a 400 that names the field (`param`), the value and what is allowed, before
the engine sees it. Besides OpenAI's fields, vLLM's extensions are read: `top_k`, `min_p`,
`repetition_penalty`, `min_tokens`, `ignore_eos`, `stop_token_ids`, `skip_special_tokens`,
`structured_outputs` (and the older `guided_json`/`guided_regex`/`guided_choice`/
`guided_grammar`), `add_generation_prompt`, `continue_final_message`, `priority`,
`prompt_logprobs`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Union

from zllm.entrypoints.tool_calls import ToolRequest, check_tools
from zllm.sampling_params import SamplingParams
from zllm.structured_outputs import StructuredOutputs

Prompt = Union[str, list[int]]

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


def bad_request(message: str, param: Optional[str], code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def json_field(body: dict[str, Any], name: str, kinds: str, default: Any = None,
           required: bool = False) -> Any:
    """body[name], checked against `kinds` ("integer|null"); 400 naming the field otherwise.

    A missing field, or null where null is allowed, gives `default`.
    """
    if name not in body or (body[name] is None and "null" in kinds):
        if required:
            raise bad_request(f"'{name}' is a required field", name, "missing_field")
        return default
    value = body[name]
    for kind in kinds.split("|"):
        # bool is an int in Python, but not in JSON.
        if isinstance(value, _KINDS[kind]) and not (kind in ("integer", "number")
                                                     and isinstance(value, bool)):
            return value
    raise bad_request(f"'{name}' must be {' or '.join(kinds.split('|'))}, got {value!r:.200}",
                      name, "invalid_type")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class GenerateRequest:
    """A checked completion or chat request."""

    model: str
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with usage
    continuous_usage: bool = False  # stream_options.continuous_usage_stats: usage in every chunk
    constraint_param: str = "structured_outputs"  # the field that set params.structured_outputs
    max_tokens_param: str = "max_tokens"  # the field that set params.max_tokens
    # Completions.
    prompts: list[Prompt] = field(default_factory=list)
    echo: bool = False
    # Chat.
    messages: Optional[list[dict[str, Any]]] = None
    tools: Optional[ToolRequest] = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    # vLLM's extension: each choice (and each stream chunk's) carries its new token ids, so a
    # client counts tokens exactly even where they make no text yet.
    return_token_ids: bool = False
    # vLLM's extension: the request's priority under `policy: priority` (lower first).
    priority: int = 0
    # vLLM's extension `prompt_logprobs` was asked for: the response carries them (params may
    # ask for them only for completions' echo with logprobs).
    show_prompt_logprobs: bool = False


def _sampling_params(body: dict[str, Any], max_tokens: Optional[int], logprobs: Optional[int],
                     logprobs_param: str, max_tokens_param: str = "max_tokens",
                     ) -> tuple[SamplingParams, str]:
    stop = json_field(body, "stop", "string|array|null")
    if isinstance(stop, list) and not all(isinstance(s, str) for s in stop):
        raise bad_request(f"'stop' must be a string or a list of strings, got {stop!r}", "stop",
                          "invalid_type")
    stop_token_ids = json_field(body, "stop_token_ids", "array|null", [])
    if not all(is_int(t) for t in stop_token_ids):
        raise bad_request("'stop_token_ids' must be a list of integers", "stop_token_ids",
                          "invalid_type")
    constraint, constraint_param = structured_outputs(body)
    kwargs = dict(
        n=json_field(body, "n", "integer|null", 1),
        temperature=json_field(body, "temperature", "number|null", 1.0),
        top_p=json_field(body, "top_p", "number|null", 1.0),
        top_k=json_field(body, "top_k", "integer|null", -1),
        min_p=json_field(body, "min_p", "number|null", 0.0),
        seed=json_field(body, "seed", "integer|null"),
        presence_penalty=json_field(body, "presence_penalty", "number|null", 0.0),
        frequency_penalty=json_field(body, "frequency_penalty", "number|null", 0.0),
        repetition_penalty=json_field(body, "repetition_penalty", "number|null", 1.0),
        max_tokens=max_tokens,
        min_tokens=json_field(body, "min_tokens", "integer|null", 0),
        stop=stop,
        stop_token_ids=stop_token_ids,
        ignore_eos=json_field(body, "ignore_eos", "boolean|null", False),
        logprobs=logprobs,
        skip_special_tokens=json_field(body, "skip_special_tokens", "boolean|null", True),
        logit_bias=_logit_bias(body),
        structured_outputs=constraint,
        prompt_logprobs=json_field(body, "prompt_logprobs", "integer|null"),
    )
    try:
        return SamplingParams(**kwargs), constraint_param
    except ValueError as e:
        # "SamplingParams.top_p = 2 is out of range ..." -> param "top_p"
        name = str(e).split(" ", 1)[0].removeprefix("SamplingParams.")
        renamed = {"logprobs": logprobs_param, "max_tokens": max_tokens_param}
        param = renamed.get(name, name) if name in kwargs else None
        message = str(e).replace(f"SamplingParams.{name}", param or name)
        raise bad_request(message, param, "out_of_range") from None


def _logit_bias(body: dict[str, Any]) -> Optional[dict[int, float]]:
    """OpenAI's logit_bias: {"token id": bias} (keys are strings in JSON)."""
    bias = json_field(body, "logit_bias", "object|null")
    if bias is None:
        return None
    out = {}
    for key, value in bias.items():
        if not (isinstance(key, str) and key.lstrip("-").isdigit()) or not (
                isinstance(value, (int, float)) and not isinstance(value, bool)):
            raise bad_request(f"'logit_bias' maps token ids to numbers, got {key!r}: {value!r}",
                              "logit_bias", "invalid_type")
        out[int(key)] = float(value)
    return out


_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
           "guided_grammar": "grammar"}


def structured_outputs(body: dict[str, Any]) -> tuple[Optional[StructuredOutputs], str]:
    """The constraint from response_format, structured_outputs or a guided_* field (at most
    one), and the field it came from (errors about the spec name it)."""
    given = [name for name in ("response_format", "structured_outputs", *_GUIDED)
             if body.get(name) is not None]
    if len(given) > 1:
        raise bad_request(f"give one of {', '.join(given)}, not several", given[1])
    if not given:
        return None, "structured_outputs"
    name = given[0]
    try:
        if name == "response_format":
            return _response_format(json_field(body, name, "object")), name
        if name == "structured_outputs":
            spec = dict(json_field(body, name, "object"))
            spec.pop("backend", None)  # vLLM's choice of library; xgrammar is the only one
            return StructuredOutputs(**spec), name
        return StructuredOutputs(**{_GUIDED[name]: body[name]}), name
    except (TypeError, ValueError) as e:
        raise bad_request(f"'{name}': {e}", name) from None


def _response_format(fmt: dict[str, Any]) -> Optional[StructuredOutputs]:
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputs(json_object=True)
    if kind == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise ValueError("type 'json_schema' needs 'json_schema': {'name': ..., 'schema': "
                             "{...}}")
        return StructuredOutputs(json=schema)
    raise ValueError(f"'type' must be 'text', 'json_object' or 'json_schema', got {kind!r}")


def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool, bool]:
    stream = json_field(body, "stream", "boolean|null", False)
    options = json_field(body, "stream_options", "object|null", {})
    if options and not stream:
        raise bad_request("'stream_options' is only allowed with 'stream': true", "stream_options")
    return (stream, bool(options.get("include_usage")),
            bool(options.get("continuous_usage_stats")))


# -- completions -----------------------------------------------------------------------------------

def parse_completion(body: dict[str, Any]) -> GenerateRequest:
    model = json_field(body, "model", "string", required=True)
    prompts = _prompts(json_field(body, "prompt", "string|array", required=True))
    if json_field(body, "suffix", "string|null"):
        raise bad_request("'suffix' is not supported: zllm's models do not fill in the middle",
                          "suffix", "unsupported")
    max_tokens = json_field(body, "max_tokens", "integer|null", 16)
    logprobs = json_field(body, "logprobs", "integer|null")
    params, constraint_param = _sampling_params(body, max_tokens, logprobs, "logprobs")
    best_of = json_field(body, "best_of", "integer|null")
    if best_of is not None and best_of != params.n:
        raise bad_request(f"'best_of' = {best_of} is not supported (as in vLLM V1): ask for "
                          f"n = {best_of} samples and pick among them", "best_of", "unsupported")
    stream, include_usage, continuous = _stream_flags(body)
    echo = json_field(body, "echo", "boolean|null", False)
    show_prompt_logprobs = params.prompt_logprobs is not None
    if echo and logprobs is not None:  # the echoed prompt's tokens carry logprobs too
        params = replace(params, prompt_logprobs=max(logprobs, params.prompt_logprobs or 0))
    return GenerateRequest(model, params, stream, include_usage, continuous, constraint_param,
                           prompts=prompts, echo=echo, return_token_ids=_return_token_ids(body),
                           priority=json_field(body, "priority", "integer|null", 0),
                           show_prompt_logprobs=show_prompt_logprobs)


def _prompts(prompt: Any) -> list[Prompt]:
    """A prompt, or a batch of them: a string, a list of token ids, or a list of either."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(is_int(t) for t in prompt):
        return [prompt]
    if prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if prompt and all(isinstance(p, list) and p and all(is_int(t) for t in p) for p in prompt):
        return list(prompt)
    raise bad_request("'prompt' must be a string, a list of token ids, or a non-empty list of "
                      "strings or of token id lists", "prompt", "invalid_type")


# -- chat ----------------------------------------------------------------------------------------------

def parse_chat(body: dict[str, Any]) -> GenerateRequest:
    model = json_field(body, "model", "string", required=True)
    messages = [_message(m, i) for i, m in enumerate(json_field(body, "messages", "array",
                                                            required=True))]
    if not messages:
        raise bad_request("'messages' must not be empty", "messages")
    max_tokens_param = "max_completion_tokens"
    max_tokens = json_field(body, max_tokens_param, "integer|null")
    if max_tokens is None:  # left out: the reply may use the rest of the context
        max_tokens_param = "max_tokens"
        max_tokens = json_field(body, max_tokens_param, "integer|null")
    want_logprobs = json_field(body, "logprobs", "boolean|null", False)
    top = json_field(body, "top_logprobs", "integer|null")
    if top is not None and not want_logprobs:
        raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    params, constraint_param = _sampling_params(body, max_tokens, (top or 0) if want_logprobs
                                                else None, "top_logprobs", max_tokens_param)
    tools = check_tools(body.get("tools"), body.get("tool_choice"),
                        body.get("parallel_tool_calls"), bad_request)
    if tools is not None and tools.constraint() is not None:
        if params.structured_outputs is not None:
            raise bad_request(f"tool_choice {tools.choice!r} constrains the output already; "
                              f"leave out '{constraint_param}'", constraint_param)
        params.structured_outputs, constraint_param = tools.constraint(), "tools"
    stream, include_usage, continuous = _stream_flags(body)
    add_generation_prompt = json_field(body, "add_generation_prompt", "boolean|null", True)
    continue_final = json_field(body, "continue_final_message", "boolean|null", False)
    return GenerateRequest(model, params, stream, include_usage, continuous, constraint_param,
                           max_tokens_param, messages=messages, tools=tools,
                           add_generation_prompt=add_generation_prompt and not continue_final,
                           continue_final_message=continue_final,
                           return_token_ids=_return_token_ids(body),
                           priority=json_field(body, "priority", "integer|null", 0),
                           show_prompt_logprobs=params.prompt_logprobs is not None)


def _return_token_ids(body: dict[str, Any]) -> bool:
    return json_field(body, "return_token_ids", "boolean|null", False)


_ROLES = ("system", "developer", "user", "assistant", "tool")


def _message(m: Any, i: int) -> dict[str, Any]:
    """One chat message as the chat template takes it: text content (parts joined), and for
    an assistant's tool calls, arguments as objects."""
    where = f"messages[{i}]"
    if not (isinstance(m, dict) and m.get("role") in _ROLES):
        raise bad_request(f"'{where}' must be an object with a 'role' of {', '.join(_ROLES)}, "
                          f"got {m!r:.200}", where, "invalid_type")
    out = {k: v for k, v in m.items() if k in ("role", "name", "tool_call_id")}
    content = m.get("content")
    if isinstance(content, list):
        content = _text_parts(content, where)
    calls = m.get("tool_calls") if m["role"] == "assistant" else None
    if calls:
        out["tool_calls"] = [_tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]
    elif not isinstance(content, str):
        raise bad_request(f"'{where}.content' must be a string or an array of text parts, got "
                          f"{content!r:.200}", f"{where}.content", "invalid_type")
    out["content"] = content
    return out


def _text_parts(parts: list[Any], where: str) -> str:
    """Content given as parts: the texts joined by newlines (as vLLM does)."""
    texts = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in ("image_url", "input_audio", "file", "image", "audio", "video"):
            raise bad_request(f"'{where}.content[{j}]' is of type {kind!r}; zllm takes text "
                              f"only (no multimodal input yet)", f"{where}.content[{j}]",
                              "unsupported")
        else:
            raise bad_request(f"'{where}.content[{j}]' must be {{\"type\": \"text\", \"text\": "
                              f"...}}, got {part!r:.200}", f"{where}.content[{j}]", "invalid_type")
    return "\n".join(texts)


def _tool_call(call: Any, where: str) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not (isinstance(function, dict) and isinstance(function.get("name"), str)):
        raise bad_request(f"'{where}' must be {{\"id\", \"type\": \"function\", \"function\": "
                          f"{{\"name\", \"arguments\"}}}}, got {call!r:.200}", where, "invalid_type")
    arguments = function.get("arguments") or "{}"
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise bad_request(f"'{where}.function.arguments' is not valid JSON: {e}",
                              f"{where}.function.arguments") from None
    return {"id": call.get("id"), "type": "function",
            "function": {"name": function["name"], "arguments": arguments}}


def now() -> int:
    return int(time.time())
