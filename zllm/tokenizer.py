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

