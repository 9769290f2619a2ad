"""Structured outputs and tool calling over HTTP with the official openai client, on a random
model at temperature 1: only the grammar keeps the outputs valid."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import openai
import pytest

from tests.entrypoints.conftest import MODEL_NAME
from tests.test_structured_outputs import _schema

CHAT = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 10},
    "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}
TIME = {"type": "object", "properties": {"tz": {"type": "integer", "minimum": -12, "maximum": 14}},
        "required": ["tz"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
SAMPLED = dict(temperature=1.0, max_tokens=300)
CALLS = dict(temperature=1.0, max_tokens=1000)  # ~45 tokens per call; several calls at times


def test_response_format_json_schema_and_json_object_in_chat_and_completions(openai_client):
    rng = random.Random(99)
    for i in range(12):
        schema = _schema(rng)
        out = openai_client.chat.completions.create(
            model=MODEL_NAME, messages=CHAT, seed=i, **SAMPLED,
            response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}})
        assert out.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(out.choices[0].message.content), schema)
    completion = openai_client.completions.create(
        model=MODEL_NAME, prompt="JSON:", seed=3, **SAMPLED,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {"schema": WEATHER}}})
    jsonschema.validate(json.loads(completion.choices[0].text), WEATHER)
    kwargs = dict(model=MODEL_NAME, messages=CHAT, seed=5, **SAMPLED,
                  response_format={"type": "json_object"})
    whole = openai_client.chat.completions.create(**kwargs).choices[0]
    streamed = "".join(c.choices[0].delta.content or ""
                       for c in openai_client.chat.completions.create(stream=True, **kwargs))
    assert streamed == whole.message.content and whole.message.content.startswith("{")
    if whole.finish_reason == "stop":
        assert isinstance(json.loads(whole.message.content), dict)


@pytest.mark.parametrize("fields, check", [
    ({"structured_outputs": {"regex": r"[0-9]{3}-[a-z]{2,4}"}},
     lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t)),
    ({"structured_outputs": {"choice": ["red", "green", "blue"]}}, lambda t: t in ("red", "green", "blue")),
    ({"guided_choice": ["yes", "no"]}, lambda t: t in ("yes", "no")),
    ({"structured_outputs": {"grammar": 'root ::= "(" [a-c]{1,4} ")"'}},
     lambda t: re.fullmatch(r"\([a-c]{1,4}\)", t)),
    ({"structured_outputs": {"json": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}}},
     lambda t: isinstance(json.loads(t), list)),
])
def test_structured_outputs_field_regex_choice_grammar_json(openai_client, fields, check):
    out = openai_client.completions.create(model=MODEL_NAME, prompt="Answer:", n=8, seed=11,
                                           **SAMPLED, extra_body=fields)
    for choice in out.choices:
        assert choice.finish_reason == "stop" and check(choice.text), choice.text


@pytest.mark.parametrize("fields, param, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "foo"}}}},
     "response_format", "Unsupported type"),
    ({"response_format": {"type": "xml"}}, "response_format", "'type' must be"),
    ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs", "invalid regex '[a-'"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex", "not several"),
])
def test_invalid_constraints_get_400_naming_the_field(openai_client, fields, param, message):
    with pytest.raises(openai.BadRequestError) as err:
        openai_client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=4,
                                              extra_body=fields)
    assert err.value.body["param"] == param and message in err.value.body["message"]


# -- tool calling ------------------------------------------------------------------------------------

def _streamed_calls(stream) -> tuple[list, list[tuple[str, str]], str]:
    """(finish reasons, calls rebuilt from OpenAI's tool_calls deltas, content)."""
    calls: dict[int, list] = {}
    finish, content = [], ""
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for d in choice.delta.tool_calls or []:
                if d.id is not None:
                    assert d.type == "function" and d.function.name and d.index not in calls
                    calls[d.index] = [d.function.name, ""]
                calls[d.index][1] += d.function.arguments or ""
            if choice.finish_reason:
                finish.append(choice.finish_reason)
    return finish, [tuple(c) for _, c in sorted(calls.items())], content


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function",
                                                      "function": {"name": "get_time"}}])
def test_required_and_named_tool_calls_always_parse_on_a_random_model(openai_client, tool_choice):
    calls = []
    for seed in range(5):
        out = openai_client.chat.completions.create(model=MODEL_NAME, messages=CHAT, tools=TOOLS,
                                                    tool_choice=tool_choice, n=20, seed=seed,
                                                    **CALLS)
        for choice in out.choices:
            assert choice.finish_reason == "tool_calls" and choice.message.content is None
            calls += choice.message.tool_calls
    assert len(calls) >= 100
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    names = {c.function.name for c in calls}
    assert names == ({"get_weather", "get_time"} if tool_choice == "required" else {"get_time"})
    kwargs = dict(model=MODEL_NAME, messages=CHAT, tools=TOOLS, tool_choice=tool_choice, seed=7,
                  **CALLS)
    whole = openai_client.chat.completions.create(**kwargs).choices[0].message
    finish, streamed, content = _streamed_calls(
        openai_client.chat.completions.create(stream=True, **kwargs))
    assert finish == ["tool_calls"] and content == ""
    assert streamed == [(c.function.name, c.function.arguments) for c in whole.tool_calls]


def test_tool_choice_none_and_auto_on_a_random_model(openai_client):
    none = openai_client.chat.completions.create(model=MODEL_NAME, messages=CHAT, tools=TOOLS,
                                                 tool_choice="none", max_tokens=8, temperature=0)
    plain = openai_client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=8,
                                                  temperature=0)
    assert none.choices[0].message.content == plain.choices[0].message.content
    assert none.choices[0].message.tool_calls is None
    finish, calls, content = _streamed_calls(openai_client.chat.completions.create(
        model=MODEL_NAME, messages=CHAT, tools=TOOLS, tool_choice="none", max_tokens=8,
        temperature=0, stream=True))
    assert (finish, calls, content) == ([none.choices[0].finish_reason], [],
                                        none.choices[0].message.content)
    # auto: the tools reach the prompt (the demo template ignores `tools`, so zllm writes them
    # into the system message in the Hermes format), and whatever the model says is parsed.
    auto = dict(model=MODEL_NAME, messages=CHAT, tools=TOOLS, max_tokens=20, seed=1, temperature=1.0)
    whole = openai_client.chat.completions.create(**auto).choices[0]
    finish, calls, content = _streamed_calls(openai_client.chat.completions.create(stream=True, **auto))
    assert finish == [whole.finish_reason] and content == (whole.message.content or "")
    assert calls == [(c.function.name, c.function.arguments) for c in whole.message.tool_calls or []]
    prompt = openai_client.post("/../tokenize", body={"messages": CHAT, "tools": TOOLS,
                                                      "return_token_strs": True}, cast_to=object)
    text = "".join(prompt["token_strs"])
    assert "<tools>" in text and "get_weather" in text and "<tool_call>" in text


@pytest.mark.parametrize("body, param", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0]"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format"),
])
def test_bad_tool_requests_get_400(openai_client, body, param):
    with pytest.raises(openai.BadRequestError) as err:
        openai_client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=4,
                                              extra_body=body)
    assert err.value.body["param"] == param, err.value.body
