"""Loading the tokenizer from the model directory (local files only)."""

from __future__ import annotations

import os


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise ValueError(f"tokenizer directory {path!r} does not exist")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise ValueError(f"could not load a tokenizer from {path!r}: {e}") from e


def apply_chat_template(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a chat, ending with the assistant's turn open for generation."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; pass plain prompts to generate()")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)
