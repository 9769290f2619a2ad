"""RoPE and the K/V store in one Triton kernel: the step's new q and k rotated, k and v written to
the paged cache.

Unfused, each layer of each step runs flashinfer's RoPE kernel (q and k, in place) and then its
append_paged_kv_cache (k and v into their pages): two launches that each read k. On an H100 the
two took 2.0 and 0.8 ms of the Llama-3.1-8B shape's 185 ms prompt step, and a few µs each per
layer of a decode step, where a batch-1 step is bound by the fixed cost of its ~10 kernels per
layer (docs/benchmarks.md). This kernel does both: one program per token rotates that token's q
heads in place, rotates its k heads (in place too, for a caller that reads k afterwards) and
writes them with its v heads to the token's cache slot.

The slot comes from the same device table append_paged_kv_cache reads (FlashInferBackend's
packed table): token t belongs to request batch_indices[t] at position seq_positions[t], in page
indices[indptr[request] + position // block_size], at offset position % block_size. RoPE's
angle comes from `positions` (the model's), from one float32 [P, D] table of cos | sin (the
rotate-half layout of Hugging Face checkpoints; FusedRotaryEmbedding.cos_sin), computed in
float32 and rounded once, as flashinfer's kernel does.

Pure-decode steps on zllm's Triton decode kernel skip this one: that kernel rotates and stores
the step's new q and k itself (triton_decode.py, `NewKV`), with the same arithmetic.

On CPU the tests run it through Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def rope_and_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                   cos_sin: torch.Tensor, kv_cache: torch.Tensor, batch_indices: torch.Tensor,
                   seq_positions: torch.Tensor, indptr: torch.Tensor,
                   indices: torch.Tensor) -> None:
    """q [T, H, D], k and v [T, KVH, D] (strided views allowed, unit stride along D); rotate q
    and k in place and write k and v into kv_cache [blocks, 2, block_size, KVH, D]."""
    tokens, heads, dim = q.shape
    kv_heads = k.shape[1]
    if dim % 2 or q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError(f"head_dim {dim} must be even and q, k, v of unit stride along it")
    if (not kv_cache.is_contiguous() or not cos_sin.is_contiguous()
            or cos_sin.dtype != torch.float32 or cos_sin.shape[1] != dim):
        raise ValueError(f"cache {tuple(kv_cache.shape)} must be contiguous, cos_sin "
                         f"{tuple(cos_sin.shape)} {cos_sin.dtype} contiguous float32 "
                         f"[positions, {dim}]")
    if min(len(positions), len(batch_indices), len(seq_positions)) < tokens:
        raise ValueError(f"{tokens} tokens, but {len(positions)} positions, "
                         f"{len(batch_indices)} batch indices and {len(seq_positions)} sequence "
                         f"positions")
    if tokens == 0:
        return
    half = dim // 2
    _rope_store_kernel[(tokens,)](
        q, k, v, positions, cos_sin, kv_cache, batch_indices, seq_positions, indptr, indices,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        kv_cache.shape[2], HEADS=heads, KV_HEADS=kv_heads, HALF=half,
        HEADS_PAD=triton.next_power_of_2(heads), KV_PAD=triton.next_power_of_2(kv_heads),
        HALF_PAD=triton.next_power_of_2(half), num_warps=4)


@triton.jit
def _rotate(ptr, rows, row_ok, d, d_ok, cos, sin, HALF: tl.constexpr):
    """The rotated halves of the rows at ptr + rows (each a head of D values)."""
    mask = row_ok[:, None] & d_ok[None, :]
    x1 = tl.load(ptr + rows[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + rows[:, None] + HALF + d[None, :], mask=mask, other=0.0).to(tl.float32)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin, mask


@triton.jit
def _rope_store_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, cos_sin_ptr, cache_ptr, batch_ptr,
                       seq_pos_ptr, indptr_ptr, indices_ptr, q_stride_t, q_stride_h, k_stride_t,
                       k_stride_h, v_stride_t, v_stride_h, c_stride_block, c_stride_kv,
                       c_stride_slot, c_stride_head, block_size, HEADS: tl.constexpr,
                       KV_HEADS: tl.constexpr, HALF: tl.constexpr, HEADS_PAD: tl.constexpr,
                       KV_PAD: tl.constexpr, HALF_PAD: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, HALF_PAD)
    d_ok = d < HALF
    pos = tl.load(pos_ptr + t).to(tl.int64)
    cos = tl.load(cos_sin_ptr + pos * 2 * HALF + d, mask=d_ok, other=0.0)[None, :]
    sin = tl.load(cos_sin_ptr + pos * 2 * HALF + HALF + d, mask=d_ok, other=0.0)[None, :]

    h = tl.arange(0, HEADS_PAD)
    q_rows = t * q_stride_t + h * q_stride_h
    r1, r2, mask = _rotate(q_ptr, q_rows, h < HEADS, d, d_ok, cos, sin, HALF)
    q_at = q_ptr + q_rows[:, None] + d[None, :]
    tl.store(q_at, r1.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(q_at + HALF, r2.to(q_ptr.dtype.element_ty), mask=mask)

    # This token's cache slot, as append_paged_kv_cache finds it.
    request = tl.load(batch_ptr + t)
    seq_pos = tl.load(seq_pos_ptr + t)
    page = tl.load(indices_ptr + tl.load(indptr_ptr + request) + seq_pos // block_size)
    slot = page.to(tl.int64) * c_stride_block + (seq_pos % block_size) * c_stride_slot

    kh = tl.arange(0, KV_PAD)
    k_rows = t * k_stride_t + kh * k_stride_h
    r1, r2, mask = _rotate(k_ptr, k_rows, kh < KV_HEADS, d, d_ok, cos, sin, HALF)
    r1, r2 = r1.to(k_ptr.dtype.element_ty), r2.to(k_ptr.dtype.element_ty)
    k_at = k_ptr + k_rows[:, None] + d[None, :]
    tl.store(k_at, r1, mask=mask)
    tl.store(k_at + HALF, r2, mask=mask)
    cache_at = cache_ptr + slot + (kh * c_stride_head)[:, None] + d[None, :]
    tl.store(cache_at, r1, mask=mask)
    tl.store(cache_at + HALF, r2, mask=mask)

    v_at = v_ptr + (t * v_stride_t + kh * v_stride_h)[:, None] + d[None, :]
    tl.store(cache_at + c_stride_kv, tl.load(v_at, mask=mask), mask=mask)
    tl.store(cache_at + c_stride_kv + HALF, tl.load(v_at + HALF, mask=mask), mask=mask)
