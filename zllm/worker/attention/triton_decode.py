"""A paged GQA decode-attention kernel in Triton, for decode steps of many requests.

At W1's decode batch (256 requests, 640 tokens of context) flashinfer's decode kernels carry a
fixed cost per call with head_dim 64: replayed from a CUDA graph, as the engine runs them, they
took 144 us per layer of the Llama-3.2-1B shape on an H100, against a 115 us floor (the KV bytes
over the copy bandwidth). This kernel took 116-123 us, and 224 us against flashinfer's 240 on the
8B shape (head_dim 128); W1 became 9% faster on the 1B shape and 3% on the 8B
(docs/benchmarks.md, H100 tenth session).

The kernel is the plain design: one program per (KV head, request) reads that request's pages
once, through the page table flashinfer's kernels read (indptr and indices), and attends with all
the query heads of its group at once (tensor-core dots of [16, D] x [D, BLOCK_N], the group's
rows padded to 16), with an online softmax in float32. No plan: FlashInferBackend runs it for
pure-decode steps whose requests times KV heads reach `triton_decode_min_programs`.

Small decode steps (batch 1 above all) have too few (request, KV head) pairs to fill the GPU, and
there a step's attention is latency, not bytes. For them each sequence's tiles are split among
`splits` programs per pair (the grid's third dimension, read at run time: one compiled kernel
serves every count). Each leaves its running max, sum and unnormalised output in a
workspace and takes a ticket; the last of the pair's live splits merges them in split order (so
the result does not depend on which finished first), writes the output and zeroes the ticket
counter for the next call. One launch, no plan, no merge kernel, q read through its strides:
flashinfer's captured decode at batch 1 is three kernels (q's copy, the split decode, the merge).

With `new_kv` the kernel also does what rope_store.py does before it in other steps: it rotates
q and the new k by RoPE (in registers), and the program whose tokens end at the new position
writes k and v to the cache and attends to them from registers, so no program reads a slot the
launch writes. FlashInferBackend runs every pure-decode step on this kernel this way: one launch
per layer instead of two. On an H100 (2026-12-06, 16 calls per graph, 640 tokens of context) the
pair took 8.9 us per layer at batch 1 of the Llama-3.2-1B shape and this 6.0 (8B shape: 11.0 and
8.3); at 256 requests 119.0 and 116.5 (8B: 226.5 and 222.9).

The cache is zllm's layer layout [blocks, 2, block_size, KVH, D] (flashinfer's NHD): the program
for KV head h of request r reads rows of D contiguous values, one per token. Programs run KV
head fastest, so the heads of one request, which share each page, run side by side.

Triton is imported here only (it ships with CUDA builds of torch). On CPU the tests run this
kernel through Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

_LOG2E = 1 / math.log(2)


@triton.jit
def _gqa_decode_kernel(q_ptr, cache_ptr, indptr_ptr, indices_ptr, seq_lens_ptr, out_ptr,
                       part_ptr, ticket_ptr, k_new_ptr, v_new_ptr, pos_ptr, cos_sin_ptr,
                       score_scale, cap_log2, window,
                       q_stride_req, q_stride_head, k_new_stride_req, k_new_stride_head,
                       v_new_stride_req, v_new_stride_head,
                       cache_stride_block, cache_stride_kv, cache_stride_token, cache_stride_head,
                       out_stride_req, out_stride_head,
                       GROUP: tl.constexpr, GROUP_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
                       BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                       SOFT_CAP: tl.constexpr, WINDOW: tl.constexpr, SPLIT: tl.constexpr,
                       GROUP_P2: tl.constexpr, MERGE_SPLITS: tl.constexpr,
                       ROPE_STORE: tl.constexpr):
    """ROPE_STORE: q and the new k (at position seq_len - 1) arrive unrotated; the program
    rotates them, and the one whose tokens hold that position writes k and v to the cache and
    attends to them from registers (no program of the launch reads that slot)."""
    kv_head = tl.program_id(0)
    req = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + req)
    first = 0
    if WINDOW:  # the query at position seq_len - 1 sees the `window` keys ending there
        first = tl.maximum(seq_len - window, 0)
    start = first // BLOCK_N * BLOCK_N
    end = seq_len
    if SPLIT:  # this program's share of the tiles: the same whole number for each split
        split = tl.program_id(2)
        splits = tl.num_programs(2)  # not a constexpr: one compiled kernel for every count
        tiles = tl.cdiv(seq_len - start, BLOCK_N)
        per_split = tl.maximum(tl.cdiv(tiles, splits), 1)
        live_splits = tl.cdiv(tiles, per_split)
        if split >= live_splits:  # a short sequence: the splits past its end have nothing
            return
        start += split * per_split * BLOCK_N
        end = tl.minimum(start + per_split * BLOCK_N, seq_len)
    rows = tl.arange(0, GROUP_ROWS)  # the group's query heads, padded to a dot's 16 rows
    dims = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + rows
    real = rows < GROUP
    q_at = q_ptr + req * q_stride_req + heads[:, None] * q_stride_head
    if ROPE_STORE:
        cos, sin, partner = _rope_table(cos_sin_ptr, pos_ptr + req, dims, HEAD_DIM)
        q = _rotated(q_at, dims, partner, cos, sin, real[:, None])
        cached = seq_len - 1  # the new token's K and V are not in the cache yet
        end_cached = tl.minimum(end, cached)
        if end_cached <= first:  # no cached token in sight: no tile of them (all would be -inf)
            end_cached = start
    else:
        q = tl.load(q_at + dims[None, :], mask=real[:, None], other=0.0)
        cached = seq_len
        end_cached = end

    k_base = cache_ptr + kv_head * cache_stride_head
    v_base = k_base + cache_stride_kv
    pages = indices_ptr + tl.load(indptr_ptr + req)  # this request's blocks, in order

    m_i = tl.full([GROUP_ROWS], float("-inf"), tl.float32)  # running max, in log2 units
    l_i = tl.zeros([GROUP_ROWS], tl.float32)
    acc = tl.zeros([GROUP_ROWS, HEAD_DIM], tl.float32)
    for n in range(start, end_cached, BLOCK_N):
        tokens = n + tl.arange(0, BLOCK_N)
        live = (tokens < cached) & (tokens >= first)
        blocks = tl.load(pages + tokens // BLOCK_SIZE, mask=live, other=0).to(tl.int64)
        offsets = blocks * cache_stride_block + (tokens % BLOCK_SIZE) * cache_stride_token
        k = tl.load(k_base + offsets[:, None] + dims[None, :], mask=live[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k)) * score_scale  # [GROUP_ROWS, BLOCK_N], float32
        if SOFT_CAP:  # cap * tanh(q.k * scale / cap), in log2 units
            scores = cap_log2 * _tanh(scores)
        scores = tl.where(live[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offsets[:, None] + dims[None, :], mask=live[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    if ROPE_STORE:
        if (cached >= start) & (cached < end):  # this program's tokens end with the new one
            k_new = _rotated(k_new_ptr + req * k_new_stride_req + kv_head * k_new_stride_head,
                             dims, partner, cos, sin, dims < HEAD_DIM)
            v_new = tl.load(v_new_ptr + req * v_new_stride_req + kv_head * v_new_stride_head
                            + dims)
            page = tl.load(pages + cached // BLOCK_SIZE).to(tl.int64)
            slot = page * cache_stride_block + (cached % BLOCK_SIZE) * cache_stride_token
            tl.store(k_base + slot + dims, k_new)
            tl.store(v_base + slot + dims, v_new)
            # One more key, as a tile of one: the same float32 scores and bf16 weights.
            scores = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * score_scale
            if SOFT_CAP:
                scores = cap_log2 * _tanh(scores)
            m_new = tl.maximum(m_i, scores)
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(scores - m_new)
            l_i = l_i * alpha + p
            p = p.to(v_new.dtype).to(tl.float32)
            acc = acc * alpha[:, None] + p[:, None] * v_new.to(tl.float32)[None, :]
            m_i = m_new
    out_ptrs = out_ptr + req * out_stride_req + heads[:, None] * out_stride_head + dims[None, :]
    if not SPLIT:
        out = acc / l_i[:, None]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=real[:, None])
    else:
        # Leave this split's running max, sum and unnormalised output (the group's real rows);
        # the last of the request's live splits to arrive merges them all, in split order.
        pair = req * tl.num_programs(0) + kv_head
        slot_floats = GROUP * (HEAD_DIM + 2)
        pair_part = part_ptr + pair.to(tl.int64) * splits * slot_floats
        acc_offs = rows[:, None] * HEAD_DIM + dims[None, :]
        slot = pair_part + split * slot_floats
        tl.store(slot + acc_offs, acc, mask=real[:, None])
        tl.store(slot + GROUP * HEAD_DIM + rows, m_i, mask=real)
        tl.store(slot + GROUP * (HEAD_DIM + 1) + rows, l_i, mask=real)
        tl.debug_barrier()  # every thread's share is written before the ticket is taken
        ticket = tl.atomic_add(ticket_ptr + pair, 1, sem="acq_rel")
        if ticket == live_splits - 1:
            _merge_splits(pair_part, out_ptr + req * out_stride_req, out_stride_head,
                          kv_head * GROUP, live_splits, GROUP, GROUP_P2, HEAD_DIM, MERGE_SPLITS)
            tl.atomic_xchg(ticket_ptr + pair, 0)  # zero again for the next call


@triton.jit
def _merge_splits(part, out_ptr, out_stride_head, first_head, live_splits, GROUP: tl.constexpr,
                  GROUP_P2: tl.constexpr, HEAD_DIM: tl.constexpr, MERGE_SPLITS: tl.constexpr):
    """Merge a (request, KV head)'s live splits into its output heads: MERGE_SPLITS slots a
    load (issued together, not one round trip per split), in split order."""
    block = tl.arange(0, MERGE_SPLITS)
    rows = tl.arange(0, GROUP_P2)
    dims = tl.arange(0, HEAD_DIM)
    real = rows < GROUP
    slot_floats = GROUP * (HEAD_DIM + 2)
    m_all = tl.full([GROUP_P2], float("-inf"), tl.float32)
    l_all = tl.zeros([GROUP_P2], tl.float32)
    acc = tl.zeros([GROUP_P2, HEAD_DIM], tl.float32)
    for first in range(0, live_splits, MERGE_SPLITS):  # the first block holds split 0: m_all
        s = first + block                              # is finite for the real rows from then
        live = (s < live_splits)[:, None] & real[None, :]
        base = part + s[:, None] * slot_floats  # [MERGE_SPLITS, 1]
        m_s = tl.load(base + GROUP * HEAD_DIM + rows[None, :], mask=live, other=float("-inf"),
                      cache_modifier=".cg")
        m_s = tl.where(real[None, :], m_s, 0.0)  # padding rows: finite, never stored
        l_s = tl.load(base + GROUP * (HEAD_DIM + 1) + rows[None, :], mask=live, other=0.0,
                      cache_modifier=".cg")
        acc_s = tl.load(base[:, :, None] + rows[None, :, None] * HEAD_DIM + dims[None, None, :],
                        mask=live[:, :, None], other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m_all, tl.max(m_s, 0))
        alpha = tl.exp2(m_all - m_new)
        weight = tl.exp2(m_s - m_new[None, :])  # [MERGE_SPLITS, GROUP_P2]; 0 where not live
        l_all = l_all * alpha + tl.sum(l_s * weight, 0)
        acc = acc * alpha[:, None] + tl.sum(acc_s * weight[:, :, None], 0)
        m_all = m_new
    out = acc / tl.where(real, l_all, 1.0)[:, None]
    tl.store(out_ptr + (first_head + rows)[:, None] * out_stride_head + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=real[:, None])


@triton.jit
def _rope_table(cos_sin_ptr, pos_at, dims, HEAD_DIM: tl.constexpr):
    """RoPE at the position at pos_at, from a float32 [P, D] table of cos | sin (the
    rotate-half layout, as rope_store.py reads it): per dimension d, its cos and signed sin and
    the partner dimension, so that rotated[d] = x[d] * cos + x[partner] * sin."""
    half: tl.constexpr = HEAD_DIM // 2
    table = cos_sin_ptr + tl.load(pos_at).to(tl.int64) * HEAD_DIM
    cos = tl.load(table + dims % half)
    sin = tl.load(table + half + dims % half)
    return cos, tl.where(dims < half, -sin, sin), (dims + half) % HEAD_DIM


@triton.jit
def _rotated(x_at, dims, partner, cos, sin, mask):
    """The rows at x_at (one head of D values per row; x_at a column of row pointers, or a
    single pointer) rotated in float32 and rounded once to their dtype, as rope_store.py
    writes them."""
    x = tl.load(x_at + dims, mask=mask, other=0.0).to(tl.float32)
    x_partner = tl.load(x_at + partner, mask=mask, other=0.0).to(tl.float32)
    return (x * cos + x_partner * sin).to(x_at.dtype.element_ty)


@triton.jit
def _tanh(x):
    # tanh(x) = 1 - 2 / (exp(2x) + 1), which saturates cleanly at +-1 for large |x|.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


class NewKV(NamedTuple):
    """A decode step's new keys and values, not yet rotated nor stored: k and v [R, KVH, D]
    (views into the qkv projection's output allowed, unit stride along D), each request's
    position [>= R] and RoPE's float32 [P, D] table of cos | sin (FusedRotaryEmbedding)."""
    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor
    cos_sin: torch.Tensor


def gqa_decode(q: torch.Tensor, kv_cache: torch.Tensor, page_indptr: torch.Tensor,
               page_indices: torch.Tensor, seq_lens: torch.Tensor, scale: float,
               out: Optional[torch.Tensor] = None,
               soft_cap: Optional[float] = None, window: Optional[int] = None,
               block_n: Optional[int] = None, num_warps: int = 2,
               num_stages: int = 3, splits: int = 1,
               workspace: Optional[SplitWorkspace] = None,
               new_kv: Optional[NewKV] = None) -> torch.Tensor:
    """One decode query per request: q [R, H, D] (each head's D values contiguous), kv_cache
    [blocks, 2, block_size, KVH, D], the page table as flashinfer takes it (int32: request r's
    blocks, in order, are page_indices[page_indptr[r]:page_indptr[r + 1]]), seq_lens [R] int32
    (at least 1; the query sits at position seq_len - 1). Returns [R, H, D], written into `out`
    if given. `window`: the query sees only the last `window` keys; `soft_cap`: the scaled scores
    s = scale * q.k become cap * tanh(s / cap) before the softmax (Gemma 2's soft-capping).

    Tiles: `block_n` tokens a loop (default 64; 32 past head_dim 128, so that a K tile stays
    within 16 KiB), `num_warps`, `num_stages` (Triton's software pipelining). The defaults were
    the best of a sweep on an H100 at 128 and 256 requests, at both head sizes.

    `splits` > 1: each sequence's tiles are shared among that many programs per KV head (a
    short sequence leaves the last ones idle), which merge their results in the same launch;
    for small batches, which one program per (request, KV head) would leave the GPU mostly
    idle. Needs a `workspace` sized for R x KVH x splits (`SplitWorkspace`).

    `new_kv`: q and the step's new keys arrive unrotated and the cache does not hold the new
    keys and values yet (slot: position seq_len - 1 of each request's pages). The kernel applies
    RoPE to both, writes k and v to their slots and attends to them, as rope_store.py followed
    by this kernel would, in one launch instead of two."""
    if q.stride(2) != 1:
        q = q.contiguous()
    num_reqs, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    group = num_heads // num_kv_heads
    if new_kv is not None:
        _check_new_kv(new_kv, num_reqs, num_kv_heads, head_dim)
        k_new, v_new, positions, cos_sin = new_kv
    else:
        k_new = v_new = positions = cos_sin = q  # not read
    if out is None:
        out = torch.empty_like(q)
    if splits > 1:
        if workspace is None or not workspace.fits(num_reqs, num_kv_heads, splits):
            raise ValueError(f"splits {splits} for {num_reqs} requests x {num_kv_heads} KV heads "
                             f"need a SplitWorkspace of at least that many slots and pairs")
        partials, tickets = workspace.partials, workspace.tickets
    else:
        partials, tickets = out, out  # not read
    # The kernel's softmax runs on exp2: log2(e) goes into the last factor of the scores.
    score_scale = scale / soft_cap if soft_cap else scale * _LOG2E
    _gqa_decode_kernel[(num_kv_heads, num_reqs, splits)](
        q, kv_cache, page_indptr, page_indices, seq_lens, out, partials, tickets,
        k_new, v_new, positions, cos_sin, score_scale, (soft_cap or 0.0) * _LOG2E, window or 0,
        q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1), v_new.stride(0),
        v_new.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        out.stride(0), out.stride(1),
        GROUP=group, GROUP_ROWS=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, BLOCK_N=block_n or min(64, max(16, 8192 // head_dim)),
        SOFT_CAP=bool(soft_cap), WINDOW=bool(window), SPLIT=splits > 1,
        GROUP_P2=triton.next_power_of_2(group),
        # the merge's block of slots: about 4096 floats of partial outputs in registers at once
        MERGE_SPLITS=max(2, min(16, 4096 // (triton.next_power_of_2(group) * head_dim))),
        ROPE_STORE=new_kv is not None, num_warps=num_warps, num_stages=num_stages)
    return out


def _check_new_kv(new_kv: NewKV, num_reqs: int, num_kv_heads: int, head_dim: int) -> None:
    k, v, positions, cos_sin = new_kv
    for name, x in (("k", k), ("v", v)):
        if x.shape != (num_reqs, num_kv_heads, head_dim) or x.stride(2) != 1:
            raise ValueError(f"new {name} {tuple(x.shape)} strides {x.stride()}: needs "
                             f"[{num_reqs}, {num_kv_heads}, {head_dim}], unit stride along D")
    if positions.dim() != 1 or positions.stride(0) != 1 or len(positions) < num_reqs:
        raise ValueError(f"positions {tuple(positions.shape)} strides {positions.stride()}: "
                         f"needs one contiguous position for each of {num_reqs} requests")
    if (cos_sin.dtype != torch.float32 or not cos_sin.is_contiguous()
            or cos_sin.shape[1] != head_dim):
        raise ValueError(f"cos_sin {tuple(cos_sin.shape)} {cos_sin.dtype}: needs contiguous "
                         f"float32 [positions, {head_dim}]")


class SplitWorkspace:
    """Where split programs leave their partial results (float32: each query head's running
    max, sum and unnormalised output) and the per-(request, KV head) ticket counters that find
    the last of them (zero between calls). A CUDA graph keeps the addresses it captured, so a
    backend makes one before capturing and keeps it."""

    def __init__(self, device: torch.device, slots: int, pairs: int, num_heads: int,
                 num_kv_heads: int, head_dim: int) -> None:
        group = num_heads // num_kv_heads
        self.slots, self.pairs = slots, pairs
        self.partials = torch.empty(slots * group * (head_dim + 2), dtype=torch.float32,
                                    device=device)
        self.tickets = torch.zeros(pairs, dtype=torch.int32, device=device)

    def fits(self, num_reqs: int, num_kv_heads: int, splits: int) -> bool:
        return (num_reqs * num_kv_heads * splits <= self.slots
                and num_reqs * num_kv_heads <= self.pairs)


def unsupported(head_dim: int, dtype: torch.dtype) -> str:
    """Why FlashInferBackend should not run a model's decode steps on this kernel ("" if it
    may). Past head_dim 128 (Gemma 2's 256) the kernel computes right, but it was never timed on
    a GPU and its Hopper build spills registers there, so those models keep flashinfer's."""
    if head_dim & (head_dim - 1) or not 16 <= head_dim <= 128:
        return (f"head_dim {head_dim} (the Triton decode kernel: a power of 2 in [16, 128]; "
                f"it was timed at 64 and 128)")
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"dtype {dtype}"
    return ""

