"""The Triton GQA decode kernel against attention written out in float64, on Triton's CPU
interpreter. bfloat16 dots do not run in the interpreter (numpy has no bfloat16), so the caches
here are float32 and float16; the GPU check (zllm.bench.gpu_check) runs the kernel in bfloat16."""

import pytest
import torch

pytest.importorskip("triton")  # Linux only (the test extra installs it there)

# tests/conftest.py sets TRITON_INTERPRET before triton is imported.
from zllm.worker.attention.rope_store import rope_and_store  # noqa: E402
from zllm.worker.attention.triton_decode import (NewKV, SplitWorkspace, gqa_decode,  # noqa: E402
                                                 unsupported)
from zllm.worker.models.layers import FusedRotaryEmbedding  # noqa: E402
from zllm.worker.models.linear import split_qkv  # noqa: E402


def reference(q, kv_cache, indptr, indices, seq_lens, scale, soft_cap=None, window=None):
    """Request by request: gather its blocks, attend in float64."""
    num_reqs, num_heads, dim = q.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    out = torch.empty(q.shape, dtype=torch.float64)
    for r in range(num_reqs):
        n = int(seq_lens[r])
        blocks = indices[indptr[r]:indptr[r + 1]].long()
        kv = kv_cache[blocks].double().transpose(0, 1).reshape(2, -1, num_kv_heads, dim)[:, :n]
        k = kv[0].repeat_interleave(num_heads // num_kv_heads, dim=1)  # [n, H, D]
        v = kv[1].repeat_interleave(num_heads // num_kv_heads, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[r].double(), k) * scale
        if soft_cap:  # Gemma 2: on the scaled scores
            scores = soft_cap * torch.tanh(scores / soft_cap)
        if window:
            scores[:, :max(n - window, 0)] = float("-inf")
        out[r] = torch.einsum("hn,nhd->hd", scores.softmax(-1), v)
    return out


def make_case(num_heads, num_kv_heads, dim, block_size, seq_lens, dtype, seed=0):
    """A cache whose requests own scattered blocks, and the page table as indptr / indices. The
    last request's pages are followed by block ids out of range, which the kernel must never
    read (a graph step's table region holds stale entries there)."""
    gen = torch.Generator().manual_seed(seed)
    widths = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(widths) + 3
    kv_cache = torch.randn(num_blocks, 2, block_size, num_kv_heads, dim, generator=gen).to(dtype)
    indptr = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    indptr[1:] = torch.tensor(widths).cumsum(0)
    indices = torch.randperm(num_blocks, generator=gen).to(torch.int32)[:sum(widths)]
    indices = torch.cat([indices, torch.full((4,), 10**6, dtype=torch.int32)])
    q = torch.randn(len(seq_lens), num_heads, dim, generator=gen).to(dtype)
    return q, kv_cache, indptr, indices, torch.tensor(seq_lens, dtype=torch.int32)


# Lengths: one token, a block's end, past several of the kernel's 16- or 32-token tiles.
CASES = [  # heads, kv heads, head dim, block size, block_n
    (8, 2, 64, 16, 32),  # GQA group 4, the 1B shape's head size
    (4, 4, 32, 8, 16),  # no grouping
    (16, 2, 32, 16, 16),  # group 8
]


@pytest.mark.parametrize("heads,kv_heads,dim,block_size,block_n", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gqa_decode_matches_reference(heads, kv_heads, dim, block_size, block_n, dtype):
    seq_lens = [1, block_size, 3 * block_n + 5, 2 * block_size + 1]
    q, cache, indptr, indices, lens = make_case(heads, kv_heads, dim, block_size, seq_lens, dtype)
    scale = dim ** -0.5
    out = gqa_decode(q, cache, indptr, indices, lens, scale, block_n=block_n)
    expected = reference(q, cache, indptr, indices, lens, scale)
    tol = 2e-3 if dtype == torch.float16 else 1e-4
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


def test_gqa_decode_writes_into_out_and_leaves_other_rows():
    q, cache, indptr, indices, lens = make_case(8, 2, 64, 16, [7, 40], torch.float32)
    out = torch.full((3, 8, 64), 7.0)  # a larger buffer: only the first two rows are the step's
    gqa_decode(q, cache, indptr, indices, lens, 0.125, out=out[:2], block_n=16)
    torch.testing.assert_close(out[:2].double(), reference(q, cache, indptr, indices, lens, 0.125),
                               atol=1e-4, rtol=1e-4)
    assert bool((out[2] == 7.0).all())


@pytest.mark.parametrize("window", [1, 5, 20, 100])
def test_gqa_decode_sliding_window(window):
    seq_lens = [1, 9, 37, 50]
    q, cache, indptr, indices, lens = make_case(8, 2, 32, 8, seq_lens, torch.float32, seed=1)
    out = gqa_decode(q, cache, indptr, indices, lens, 0.2, window=window, block_n=16)
    expected = reference(q, cache, indptr, indices, lens, 0.2, window=window)
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)


def test_gqa_decode_soft_cap():
    q, cache, indptr, indices, lens = make_case(8, 2, 32, 8, [3, 30], torch.float32, seed=2)
    q = q * 8  # scores large enough for the cap to matter
    out = gqa_decode(q, cache, indptr, indices, lens, 0.2, soft_cap=3.0, block_n=16)
    expected = reference(q, cache, indptr, indices, lens, 0.2, soft_cap=3.0)
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)
    uncapped = reference(q, cache, indptr, indices, lens, 0.2)
    assert (expected - uncapped).abs().max() > 1e-2  # the cap changed the answer


@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (15, 3)])  # groups of 3 and 5: padded rows
def test_gqa_decode_groups_not_a_power_of_two(heads, kv_heads):
    q, cache, indptr, indices, lens = make_case(heads, kv_heads, 32, 16, [1, 16, 37, 65],
                                                torch.float32, seed=4)
    out = gqa_decode(q, cache, indptr, indices, lens, 0.2, block_n=16)
    torch.testing.assert_close(out.double(), reference(q, cache, indptr, indices, lens, 0.2),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("window", [15, 16, 17, 33])
@pytest.mark.parametrize("block_size", [5, 64])  # pages smaller than a tile, and larger
def test_gqa_decode_windows_at_tile_edges(window, block_size):
    seq_lens = [1, 16, 32, 48, 33, 47, 130]  # tile multiples and one past or short of them
    q, cache, indptr, indices, lens = make_case(8, 2, 32, block_size, seq_lens, torch.float32,
                                                seed=3)
    out = gqa_decode(q, cache, indptr, indices, lens, 0.3, window=window, block_n=16)
    expected = reference(q, cache, indptr, indices, lens, 0.3, window=window)
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)


def test_gqa_decode_head_dim_256_default_tiles_with_cap_and_window():
    """Gemma 2's shape: the default tiles shrink to 32 tokens at head_dim 256. (The engine keeps
    flashinfer's decode there until the kernel is timed at this size; see `unsupported`.)"""
    q, cache, indptr, indices, lens = make_case(8, 2, 256, 16, [1, 31, 32, 33, 100],
                                                torch.float16, seed=5)
    out = gqa_decode(q * 4, cache, indptr, indices, lens, 256 ** -0.5, soft_cap=2.0, window=40)
    expected = reference(q * 4, cache, indptr, indices, lens, 256 ** -0.5, soft_cap=2.0,
                         window=40)
    torch.testing.assert_close(out.double(), expected, atol=2e-3, rtol=2e-3)


def test_gqa_decode_reads_q_as_a_view_of_a_fused_qkv_output():
    heads, kv_heads, dim = 8, 2, 32
    q0, cache, indptr, indices, lens = make_case(heads, kv_heads, dim, 16, [3, 40, 17],
                                                 torch.float32, seed=7)
    qkv = torch.randn(3, (heads + 2 * kv_heads) * dim)
    qkv[:, :heads * dim] = q0.reshape(3, -1)
    q = qkv[:, :heads * dim].view(3, heads, dim)  # rows strided by the whole qkv width
    assert not q.is_contiguous()
    out = gqa_decode(q, cache, indptr, indices, lens, 0.2, block_n=16)
    torch.testing.assert_close(out.double(), reference(q0, cache, indptr, indices, lens, 0.2),
                               atol=1e-4, rtol=1e-4)


def test_gqa_decode_addresses_past_two_to_the_31_elements():
    """Block ids whose element offsets pass int32 (a large cache): the kernel must address in
    int64. torch.empty leaves the untouched pages unallocated, so this costs little memory."""
    num_blocks = 2**22 + 300  # x 512 elements per block: offsets up to about 2^31 + 150k
    cache = torch.empty(num_blocks, 2, 16, 1, 16, dtype=torch.float16)
    gen = torch.Generator().manual_seed(0)
    ids = torch.tensor([num_blocks - 1, num_blocks - 2, 5, num_blocks - 200, 2**22 - 3,
                        2**22 + 1], dtype=torch.int32)
    for block in ids.tolist():
        cache[block] = torch.randn(2, 16, 1, 16, generator=gen).half()
    lens, indptr = torch.tensor([40, 40], dtype=torch.int32), torch.tensor([0, 3, 6],
                                                                            dtype=torch.int32)
    q = torch.randn(2, 16, 16, generator=gen).half()
    out = gqa_decode(q, cache, indptr, ids, lens, 0.25, block_n=16)
    expected = reference(q, cache[ids.long()], indptr, torch.arange(6, dtype=torch.int32), lens,
                         0.25)  # the same blocks, renumbered from 0
    torch.testing.assert_close(out.double(), expected, atol=2e-3, rtol=2e-3)


def workspace_for(q, kv_heads, splits):
    reqs, heads, dim = q.shape
    return SplitWorkspace(q.device, reqs * kv_heads * splits, reqs * kv_heads, heads, kv_heads,
                          dim)


@pytest.mark.parametrize("splits", [2, 3, 8, 64])
@pytest.mark.parametrize("window", [None, 20])
def test_split_sequences_merge_to_the_same_attention(splits, window):
    """Each sequence's tiles shared among `splits` programs (more than a short one has tiles:
    those exit), merged by the last to finish (300 tokens: 19 live splits, more than one of the
    merge's blocks of 16); the ticket counters end at zero, so a second call, as a CUDA graph
    replays it, gives the same result."""
    seq_lens = [1, 9, 16, 37, 50, 130, 300]
    q, cache, indptr, indices, lens = make_case(8, 2, 32, 8, seq_lens, torch.float32, seed=11)
    ws = workspace_for(q, 2, splits)
    expected = reference(q, cache, indptr, indices, lens, 0.2, window=window)
    for _ in range(2):
        out = gqa_decode(q, cache, indptr, indices, lens, 0.2, window=window, block_n=16,
                         splits=splits, workspace=ws)
        torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)
        assert int(ws.tickets.abs().sum()) == 0


def test_split_sequences_with_soft_cap_a_padded_group_and_float16_into_out():
    q, cache, indptr, indices, lens = make_case(6, 2, 32, 16, [5, 70, 33], torch.float16, seed=12)
    q = q * 4
    out = torch.full((4, 6, 32), 7.0, dtype=torch.float16)  # only the first three rows are the step's
    gqa_decode(q, cache, indptr, indices, lens, 0.2, soft_cap=3.0, block_n=16, out=out[:3],
               splits=4, workspace=workspace_for(q, 2, 4))
    expected = reference(q, cache, indptr, indices, lens, 0.2, soft_cap=3.0)
    torch.testing.assert_close(out[:3].double(), expected, atol=2e-3, rtol=2e-3)
    assert bool((out[3] == 7.0).all())


@pytest.mark.parametrize("heads,kv_heads,dim,window", [
    (16, 1, 128, None), (16, 1, 128, 270),  # group 16 at head_dim 128: merge blocks of 2 slots
    (6, 2, 32, 250), (6, 2, 32, 260)])  # group 3: exactly one block of 16 live slots, and 17
def test_split_merge_blocks_partly_live_and_with_windows(heads, kv_heads, dim, window):
    q, cache, indptr, indices, lens = make_case(heads, kv_heads, dim, 8, [1, 17, 300],
                                                torch.float32, seed=3)
    ws = workspace_for(q, kv_heads, 64)
    out = gqa_decode(q, cache, indptr, indices, lens, 0.1, window=window, block_n=16, splits=64,
                     workspace=ws)
    torch.testing.assert_close(out.double(), reference(q, cache, indptr, indices, lens, 0.1,
                                                       window=window), atol=1e-4, rtol=1e-4)
    assert int(ws.tickets.abs().sum()) == 0


def test_split_calls_on_one_workspace_as_graph_replays_with_new_lengths():
    q, cache, indptr, indices, _ = make_case(8, 2, 32, 8, [300, 300], torch.float32, seed=4)
    ws = workspace_for(q, 2, 32)
    for lengths in ([300, 1], [16, 290], [1, 1], [33, 300]):
        lens = torch.tensor(lengths, dtype=torch.int32)
        out = gqa_decode(q, cache, indptr, indices, lens, 0.1, block_n=16, splits=32, workspace=ws)
        torch.testing.assert_close(out.double(), reference(q, cache, indptr, indices, lens, 0.1),
                                   atol=1e-4, rtol=1e-4)


def test_split_needs_a_workspace_large_enough():
    q, cache, indptr, indices, lens = make_case(8, 2, 32, 8, [5, 9], torch.float32)
    with pytest.raises(ValueError, match="splits 4 for 2 requests x 2 KV heads"):
        gqa_decode(q, cache, indptr, indices, lens, 0.2, splits=4)
    with pytest.raises(ValueError, match="splits 4"):
        gqa_decode(q, cache, indptr, indices, lens, 0.2, splits=4, workspace=workspace_for(q, 2, 3))


def new_kv_case(heads, kv_heads, dim, seq_lens, dtype, seed):
    """make_case's cache and page table, and the step's q, k and v as views of one qkv output,
    not yet rotated; the new tokens' slots (position seq_len - 1) hold stale values."""
    _, cache, indptr, indices, lens = make_case(heads, kv_heads, dim, 8, seq_lens, dtype, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    qkv = torch.randn(len(seq_lens), (heads + 2 * kv_heads) * dim, generator=gen).to(dtype)
    q, k, v = split_qkv(qkv, heads, kv_heads, dim)
    return q, k, v, cache, indptr, indices, lens


@pytest.mark.parametrize("heads,kv_heads,dim,dtype", [
    (8, 2, 32, torch.float32), (6, 2, 64, torch.float16), (4, 4, 16, torch.float32)])
@pytest.mark.parametrize("splits,window,soft_cap", [
    (1, None, None), (3, None, 3.0), (64, 20, None), (1, 20, None), (8, 1, None)])
def test_new_kv_rotates_stores_and_attends_as_rope_store_then_decode(
        heads, kv_heads, dim, dtype, splits, window, soft_cap):
    """RoPE and the K/V store in the decode kernel: the same cache and the same attention as
    rope_and_store followed by the kernel, split or not (the program holding the new token
    attends to it from registers). Lengths: one token, a tile's last, past tile and block edges,
    and long enough for many splits; window 1 sees the new token alone."""
    seq_lens = [1, 16, 17, 45, 300]
    q, k, v, cache, indptr, indices, lens = new_kv_case(heads, kv_heads, dim, seq_lens, dtype, 5)
    rope = FusedRotaryEmbedding(dim, 512, 10000.0, None)
    positions = (lens - 1).long()
    expected_cache, expected_q = cache.clone(), q.clone()
    rope_and_store(expected_q, k.clone(), v, positions, rope.cos_sin, expected_cache,
                   torch.arange(len(seq_lens), dtype=torch.int32), lens - 1, indptr, indices)
    expected = gqa_decode(expected_q, expected_cache, indptr, indices, lens, 0.2, window=window,
                          soft_cap=soft_cap, block_n=16)
    q_before = q.clone()
    ws = workspace_for(q, kv_heads, splits) if splits > 1 else None
    for _ in range(2):  # as a graph replays: the same slots rewritten, the tickets back at 0
        out = gqa_decode(q, cache, indptr, indices, lens, 0.2, window=window, soft_cap=soft_cap,
                         block_n=16, splits=splits, workspace=ws,
                         new_kv=NewKV(k, v, positions, rope.cos_sin))
        assert torch.equal(cache, expected_cache)  # every other slot untouched
        tol = 2e-3 if dtype == torch.float16 else 1e-5
        torch.testing.assert_close(out, expected, atol=tol, rtol=tol)
    assert torch.equal(q, q_before)  # rotated in registers only


def test_new_kv_with_padding_rows_sharing_one_scratch_slot():
    """A CUDA-graph step's padding rows (length 1, all in one scratch block) each write their
    k and v to the same slot and attend to their own only; the real rows are unaffected."""
    q, k, v, cache, indptr, indices, lens = new_kv_case(8, 2, 32, [40, 1, 1, 1], torch.float32, 6)
    scratch = indices[indptr[1]].clone()
    indices[indptr[1]:indptr[4]] = scratch
    rope = FusedRotaryEmbedding(32, 64, 10000.0, None)
    positions = torch.tensor([39, 0, 0, 0])
    expected_cache, expected_q = cache.clone(), q.clone()
    rope_and_store(expected_q[:1], k[:1].clone(), v[:1], positions, rope.cos_sin, expected_cache,
                   torch.zeros(1, dtype=torch.int32), lens[:1] - 1, indptr, indices)
    expected = gqa_decode(expected_q[:1], expected_cache, indptr, indices, lens[:1], 0.2)
    out = gqa_decode(q, cache, indptr, indices, lens, 0.2, splits=4,
                     workspace=workspace_for(q, 2, 4), new_kv=NewKV(k, v, positions, rope.cos_sin))
    torch.testing.assert_close(out[:1], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1:], v[1:].repeat_interleave(4, dim=1), atol=1e-6, rtol=0)


def test_new_kv_shapes_are_checked():
    q, k, v, cache, indptr, indices, lens = new_kv_case(8, 2, 32, [5, 9], torch.float32, 7)
    cos_sin = FusedRotaryEmbedding(32, 64, 10000.0, None).cos_sin
    with pytest.raises(ValueError, match=r"new k \(2, 8, 32\)"):
        gqa_decode(q, cache, indptr, indices, lens, 0.2, new_kv=NewKV(q, v, lens, cos_sin))
    with pytest.raises(ValueError, match=r"positions \(1,\) .* each of 2 requests"):
        gqa_decode(q, cache, indptr, indices, lens, 0.2, new_kv=NewKV(k, v, lens[:1], cos_sin))
    strided = torch.stack([lens, lens], 1)[:, 0]  # the right values, every other element
    with pytest.raises(ValueError, match=r"strides \(2,\)"):
        gqa_decode(q, cache, indptr, indices, lens, 0.2, new_kv=NewKV(k, v, strided, cos_sin))
    with pytest.raises(ValueError, match="cos_sin"):
        gqa_decode(q, cache, indptr, indices, lens, 0.2,
                   new_kv=NewKV(k, v, lens, cos_sin.half()))


def test_unsupported_head_dims_are_named():
    assert unsupported(64, torch.bfloat16) == ""
    assert "head_dim 80" in unsupported(80, torch.bfloat16)
    assert "head_dim 256" in unsupported(256, torch.bfloat16)  # computes right, never timed
    assert "dtype" in unsupported(64, torch.int8)
