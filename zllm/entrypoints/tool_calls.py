"""Tool calling in chat requests: `tools`, `tool_choice`, and what each choice asks of the engine.

- `none`: the tools stay out of the prompt and the output is plain content.
- `auto`: the tools go into the prompt through the model's chat template (`tools=`), and a parser
  for the model's own format (zllm/entrypoints/tool_parsers.py) finds the calls in its output.
- `required`: the output is constrained by a grammar to a JSON array of calls of the offered
  tools, so it always parses; a named function: to that function's arguments.

A chat template that ignores `tools` (SmolLM2's, say) would leave the model unaware of them, so
for such a template the tools are written into the system message in the parser's format (the
words Qwen2.5's template uses for Hermes calls), and earlier assistant tool calls into their
messages' text.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass
from typing import Any, Optional

from zllm.frontend.chat_template import render_chat_text
from zllm.structured_outputs import StructuredOutputs

_EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass
class ToolRequest:
    """A chat request's tools (OpenAI's function tool objects) and its checked tool_choice."""

    tools: list[dict[str, Any]]
    choice: str  # none | auto | required | function
    function: Optional[str] = None  # the name, for choice "function"
    parallel: bool = True  # parallel_tool_calls

    @property
    def names(self) -> set[str]:
        return {t["function"]["name"] for t in self.tools}

    def constraint(self) -> Optional[StructuredOutputs]:
        """The grammar that makes the output a call: required and named choices only."""
        if self.choice == "function":
            tool = next(t for t in self.tools if t["function"]["name"] == self.function)
            return StructuredOutputs(json=_parameters(tool))
        if self.choice == "required":
            items = [{"type": "object", "properties": {
                "name": {"type": "string", "enum": [t["function"]["name"]]},
                "parameters": _parameters(t)}, "required": ["name", "parameters"]}
                for t in self.tools]
            array = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
            if not self.parallel:
                array["maxItems"] = 1
            return StructuredOutputs(json=array)
        return None


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    return tool["function"].get("parameters") or _EMPTY_PARAMETERS


def check_tools(tools: Any, tool_choice: Any, parallel: Any, error) -> Optional[ToolRequest]:
    """The request's tools and tool_choice, checked; `error(message, param)` makes the 400."""
    if tools is None:
        if tool_choice not in (None, "none"):
            raise error(f"tool_choice {tool_choice!r} needs 'tools'", "tool_choice")
        return None
    if not isinstance(tools, list):
        raise error(f"'tools' must be an array of tool objects, got {tools!r:.80}", "tools")
    names = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not (isinstance(tool, dict) and tool.get("type", "function") == "function"
                and isinstance(function, dict) and isinstance(function.get("name"), str)
                and function["name"]):
            raise error(f"'tools[{i}]' must be {{\"type\": \"function\", \"function\": "
                        f"{{\"name\": ..., \"parameters\": {{...}}}}}}, got {tool!r:.120}",
                        f"tools[{i}]")
        if not isinstance(function.get("parameters", {}) or {}, dict):
            raise error(f"'tools[{i}].function.parameters' must be a JSON schema object",
                        f"tools[{i}].function.parameters")
        names.append(function["name"])
    if len(set(names)) != len(names):
        raise error(f"tool names must be unique, got {names}", "tools")
    if tool_choice is None:
        tool_choice = "auto" if tools else "none"
    if tool_choice in ("none", "auto", "required"):
        if tool_choice == "required" and not tools:
            raise error("tool_choice 'required' needs at least one tool", "tool_choice")
        return ToolRequest(tools, tool_choice, parallel=parallel is not False)
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    if not isinstance(name, str):
        raise error(f"'tool_choice' must be 'none', 'auto', 'required' or {{\"type\": "
                    f"\"function\", \"function\": {{\"name\": ...}}}}, got {tool_choice!r:.80}",
                    "tool_choice")
    if name not in names:
        raise error(f"tool_choice names function {name!r}, which is not among the tools "
                    f"{names}", "tool_choice")
    return ToolRequest(tools, "function", name, parallel is not False)


# -- the prompt ------------------------------------------------------------------------------------

def pick_parser(tokenizer, configured: str) -> str:
    """The tool call format of the model: the configured one, or (auto) the one its chat
    template writes: Llama 3's JSON if it mentions <|python_tag|> or ipython without
    <tool_call>, else Hermes."""
    if configured != "auto":
        return configured
    template = getattr(tokenizer, "chat_template", None) or ""
    template = template if isinstance(template, str) else json.dumps(template)
    if "<tool_call>" not in template and ("<|python_tag|>" in template or "ipython" in template):
        return "llama3_json"
    return "hermes"


_TAKES_TOOLS: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()
_PROBE = [{"type": "function", "function": {"name": "zllm_probe", "parameters": _EMPTY_PARAMETERS}}]


def template_takes_tools(tokenizer) -> bool:
    """Whether the chat template writes `tools` into the prompt (rendered once with a probe)."""
    if tokenizer not in _TAKES_TOOLS:
        messages = [{"role": "user", "content": "hi"}]
        try:
            with_tools = render_chat_text(tokenizer, messages, tools=_PROBE)
        except ValueError:
            with_tools = ""
        _TAKES_TOOLS[tokenizer] = "zllm_probe" in with_tools
    return _TAKES_TOOLS[tokenizer]


_HERMES_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    "{tools}\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>')
_LLAMA3_PROMPT = (
    "Given the following functions, please respond with a JSON for a function call with its "
    "proper arguments that best answers the given prompt.\n\nRespond in the format "
    '{{"name": function name, "parameters": dictionary of argument name and its value}}. '
    "Do not use variables.\n\n{tools}")


def prompt_messages(tokenizer, messages: list[dict[str, Any]], request: Optional[ToolRequest],
                    parser: str) -> tuple[list[dict[str, Any]], Optional[list[dict]]]:
    """The messages and tools to render: the template's own way when it takes tools, else the
    tools written into the system message and assistant tool calls into their text."""
    tools = request.tools if request is not None and request.choice != "none" else None
    if template_takes_tools(tokenizer):
        return messages, tools
    messages = [_calls_as_text(m, parser) if m.get("tool_calls") else m for m in messages]
    if tools:
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        prompt = (_HERMES_PROMPT if parser == "hermes" else _LLAMA3_PROMPT).format(tools=listing)
        if messages[0].get("role") == "system":
            first = messages[0]
            messages = [{**first, "content": f"{first.get('content') or ''}\n\n{prompt}".lstrip()},
                        *messages[1:]]
        else:
            messages = [{"role": "system", "content": prompt}, *messages]
    return messages, None


def _calls_as_text(message: dict[str, Any], parser: str) -> dict[str, Any]:
    calls = []
    for call in message["tool_calls"]:
        f = call["function"]
        if parser == "hermes":
            calls.append(json.dumps({"name": f["name"], "arguments": f["arguments"]}))
            calls[-1] = f"<tool_call>\n{calls[-1]}\n</tool_call>"
        else:
            calls.append(json.dumps({"name": f["name"], "parameters": f["arguments"]}))
    text = ("\n" if parser == "hermes" else "; ").join(calls)
    content = message.get("content") or ""
    rest = {k: v for k, v in message.items() if k != "tool_calls"}
    return {**rest, "content": f"{content}\n{text}" if content else text}

