"""The fused RoPE + K/V store kernel (zllm/worker/attention/rope_store.py) on Triton's CPU
interpreter, against PyTorch's rotation (RotaryEmbedding) and a store by slot: a mixed step of a
fresh prompt, a chunk over a cached prefix and decodes, with q, k and v as the strided views of
one qkv projection's output, the page table filled as FlashInferBackend fills it. bfloat16 does
not run in the interpreter, so the cases are float32 and float16; zllm.bench.gpu_check runs the
kernel in bfloat16 against the torch backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton")  # Linux only (the test extra installs it there)

# tests/conftest.py sets TRITON_INTERPRET before triton is imported.
from zllm.worker.attention.base import AttentionBatch  # noqa: E402
from zllm.worker.attention.flashinfer_backend import _TableLayout, fill_table  # noqa: E402
from zllm.worker.attention.rope_store import rope_and_store  # noqa: E402
from zllm.worker.models.layers import FusedRotaryEmbedding, RotaryEmbedding  # noqa: E402
from zllm.worker.models.linear import split_qkv  # noqa: E402

BS = 8


@pytest.mark.parametrize("heads,kv_heads,dim", [(8, 2, 64), (6, 3, 80), (4, 4, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_and_store_matches_rotation_and_slots(heads, kv_heads, dim, dtype):
    gen = torch.Generator().manual_seed(0)
    cached, new = [0, 13, 40, 7, 0], [11, 5, 1, 1, 1]
    seq_lens = np.array([c + n for c, n in zip(cached, new)], dtype=np.int32)
    num_blocks = 40
    width = int(-(-seq_lens.max() // BS))
    table = np.random.default_rng(1).permutation(num_blocks)[:len(new) * width]
    table = table.reshape(len(new), width).astype(np.int32)
    starts = np.concatenate([[0], np.cumsum(new)]).astype(np.int32)
    positions = np.concatenate([np.arange(c, c + n) for c, n in zip(cached, new)])
    slots = np.concatenate([table[i, p // BS] * BS + p % BS
                            for i, p in enumerate(np.split(positions, starts[1:-1]))])
    batch = AttentionBatch.from_lists(new, seq_lens, table, slots, BS)
    indptr = batch.page_indptr()
    layout = _TableLayout(batch.num_reqs, batch.num_tokens, int(indptr[-1]))
    packed = np.zeros(layout.size, dtype=np.int32)
    views = layout.views(packed, batch.num_reqs, batch.num_tokens, int(indptr[-1]))
    fill_table(views, batch, indptr, BS)
    t = layout.views(torch.from_numpy(packed), batch.num_reqs, batch.num_tokens, int(indptr[-1]))

    tokens = batch.num_tokens
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen).to(dtype)
    q, k, v = split_qkv(qkv, heads, kv_heads, dim)
    cache = torch.randn(num_blocks, 2, BS, kv_heads, dim, generator=gen).to(dtype)
    rope = FusedRotaryEmbedding(dim, 64, 10000.0, None)
    pos = torch.from_numpy(positions).long()
    expect_q, expect_k = RotaryEmbedding(dim, 64, 10000.0, None)(pos, q.clone(), k.clone())
    expect_cache = cache.clone()
    s = torch.from_numpy(slots)
    expect_cache[s // BS, 0, s % BS] = expect_k
    expect_cache[s // BS, 1, s % BS] = v

    rope_and_store(q, k, v, pos, rope.cos_sin, cache, t.batch_indices, t.positions, t.indptr,
                   t.indices)
    tol = dict(atol=2e-3, rtol=0) if dtype == torch.float16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q, expect_q, **tol)  # rotated in place, in the qkv output
    torch.testing.assert_close(k, expect_k, **tol)
    torch.testing.assert_close(cache, expect_cache, **tol)  # every other slot untouched
    assert torch.equal(cache[s // BS, 1, s % BS], v)
