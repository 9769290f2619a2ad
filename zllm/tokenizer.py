"""Loading the tokenizer from the model directory or GGUF file (local files only)."""

from __future__ import annotations

import os

from zllm.gguf_file import find_gguf_file

# Any of these makes a directory a Hugging Face tokenizer directory.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_tokenizer(path: str):
    """From Hugging Face tokenizer files in directory `path`, else from the metadata of the GGUF
    file that `path` is or holds (transformers rebuilds the vocabulary, merges, special tokens
    and chat template from it)."""
    from transformers import AutoTokenizer

    if not os.path.exists(path):
        raise ValueError(f"tokenizer path {path!r} does not exist")
    has_files = os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f))
                                               for f in TOKENIZER_FILES)
    gguf = None if has_files else find_gguf_file(path)
    try:
        if gguf is not None:
            return AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                                 local_files_only=True)
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise ValueError(f"could not load a tokenizer from {path!r}: {e}") from e

