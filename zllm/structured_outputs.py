"""Structured outputs: a constraint on the generated text that a grammar enforces token by token.

`StructuredOutputs` is the request's side: exactly one of a JSON schema, "any JSON object", a
regular expression, a list of choices or an EBNF grammar. It travels inside `SamplingParams` as
plain strings, so the engine core never compiles anything and stays token-ids-only.

`build_grammar` turns a spec into an xgrammar `Grammar` (no tokenizer needed). The frontend calls
it where a request enters, so an invalid schema or regex is the user's error (400) and never
reaches the core; the worker compiles the same grammar against the model's vocabulary
(zllm/worker/grammar.py). Both keep a cache keyed by the spec, so a schema sent with every request
is parsed once per process.

JSON is generated compactly (`", "` and `": "` separators, no free whitespace): a small or random
model that may emit whitespace forever cannot, and the output is the same shape every time.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any, Optional

_KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass
class StructuredOutputs:
    """One constraint on the output (set exactly one field), as vLLM's `structured_outputs`.

    json: a JSON schema (a dict, or its JSON text); json_object: any JSON object; regex: the whole
    output matches it; choice: the output is one of these strings; grammar: xgrammar's EBNF
    (GBNF), with a `root` rule.
    """

    json: Optional[str] = None
    json_object: bool = False
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None

    def __post_init__(self) -> None:
        if isinstance(self.json, dict):  # a schema given as a dict: carried as its JSON text
            self.json = _json_text(self.json)
        given = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"StructuredOutputs takes exactly one of {', '.join(_KINDS)}; "
                             f"got {', '.join(given) or 'none'}")
        if self.choice is not None and not (
                self.choice and all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError(f"StructuredOutputs.choice = {self.choice!r} must be a non-empty list "
                             f"of non-empty strings")
        for kind in ("json", "regex", "grammar"):
            value = getattr(self, kind)
            if value is not None and not (isinstance(value, str) and value):
                raise ValueError(f"StructuredOutputs.{kind} must be a non-empty string, got {value!r}")

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    def key(self) -> tuple[str, Any]:
        """A hashable name of the constraint: equal keys give equal grammars."""
        value = getattr(self, self.kind)
        return self.kind, tuple(value) if isinstance(value, list) else value


def _json_text(schema: Any) -> str:
    return json.dumps(schema, ensure_ascii=False, separators=(",", ":"))


# "[04:09:09] /project/cpp/json_schema_converter.cc:4944: " before xgrammar's own message.
_XGRAMMAR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


def build_grammar(spec: StructuredOutputs):
    """The xgrammar Grammar of a spec; raises ValueError naming what is wrong with it."""
    return _grammar(spec.key())


@functools.lru_cache(maxsize=512)
def _grammar(key: tuple[str, Any]):
    import xgrammar as xgr

    kind, value = key
    what = {"json": "JSON schema", "json_object": "JSON object", "regex": "regex",
            "choice": "choice", "grammar": "grammar"}[kind]
    try:
        if kind == "json":
            schema = _lengths_as_patterns(json.loads(value))
            return xgr.Grammar.from_json_schema(_json_text(schema), any_whitespace=False)
        if kind == "json_object":
            return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False)
        if kind == "regex":
            return xgr.Grammar.from_regex(value)
        if kind == "choice":  # JSON string literals are EBNF string literals
            return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c) for c in value))
        return xgr.Grammar.from_ebnf(value)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid {what} {_short(value)}: not JSON: {e}") from None
    except RuntimeError as e:
        message = _XGRAMMAR_PREFIX.sub("", str(e).strip().splitlines()[0])
        raise ValueError(f"invalid {what} {_short(value)}: {message}") from None


_DATA_KEYWORDS = ("enum", "const", "default", "examples")
# One character a JSON string may hold unescaped: no controls, '"', backslash or surrogates.
_JSON_CHAR = "[ !#-\\[\\]-\\ud7ff\\ue000-\\U0010ffff]"


def _lengths_as_patterns(schema: Any) -> Any:
    """The schema with every plain string's minLength/maxLength written as a pattern.

    xgrammar 0.2.8 lowers a length-bounded string to a character class that lets raw control
    characters (U+0000-U+001F but CR, LF) into the string, which is not JSON: Python's json.loads
    refuses it (xgrammar issue #800). A pattern of as many JSON characters counts the same way;
    the class is spelled as ranges of valid code points because xgrammar's negated classes (and
    its ".") also take UTF-8 that Python decodes to several U+FFFD: surrogates, overlong forms.
    (Neither path lets a length-bounded string hold an escape such as \\n.) Drop this once
    xgrammar is fixed.
    """
    if isinstance(schema, list):
        return [_lengths_as_patterns(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in _DATA_KEYWORDS else _lengths_as_patterns(v) for k, v in schema.items()}
    bounded = "minLength" in out or "maxLength" in out
    if out.get("type") == "string" and bounded and not ({"pattern", "format"} & out.keys()):
        low, high = out.pop("minLength", 0), out.pop("maxLength", "")
        out["pattern"] = f"^{_JSON_CHAR}{{{low},{high}}}$"
    return out


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value if not isinstance(value, tuple) else list(value))
    return text if len(text) <= limit else text[:limit] + "..."
