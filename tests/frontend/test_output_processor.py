"""Incremental detokenization and stop strings."""

from __future__ import annotations

import pytest

from zllm.frontend.output_processor import IncrementalDetokenizer
from zllm.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(gqa_model):
    return load_tokenizer(gqa_model)


@pytest.mark.parametrize("text", [
    "Café, naïve, über, 東京, 你好, こんにちは 🙂🚀✨ done.",
    "The quick brown fox jumps over the lazy dog.",
    "🙂",
])
def test_incremental_text_equals_full_decode_across_multibyte_characters(tokenizer, text):
    ids = tokenizer.encode(text)
    # Byte-level BPE splits rare characters into several tokens, which is the case under test.
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids) or text.isascii()
    prompt = tokenizer.encode("Hello")
    detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=True)
    pieces = [detok.add(t) for t in ids]
    assert "".join(pieces) == tokenizer.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_special_tokens_are_skipped_in_text(tokenizer):
    eos = tokenizer.eos_token_id
    ids = tokenizer.encode("Hello there") + [eos]
    detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True)
    assert "".join(detok.add(t) for t in ids) == "Hello there"
