"""The sampler's Triton argmax (zllm/worker/argmax.py) on Triton's CPU interpreter against
torch.argmax: rows that span one piece or many, ties across pieces (the first index wins),
rows of -inf, a row's maximum in the last, partial piece, rows read through a row stride wider
than the vocabulary, NaN, and a second call on the same workspace (its tickets must read zero
again)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")  # Linux only (the test extra installs it there)

# tests/conftest.py sets TRITON_INTERPRET before triton is imported.
from zllm.worker import argmax as am  # noqa: E402


@pytest.mark.parametrize("rows,vocab", [(1, 100), (3, am.CHUNK * 2 + 17), (5, am.CHUNK * 3)])
def test_matches_torch_argmax(rows, vocab):
    gen = torch.Generator().manual_seed(rows)
    logits = torch.randn(rows, vocab, generator=gen)
    # Ties across pieces: the first index of the maximum wins, as torch's.
    logits[0, [vocab - 1, vocab // 2, 7]] = 50.0
    if rows > 1:
        logits[1] = float("-inf")  # a fully banned row: index 0, as torch's
    if rows > 2:
        logits[2, -1] = 99.0  # the maximum in the last (partial) piece
    for _ in range(2):  # the second call reuses the workspace and its tickets
        out = am.vocab_argmax(logits)
        assert out.dtype == torch.int64
        assert out.tolist() == logits.argmax(dim=-1).tolist()


def test_reads_rows_through_their_stride():
    """Rows of a wider buffer (a row stride past the vocabulary), as a sliced batch arrives."""
    wide = torch.randn(4, am.CHUNK + 300)
    logits = wide[:, :am.CHUNK + 44]
    wide[:, am.CHUNK + 44:] = 1e9  # past each row's end: must not be read as logits
    assert logits.stride(0) != logits.shape[1]
    assert am.vocab_argmax(logits).tolist() == logits.argmax(dim=-1).tolist()


def test_nan_counts_as_the_maximum_and_stays_in_range():
    logits = torch.randn(2, am.CHUNK + 9)
    logits[0, 4000] = float("nan")
    logits[1] = float("nan")
    assert am.vocab_argmax(logits).tolist() == [4000, 0]


def test_refuses_what_it_cannot_read():
    with pytest.raises(ValueError, match="unit stride"):
        am.vocab_argmax(torch.randn(8, 4).t())
    with pytest.raises(ValueError, match="float32"):
        am.vocab_argmax(torch.randn(2, 8).half())


def test_grows_its_workspace_for_larger_batches():
    small = torch.randn(1, 300)
    assert am.vocab_argmax(small).tolist() == small.argmax(-1).tolist()
    big = torch.randn(300, am.CHUNK * 2 + 1)
    assert am.vocab_argmax(big).tolist() == big.argmax(-1).tolist()
