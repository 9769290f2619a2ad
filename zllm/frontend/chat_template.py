"""Chat messages -> prompt token ids, through the model's own chat template.

The template is rendered to text (with `tools`, `add_generation_prompt`, `continue_final_message`
as in transformers' `apply_chat_template`) and the text is tokenized. Special-token strings in
the template's own text (`<|eot_id|>`, `<|im_start|>`) become control tokens, as they must. The
same strings typed inside a message must not: a user who writes `<|eot_id|>` would otherwise end
their turn and speak for the assistant. When a message holds one, the text is cut into the
template's pieces and the messages' contents, and the contents are tokenized with special tokens
split into plain text. To find the cuts, the template is rendered a second time with a private
placeholder in place of each content; the real text must then read as those pieces with each
content (or the content trimmed, for templates that trim) in its placeholder's place. A template
that changes contents in other ways is refused for such messages rather than guessed at.

Without special-token strings in any content (the usual case), the ids are exactly what
`tokenizer.apply_chat_template(..., tokenize=True)` gives.
"""

from __future__ import annotations

import re
import weakref
from typing import Any, Optional

_PLACEHOLDER = "\ue000{}\ue001"  # private-use characters: no tokenizer or template means them
_PLACEHOLDER_RE = re.compile("\ue000(\\d+)\ue001")
_SPECIALS: "weakref.WeakKeyDictionary[Any, list[str]]" = weakref.WeakKeyDictionary()


def render_chat(tokenizer, messages: list[dict[str, Any]], *, tools: Optional[list[dict]] = None,
                add_generation_prompt: bool = True, continue_final_message: bool = False,
                ) -> list[int]:
    """Token ids of a chat: by default ending with the assistant's turn open for generation;
    with continue_final_message, ending inside the final (assistant) message, to continue it."""
    text = render_chat_text(tokenizer, messages, tools=tools,
                            add_generation_prompt=add_generation_prompt,
                            continue_final_message=continue_final_message)
    contents = [m.get("content") for m in messages]
    specials = special_token_strings(tokenizer)
    if not any(isinstance(c, str) and any(s in c for s in specials) for c in contents):
        return _encode(tokenizer, text, split_special=False)
    placeholders = [{**m, "content": _PLACEHOLDER.format(i)} if isinstance(m.get("content"), str)
                    else m for i, m in enumerate(messages)]
    shape = render_chat_text(tokenizer, placeholders, tools=tools,
                             add_generation_prompt=add_generation_prompt,
                             continue_final_message=continue_final_message)
    ids: list[int] = []
    for piece, is_content in _pieces(text, shape, contents):
        ids += _encode(tokenizer, piece, split_special=is_content)
    return ids


def render_chat_text(tokenizer, messages: list[dict[str, Any]], *, tools: Optional[list[dict]] = None,
                     add_generation_prompt: bool = True, continue_final_message: bool = False) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; send plain prompts (completions) "
                         "instead of messages")
    if add_generation_prompt and continue_final_message:
        raise ValueError("add_generation_prompt and continue_final_message cannot both be true: "
                         "the first opens a new assistant turn, the second continues the last one")
    if continue_final_message and messages[-1].get("role") != "assistant":
        raise ValueError(f"continue_final_message continues an assistant message, but the last "
                         f"message's role is {messages[-1].get('role')!r}")
    try:
        return tokenizer.apply_chat_template(
            messages, tools=tools or None, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, tokenize=False)
    except Exception as e:  # jinja2 errors, and templates that raise_exception() on bad input
        raise ValueError(f"the chat template could not render these messages: "
                         f"{type(e).__name__}: {e}") from None


def special_token_strings(tokenizer) -> list[str]:
    """The texts that the tokenizer turns into special (control) tokens."""
    cached = _SPECIALS.get(tokenizer)
    if cached is None:
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        cached = _SPECIALS[tokenizer] = sorted({t.content for t in added.values() if t.special}
                                               | set(tokenizer.all_special_tokens))
    return cached


def _encode(tokenizer, text: str, split_special: bool) -> list[int]:
    # The template writes the BOS token itself, so none is added here.
    return list(tokenizer(text, add_special_tokens=False,
                          split_special_tokens=split_special)["input_ids"]) if text else []


def _pieces(text: str, shape: str, contents: list[Any]) -> list[tuple[str, bool]]:
    """`text` cut into (template text, False) and (message content, True) pieces, following
    where the placeholders sit in `shape`."""
    parts = _PLACEHOLDER_RE.split(shape)  # template, index, template, index, ..., template
    templates, indices = parts[0::2], [int(i) for i in parts[1::2]]
    pieces, pos = [], 0
    for k, template in enumerate(templates):
        if not text.startswith(template, pos):
            raise _unfollowable()
        pieces.append((template, False))
        pos += len(template)
        if k == len(indices):
            break
        content, after = contents[indices[k]], templates[k + 1]
        for form in dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip())):
            end = pos + len(form)
            if text.startswith(form, pos) and text.startswith(after, end):
                pieces.append((form, True))
                pos = end
                break
        else:
            raise _unfollowable()
    if pos != len(text):
        raise _unfollowable()
    return pieces


def _unfollowable() -> ValueError:
    return ValueError("a message contains a special token's text (such as an end-of-turn "
                      "marker), and this chat template rewrites message text, so zllm cannot "
                      "keep it as plain text; remove the special token from the message")
