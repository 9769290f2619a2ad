"""Generated text -> assistant content and tool calls, incrementally, as OpenAI streams them.

A parser takes the text as it is generated (`feed`) and says what each piece adds: content
text, and per tool call its id and function name (once the name is complete) and then fragments
of its arguments' JSON text. Fed the whole text at once, it gives the complete calls, so the
streamed and the non-streamed answers come from the same code.

Formats:
- `hermes`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks between content
  (Qwen2.5/Qwen3, Hermes, SmolLM2's family);
- `llama3_json`: `{"name": ..., "parameters": {...}}` objects between content, calls separated
  by `;` (Llama 3.1-3.3; the `<|python_tag|>` token is special, so it never reaches the text);
- `json_array`: the `[{"name": ..., "parameters": {...}}, ...]` text that tool_choice
  "required" constrains the output to;
- `NamedToolParser`: a named tool_choice, where the whole text is the arguments.

Text that could still become the start of a call is held back, as stop strings are, and so is
whitespace at the end of the content: whitespace around calls is dropped. A call whose name is
not among the offered tools, or whose JSON breaks before its name, stays text.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Optional

_ARGUMENT_KEYS = ("arguments", "parameters")
_WS = " \t\r\n"


@dataclass
class ToolCallDelta:
    """What one piece of text adds to tool call `index`: its id and name the first time, then
    argument text."""

    index: int
    id: Optional[str] = None
    name: Optional[str] = None
    arguments: str = ""


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class _Format:
    start: re.Pattern  # where a call begins in content
    could_start: re.Pattern  # a tail of content that may still grow into `start`
    end_tag: Optional[str]  # the call ends here (None: at the end of its JSON object)
    separators: str  # dropped between calls
    keep_content: bool


_FORMATS = {
    "hermes": _Format(re.compile(r"<tool_call>"),
                      re.compile(r"<(t(o(o(l(_(c(a(ll?)?)?)?)?)?)?)?)?$"), "</tool_call>",
                      _WS, True),
    "llama3_json": _Format(re.compile(r'\{(?=\s*"name"\s*:)'),
                           re.compile(r'\{\s*("(n(a(m(e("\s*)?)?)?)?)?)?$'), None, _WS + ";", True),
    "json_array": _Format(re.compile(r"\{"), re.compile(r"(?!)"), None, _WS + ",[]", False),
}


class ToolCallParser:
    """Content and tool calls of one generated text in one of `_FORMATS`."""

    def __init__(self, fmt: str, tool_names: Optional[set[str]] = None) -> None:
        self.fmt = _FORMATS[fmt]
        self.tool_names = tool_names
        self.calls: list[ToolCall] = []
        self.content = ""  # all content so far
        self.pending = ""  # text not parsed yet (held back)
        self.call_text: Optional[str] = None  # the current call's text, from its JSON object on
        self.call_prefix = ""  # the tag that opened the current call, kept in case it is text
        self.announced = False  # whether the current call's name has been sent
        self.after_call = False  # nothing but separators since the last call

    def feed(self, text: str, final: bool = False) -> tuple[str, list[ToolCallDelta]]:
        """Parse new text; returns the content and tool call deltas it completes. `final`: the
        text has ended, so nothing is held back any more."""
        self.pending += text
        content: list[str] = []
        deltas: list[ToolCallDelta] = []
        while (self._content_step(content, final) if self.call_text is None
               else self._call_step(content, deltas, final)):
            pass
        new_content = "".join(content)
        self.content += new_content
        return new_content, _merge(deltas)

    def _content_step(self, content: list[str], final: bool) -> bool:
        text = self.pending
        match = self.fmt.start.search(text)
        if match is None:
            keep = 0 if final else self._holdback(text)
            self._emit_content(content, text[:len(text) - keep])
            self.pending = text[len(text) - keep:]
            return False
        self._emit_content(content, text[:match.start()].rstrip(_WS))
        tagged = self.fmt.end_tag is not None
        self.call_prefix = match.group() if tagged else ""
        self.call_text = text[match.end():] if tagged else text[match.start():]
        self.pending = ""
        return True

    def _emit_content(self, content: list[str], text: str) -> None:
        if self.after_call:
            text = text.lstrip(self.fmt.separators)
            self.after_call = not text
            if text and (self.content or content):  # content on both sides of calls
                text = "\n" + text
        if self.fmt.keep_content and text:
            content.append(text)

    def _holdback(self, text: str) -> int:
        """Length of the end of `text` that may be the beginning of a call, with the whitespace
        before it (dropped if a call does begin there)."""
        keep = 0
        for i in range(max(0, len(text) - 16), len(text)):
            if self.fmt.could_start.match(text, i):
                keep = len(text) - i
                break
        return len(text) - len(text[:len(text) - keep].rstrip(_WS))

    def _call_step(self, content: list[str], deltas: list[ToolCallDelta], final: bool) -> bool:
        self.call_text += self.pending
        self.pending = ""
        text = self.call_text
        start = _skip_ws(text, 0)
        try:
            members, end = _object_members(text, start) if start < len(text) else ({}, None)
        except ValueError:
            return self._broken_call(content, final)
        if not self.announced:
            name = _string_member(text, members, "name")
            if name is not None and self.tool_names is not None and name not in self.tool_names:
                return self._undo_call(content)
            if name is not None:
                self.calls.append(ToolCall(new_call_id(), name))
                self.announced = True
                deltas.append(ToolCallDelta(len(self.calls) - 1, self.calls[-1].id, name))
        if self.announced:
            self._send_arguments(text, members, end is not None, deltas)
        if end is None:
            if final:  # cut off: an announced call ends with what it has
                return self._finish_call("") if self.announced else self._undo_call(content)
            return False
        if not self.announced:  # a whole object without a name
            return self._undo_call(content)
        rest = text[end:]
        if self.fmt.end_tag is not None:
            tag = rest.find(self.fmt.end_tag)
            if tag == -1 and not final:
                return False
            rest = "" if tag == -1 else rest[tag + len(self.fmt.end_tag):]
        return self._finish_call(rest)

    def _send_arguments(self, text: str, members: dict, complete: bool,
                        deltas: list[ToolCallDelta]) -> None:
        call = self.calls[-1]
        key = next((k for k in _ARGUMENT_KEYS if k in members), None)
        if key is None or members[key][0] >= len(text):
            if complete and key is None and not call.arguments:
                call.arguments = "{}"
                deltas.append(ToolCallDelta(len(self.calls) - 1, arguments="{}"))
            return
        value_start, value_end = members[key]
        if text[value_start] in "{[":  # streamed as it grows: every character so far is in it
            arguments = text[value_start:value_end]
        elif value_end is None:
            return  # a string or number: sent whole, once it is complete
        elif text[value_start] == '"':  # arguments given as a JSON string
            arguments = json.loads(text[value_start:value_end])
        else:
            arguments = text[value_start:value_end]
        if len(arguments) > len(call.arguments):
            deltas.append(ToolCallDelta(len(self.calls) - 1,
                                        arguments=arguments[len(call.arguments):]))
            call.arguments = arguments

    def _finish_call(self, rest: str) -> bool:
        self.call_text, self.call_prefix, self.announced = None, "", False
        self.after_call = True
        self.pending = rest + self.pending
        return True

    def _broken_call(self, content: list[str], final: bool) -> bool:
        """JSON that cannot be a call. Before its name: text again (for a tagged block, once the
        tag closes). After its name: the call ends there, and so does its block."""
        tag = self.fmt.end_tag
        if tag is not None and tag not in self.call_text and not final:
            return False
        if not self.announced:
            return self._undo_call(content)
        end = self.call_text.find(tag) + len(tag) if tag is not None and tag in self.call_text \
            else len(self.call_text)
        return self._finish_call(self.call_text[end:] if tag is not None else "")

    def _undo_call(self, content: list[str]) -> bool:
        """The current call was text after all: give it back as content (a tagged block up to
        its end tag; an object only its "{", and the rest is read again)."""
        text, prefix, tag = self.call_text, self.call_prefix, self.fmt.end_tag
        self.call_text, self.call_prefix = None, ""
        if tag is None:
            cut = 1
        else:
            cut = text.find(tag) + len(tag) if tag in text else len(text)
        self._emit_content(content, prefix + text[:cut])
        self.pending = text[cut:] + self.pending
        return True


class NamedToolParser:
    """tool_choice naming one function: the whole generated text is its arguments."""

    def __init__(self, name: str) -> None:
        self.calls = [ToolCall(new_call_id(), name)]
        self.content = ""
        self.started = False

    def feed(self, text: str, final: bool = False) -> tuple[str, list[ToolCallDelta]]:
        call = self.calls[0]
        call.arguments += text
        if not self.started:
            self.started = True
            return "", [ToolCallDelta(0, call.id, call.name, text)]
        return "", [ToolCallDelta(0, arguments=text)] if text else []


def _merge(deltas: list[ToolCallDelta]) -> list[ToolCallDelta]:
    """Consecutive deltas of one call as one."""
    merged: list[ToolCallDelta] = []
    for d in deltas:
        last = merged[-1] if merged else None
        if last is not None and last.index == d.index and d.id is None:
            last.arguments += d.arguments
        else:
            merged.append(ToolCallDelta(d.index, d.id, d.name, d.arguments))
    return merged


# -- a JSON object's text, read as far as it goes ----------------------------------------------

def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


# Numbers (also while they are still being written: "1.", "2e") and literals.
_LITERAL = re.compile(r"-?\d+(\.\d*)?([eE][+-]?\d*)?|true|false|null")


def _value_end(text: str, i: int) -> Optional[int]:
    """Where the JSON value starting at text[i] ends; None if the text ends first. Raises
    ValueError where the text cannot be JSON."""
    c = text[i]
    if c == '"':
        j = i + 1
        while j < len(text):
            if text[j] == "\\":
                j += 2
            elif text[j] == '"':
                return j + 1
            else:
                j += 1
        return None
    if c in "{[":
        depth, in_string, j = 0, False, i
        while j < len(text):
            ch = text[j]
            if in_string:
                if ch == "\\":
                    j += 1
                elif ch == '"':
                    in_string = False
            elif ch == '"':
                in_string = True
            elif ch in "{[":
                depth += 1
            elif ch in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        return None
    match = _LITERAL.match(text, i)
    if match is None:
        if c in "-tfn" and len(text) - i < 5:
            return None  # the start of a number or literal
        raise ValueError(f"not JSON at {i}")
    return match.end() if match.end() < len(text) else None  # a number may go on


def _object_members(text: str, i: int) -> tuple[dict[str, tuple[int, Optional[int]]], Optional[int]]:
    """The members of the JSON object at text[i] read so far: key -> (value start, value end or
    None), and where the object ends (None while it is open)."""
    if text[i] != "{":
        raise ValueError("a call is a JSON object")
    members: dict[str, tuple[int, Optional[int]]] = {}
    i = _skip_ws(text, i + 1)
    while i < len(text):
        if text[i] == "}":
            return members, i + 1
        if text[i] == ",":
            i = _skip_ws(text, i + 1)
            continue
        if text[i] != '"':
            raise ValueError(f"expected a key at {i}")
        key_end = _value_end(text, i)
        if key_end is None:
            break
        key = json.loads(text[i:key_end])
        i = _skip_ws(text, key_end)
        if i >= len(text):
            break
        if text[i] != ":":
            raise ValueError(f"expected ':' at {i}")
        i = _skip_ws(text, i + 1)
        if i >= len(text):
            members[key] = (i, None)
            break
        end = _value_end(text, i)
        members[key] = (i, end)
        if end is None:
            break
        i = _skip_ws(text, end)
    return members, None


def _string_member(text: str, members: dict, key: str) -> Optional[str]:
    start, end = members.get(key, (0, None))
    if end is None or text[start] != '"':
        return None
    return json.loads(text[start:end])
