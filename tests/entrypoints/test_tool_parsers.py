"""The tool-call parsers turn fixed Llama 3 and Hermes texts into the right calls, whole and split
across stream chunks at every position."""

from __future__ import annotations

import json

import pytest

from zllm.entrypoints.tool_parsers import NamedToolParser, ToolCallParser

NAMES = {"get_weather", "get_time"}
WEATHER = ("get_weather", '{"city": "Paris", "unit": "celsius"}')
TRICKY = ("get_weather", '{"city": "Paris, \\"FR\\" {x} [y] </tool_call>"}')
TIME = ("get_time", "{}")

# (format, text, content, calls)
CASES = [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": '
               '"celsius"}}\n</tool_call>', "", [WEATHER]),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": '
               '"celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n'
               '</tool_call>', "", [WEATHER, TIME]),
    ("hermes", 'Let me look that up.\n<tool_call>\n{"name": "get_weather", "arguments": '
               '{"city": "Paris, \\"FR\\" {x} [y] </tool_call>"}}\n</tool_call>\nOne moment < 3.',
     "Let me look that up.\nOne moment < 3.", [TRICKY]),
    ("hermes", "No tools needed: 1 < 2 and <b>bold</b>.", "No tools needed: 1 < 2 and <b>bold</b>.",
     []),
    ("hermes", '<tool_call>\n{"name": "unknown", "arguments": {}}\n</tool_call>',
     '<tool_call>\n{"name": "unknown", "arguments": {}}\n</tool_call>', []),
    ("hermes", "<tool_call>not json</tool_call> then text", "<tool_call>not json</tool_call> then text",
     []),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
     "", [WEATHER]),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
                    '{"name": "get_time", "parameters": {}}', "", [WEATHER, TIME]),
    ("llama3_json", 'Checking. {"name": "get_weather", "parameters": {"city": "Paris, \\"FR\\" {x} '
                    '[y] </tool_call>"}} Then {"a": 1} stays text.',
     'Checking.\nThen {"a": 1} stays text.', [TRICKY]),
    ("llama3_json", '{"name": "get_time", "arguments": "{}"}', "", [TIME]),
    ("llama3_json", '{"name": "Bob", "age": 3}', '{"name": "Bob", "age": 3}', []),
    ("json_array", '[{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}, '
                   '{"name": "get_time", "parameters": {}}]', "", [WEATHER, TIME]),
]


def _parse(fmt: str, pieces: list[str]) -> tuple[str, list[tuple[str, str]], list[dict]]:
    """Feed the pieces as stream chunks; (content, calls rebuilt from the deltas, deltas)."""
    parser = ToolCallParser(fmt, NAMES)
    content, calls, deltas = "", {}, []
    for k, piece in enumerate(pieces):
        text, new = parser.feed(piece, final=k == len(pieces) - 1)
        content += text
        for d in new:
            if d.id is not None:
                assert d.index == len(calls) and d.id.startswith("call_") and d.name
                calls[d.index] = [d.name, ""]
            calls[d.index][1] += d.arguments
            deltas.append(d)
    rebuilt = [(name, args) for name, args in calls.values()]
    assert rebuilt == [(c.name, c.arguments) for c in parser.calls]
    return content, rebuilt, deltas


@pytest.mark.parametrize("fmt, text, content, calls", CASES)
def test_parsers_find_the_calls_whole_and_split_at_every_position(fmt, text, content, calls):
    assert _parse(fmt, [text])[:2] == (content, calls)
    for args in (a for _, a in calls):
        json.loads(args)
    assert _parse(fmt, list(text))[:2] == (content, calls)  # one character per chunk
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1, 5):
            assert _parse(fmt, [text[:i], text[i:j], text[j:]])[:2] == (content, calls), (i, j)


def test_arguments_stream_as_they_are_generated_and_names_come_first():
    text = CASES[0][1]
    _, _, deltas = _parse("hermes", list(text))
    assert deltas[0].name == "get_weather" and deltas[0].arguments == ""
    assert len(deltas) > 10  # argument fragments as characters arrive, not one block at the end
    assert all(d.id is None and d.name is None for d in deltas[1:])


def test_held_back_text_is_released_when_the_text_ends():
    parser = ToolCallParser("hermes", NAMES)
    assert parser.feed("Hello <tool") == ("Hello", [])
    assert parser.feed("", final=True) == (" <tool", [])


def test_a_call_cut_off_by_max_tokens_keeps_what_it_has():
    parser = ToolCallParser("llama3_json", NAMES)
    parser.feed('{"name": "get_weather", "parameters": {"city": "Pa', final=True)
    assert [(c.name, c.arguments) for c in parser.calls] == [("get_weather", '{"city": "Pa')]


def test_named_tool_parser_sends_the_name_then_the_text_as_arguments():
    parser = NamedToolParser("get_time")
    (_, first), (_, second) = parser.feed('{"tz": '), parser.feed('"UTC"}', final=True)
    assert (first[0].name, first[0].arguments, second[0].arguments) == ("get_time", '{"tz": ', '"UTC"}')
    assert parser.calls[0].arguments == '{"tz": "UTC"}'
