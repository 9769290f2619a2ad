"""Incremental detokenization and stop strings."""

from __future__ import annotations

import numpy as np
import pytest

from zllm import SamplingParams
from zllm.frontend.output_processor import IncrementalDetokenizer, OutputProcessor
from zllm.protocol import EngineCoreOutputs, FinishedRequest
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


def _run(tokenizer, token_ids: list[int], params, stream: bool) -> list[str]:
    """Feed `token_ids` one step each (the last step also ends the request by length) and
    return the texts delivered: every delta when streaming, else the one final text."""
    processor = OutputProcessor(tokenizer)
    processor.add_request("r", None, tokenizer.encode("Hello"), params, ["r"], stream)
    texts = []
    for i, token in enumerate(token_ids):
        last = i == len(token_ids) - 1
        outputs = EngineCoreOutputs(["r"], np.asarray([token], np.int32), np.zeros(1, np.int32),
                                    [FinishedRequest("r", "length")] if last else [])
        results, stopped = processor.process(outputs)
        texts += [r.outputs[0].text for r in results]
        if stopped or not processor.has_unfinished():
            break
    return texts


TEXT = "Hello there, Robert! The rbber barber brought beer. ab abab aab 東京 über 🙂 end"


def test_a_stream_never_carries_part_of_a_stop_string_and_equals_the_full_text(tokenizer):
    ids = tokenizer.encode(TEXT)
    # Every 1- to 4-character piece of the text as a stop string (most end the text early, at
    # places that cut tokens in two), plus stop strings that never match but start as the text
    # ends, and several at once.
    stops = sorted({TEXT[i:i + k] for k in range(1, 5) for i in range(len(TEXT) - k + 1)})
    stops = [[s] for s in stops] + [["endless"], ["🙂 enX"], ["rb", "ber", "zz"], ["e", "ee"]]
    for stop in stops:
        params = SamplingParams(max_tokens=len(ids), stop=stop)
        (full,) = _run(tokenizer, ids, params, stream=False)
        deltas = _run(tokenizer, ids, params, stream=True)
        assert "".join(deltas) == full, stop
        text = tokenizer.decode(ids)
        first = min((text.find(s) for s in stop if s in text), default=len(text))
        assert full == text[:first], stop  # the text ends where the first stop string begins
