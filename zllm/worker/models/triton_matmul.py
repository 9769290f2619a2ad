"""x @ W^T in one Triton kernel with a chosen tile and split of the inner dimension.

At W1's decode batch (256 rows) cuBLAS runs the Llama-3.1-8B shape's narrow products well
short of their floor on an H100 (o: 18.2 us against 12.7; qkv 25.2 against 18.7; 2026-12-05,
zllm.bench.linear_shapes), and none of cuBLASLt's heuristic algorithms does better. At 256 rows
these products sit where their bytes and their FLOPs take about as long, and with 128 x 128
tiles an [256, 4096] output is 64 tiles for 132 SMs. This kernel lets the tuner
(zllm/worker/models/gemm_tuning.py) try other tiles and split the inner dimension (SPLIT_K) so
that every SM works.

Each program computes one BLOCK_M x BLOCK_N tile of the output over one of SPLIT_K equal slices
of the inner dimension. Programs run the tiles of one column of W side by side (M fastest), so
W is read from memory once. With SPLIT_K > 1 each program leaves its float32 partial sum in a
workspace and takes a ticket for its tile; the last program of a tile adds the slices in order
(so the result does not depend on which finished first), writes the output and puts the ticket
counter back to zero for the next call. One launch, no memset: a CUDA graph captures it as one
node.

The weight may be row-major ([out, in] as checkpoints store it) or column-major (the engine's
layout, see column_major_linears); its strides say which. On CPU the tests run it through
Triton's interpreter (TRITON_INTERPRET=1).

`gated_matmul_tma` is a second form of the gated product (gate_up with its SiLU) for the decode
batch: the same sums, its operands loaded by Hopper's tensor memory accelerator (TMA) through
tensor descriptors instead of per-thread pointers. On an H100 (2026-12-06) the 8B shape's
gate_up and SiLU at 256 rows took 102.6 us in 128 x 128 x 64 tiles this way, against 109.7 for
cuBLAS's product and flashinfer's activation and 112.8 for the pointer form of the same tile.
The descriptors also clip the edges (loads past the end read zeros, stores past it are
dropped), so it takes any row, column and inner size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4

    def fits(self, m: int, n: int, k: int) -> bool:
        """Whether the inner dimension cuts into split_k slices of whole BLOCK_K steps."""
        return k % (self.block_k * self.split_k) == 0

    def tiles(self, m: int, n: int) -> int:
        return triton.cdiv(m, self.block_m) * triton.cdiv(n, self.block_n)

    @property
    def config(self) -> dict:
        """For reports: the tile and how it runs."""
        return {"tile": f"{self.block_m}x{self.block_n}x{self.block_k}", "splitk": self.split_k,
                "warps": self.num_warps, "stages": self.num_stages}


def tile_configs(m: int) -> list[TileConfig]:
    """The configurations worth timing for a product of m rows: tiles no taller than m needs
    (tl.dot's smallest is 16 rows), wide and narrow, split 1, 2 or 4 ways, within an H100's
    shared memory (stages x the tile's two operands in 16-bit). At 16 rows or fewer, where the
    product only streams the weight, also narrower and deeper tiles and deeper pipelines."""
    few = m <= 16
    block_ms = sorted({min(b, max(16, triton.next_power_of_2(m))) for b in (64, 128)})
    out = []
    for bm in block_ms:
        for bn in (32, 64, 128, 256) if few else (64, 128, 256):
            for bk in (64, 128, 256) if few else (64, 128):
                for split in (1, 2, 4):
                    pipelines = ((4, 4), (8, 3), (4, 6), (8, 5)) if few else ((4, 4), (8, 3))
                    for warps, stages in pipelines:
                        if stages * (bm * bk + bk * bn) * 2 <= 200 * 1024:
                            out.append(TileConfig(bm, bn, bk, split, warps, stages))
    return out


class Workspace:
    """Float32 partial sums and per-tile ticket counters (zero between calls) for split-K calls.
    A CUDA graph keeps the addresses it captured: size it before capturing."""

    def __init__(self, device: torch.device, floats: int, tiles: int = 1 << 14) -> None:
        self.partials = torch.empty(floats, dtype=torch.float32, device=device)
        self.tickets = torch.zeros(tiles, dtype=torch.int32, device=device)


def matmul(x: torch.Tensor, weight: torch.Tensor, config: TileConfig,
           workspace: Optional[Workspace] = None, out: Optional[torch.Tensor] = None,
           out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """x [M, K] (unit stride along K) times weight [N, K]^T, into out [M, N] (out_dtype: x's by
    default). Split-K configurations need a workspace of at least split_k * M * N floats and
    as many tickets as output tiles."""
    m, k = x.shape
    n = weight.shape[0]
    _check_operands(x, weight, config, n)
    if out is None:
        out = torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
    elif out.shape != (m, n) or out.stride(1) != 1:
        raise ValueError(f"out {tuple(out.shape)} strides {out.stride()}: needs [{m}, {n}] with "
                         f"unit stride along the last dimension")
    tiles = config.tiles(m, n)
    if config.split_k > 1:
        if m * n >= 2**31:  # the kernel steps between slices by M * N in int32
            raise ValueError(f"split_k {config.split_k} at {m} x {n}: at most 2^31 outputs")
        if (workspace is None or workspace.partials.numel() < config.split_k * m * n
                or workspace.tickets.numel() < tiles):
            raise ValueError(f"split_k {config.split_k} at {m} x {n} needs a workspace of "
                             f"{config.split_k * m * n} floats and {tiles} tickets")
        partials, tickets = workspace.partials, workspace.tickets
    else:
        partials, tickets = out, out  # not read
    _matmul_kernel[(tiles, config.split_k)](
        x, weight, out, partials, tickets, m, n, k, x.stride(0), weight.stride(0),
        weight.stride(1), out.stride(0), SPLIT_K=config.split_k, BLOCK_M=config.block_m,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, EVEN_M=m % config.block_m == 0,
        EVEN_N=n % config.block_n == 0, GATED=False, num_warps=config.num_warps,
        num_stages=config.num_stages)
    return out


def _check_operands(x: torch.Tensor, weight: torch.Tensor, config: TileConfig, n: int) -> None:
    m, k = x.shape
    if x.stride(1) != 1 or not config.fits(m, n, k):
        raise ValueError(f"shape {tuple(x.shape)} strides {x.stride()}: needs unit stride along "
                         f"the inner dimension and {k} a multiple of block_k * split_k "
                         f"({config.block_k} * {config.split_k})")
    if x.dtype != weight.dtype or weight.shape[1] != k:
        raise ValueError(f"x {tuple(x.shape)} {x.dtype} and weight {tuple(weight.shape)} "
                         f"{weight.dtype} must share the inner dimension and dtype")


@triton.jit
def _matmul_kernel(x_ptr, w_ptr, out_ptr, part_ptr, ticket_ptr, M, N, K, stride_xm, stride_wn,
                   stride_wk, stride_om, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_M: tl.constexpr,
                   EVEN_N: tl.constexpr, GATED: tl.constexpr):
    """GATED (split 1 only): W is [gate; up] with N rows each; the output is silu(gate) * up,
    both products rounded to the output's dtype first."""
    tile = tl.program_id(0)
    pid_k = tl.program_id(1)
    m_tiles = tl.cdiv(M, BLOCK_M)
    pid_m = tile % m_tiles  # M fastest: the tiles of one column of W run side by side
    pid_n = tile // m_tiles
    k_slice = K // SPLIT_K
    # Offsets into x, W, the output and the partials in int64: an LM head's may pass 2^31.
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k.to(tl.int64) * k_slice + tl.arange(0, BLOCK_K)
    m_ok = offs_m[:, None] < M
    n_ok = offs_n[None, :] < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N) if GATED else (1, 1), dtype=tl.float32)
    for _ in range(0, k_slice, BLOCK_K):
        if EVEN_M:
            a = tl.load(x_ptrs)
        else:
            a = tl.load(x_ptrs, mask=m_ok, other=0.0)
        if EVEN_N:
            b = tl.load(w_ptrs)
        else:
            b = tl.load(w_ptrs, mask=n_ok, other=0.0)
        acc = tl.dot(a, b, acc)
        if GATED:  # the same columns of up, N rows of W further on
            if EVEN_N:
                b = tl.load(w_ptrs + N.to(tl.int64) * stride_wn)
            else:
                b = tl.load(w_ptrs + N.to(tl.int64) * stride_wn, mask=n_ok, other=0.0)
            acc_up = tl.dot(a, b, acc_up)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    mask = m_ok & n_ok
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    if GATED:
        dtype = out_ptr.dtype.element_ty
        gate = acc.to(dtype).to(tl.float32)
        acc = gate / (1.0 + tl.exp(-gate)) * acc_up.to(dtype).to(tl.float32)
    if SPLIT_K > 1:
        # Leave this slice's sum; the tile's last program to arrive adds all slices in order.
        p_offs = offs_m[:, None] * N + offs_n[None, :]
        tl.store(part_ptr + pid_k.to(tl.int64) * M * N + p_offs, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the ticket is taken
        ticket = tl.atomic_add(ticket_ptr + tile, 1, sem="acq_rel")
        if ticket == SPLIT_K - 1:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            slice_ptrs = part_ptr + p_offs
            for _slice in tl.static_range(SPLIT_K):
                acc += tl.load(slice_ptrs, mask=mask, other=0.0, cache_modifier=".cg")
                slice_ptrs += M * N
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(ticket_ptr + tile, 0)
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def gated_matmul(x: torch.Tensor, weight: torch.Tensor, config: TileConfig,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """silu(x @ gate^T) * (x @ up^T) for weight = [gate; up] ([2I, K], a gated MLP's gate_up
    projection): out [M, I] in x's dtype, without the [M, 2I] product in memory between. Each
    program computes the same BLOCK_N columns of gate and of up; both sums are rounded to x's
    dtype before the activation, as the unfused layers round the product. Split 1 only."""
    m, k = x.shape
    n = weight.shape[0] // 2
    if weight.shape[0] % 2 or config.split_k != 1:
        raise ValueError(f"weight {tuple(weight.shape)}, split_k {config.split_k}: needs an even "
                         f"number of weight rows ([gate; up]) and split_k 1")
    _check_operands(x, weight, config, n)
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    _matmul_kernel[(config.tiles(m, n), 1)](
        x, weight, out, out, out, m, n, k, x.stride(0), weight.stride(0), weight.stride(1),
        out.stride(0), SPLIT_K=1, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, EVEN_M=m % config.block_m == 0, EVEN_N=n % config.block_n == 0,
        GATED=True, num_warps=config.num_warps, num_stages=config.num_stages)
    return out


def gated_matmul_tma(x: torch.Tensor, weight: torch.Tensor, config: TileConfig,
                     out: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """gated_matmul's silu(x @ gate^T) * (x @ up^T), its operands loaded through tensor
    descriptors (TMA on Hopper and later): out [M, I] in x's dtype, or None where x or the
    weight is not as a descriptor takes it (unit stride along the last dimension, 16-byte
    aligned rows and start). Any M, I and K: the descriptors read zeros past each edge and drop
    stores past it. The gate columns of an edge tile past I read the first up columns; they
    only reach output columns past I, which are dropped. Split 1 only."""
    m, k = x.shape
    n = weight.shape[0] // 2
    if weight.shape[0] % 2 or config.split_k != 1:
        raise ValueError(f"weight {tuple(weight.shape)}, split_k {config.split_k}: needs an even "
                         f"number of weight rows ([gate; up]) and split_k 1")
    if x.dtype != weight.dtype or weight.shape[1] != k:
        raise ValueError(f"x {tuple(x.shape)} {x.dtype} and weight {tuple(weight.shape)} "
                         f"{weight.dtype} must share the inner dimension and dtype")
    column_major = weight.stride(1) != 1  # else row-major (either, where k is 1)
    w = weight.t() if column_major else weight  # the view with unit stride along its rows
    if not (_describable(x) and _describable(w) and (n * x.element_size()) % 16 == 0):
        return None
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    elif not _describable(out) or out.shape != (m, n):
        return None
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    _gated_tma_kernel[(triton.cdiv(m, bm) * triton.cdiv(n, bn),)](
        TensorDescriptor.from_tensor(x, [bm, bk]),
        TensorDescriptor.from_tensor(w, [bk, bn] if column_major else [bn, bk]),
        TensorDescriptor.from_tensor(out, [bm, bn]), m, n, k, COLUMN_MAJOR=column_major,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=config.num_warps,
        num_stages=config.num_stages)
    return out


def _describable(t: torch.Tensor) -> bool:
    """Whether a 2-D tensor meets a tensor descriptor's layout: rows of unit stride, the row
    pitch and the start 16-byte aligned."""
    size = t.element_size()
    return (t.dim() == 2 and t.stride(1) == 1 and (t.stride(0) * size) % 16 == 0
            and t.data_ptr() % 16 == 0)


@triton.jit
def _gated_tma_kernel(x_desc, w_desc, out_desc, M, N, K, COLUMN_MAJOR: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One BLOCK_M x BLOCK_N tile of silu(gate) * up. Tiles are ordered in groups of up to 8
    row tiles per column tile (a decode batch's few row tiles run side by side, so each weight
    tile comes from memory once; a prompt step's many keep x's rows in L2)."""
    GROUP_M: tl.constexpr = 8
    tile = tl.program_id(0)
    m_tiles = tl.cdiv(M, BLOCK_M)
    in_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (tile // in_group) * GROUP_M
    group_size = tl.minimum(m_tiles - first_m, GROUP_M)
    off_m = (first_m + (tile % in_group) % group_size) * BLOCK_M
    off_n = ((tile % in_group) // group_size) * BLOCK_N
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = x_desc.load([off_m, k])
        if COLUMN_MAJOR:  # w is [K, 2N]
            gate = tl.dot(a, w_desc.load([k, off_n]), gate)
            up = tl.dot(a, w_desc.load([k, N + off_n]), up)
        else:  # w is [2N, K]
            gate = tl.dot(a, w_desc.load([off_n, k]).T, gate)
            up = tl.dot(a, w_desc.load([N + off_n, k]).T, up)
    dtype = out_desc.dtype
    g = gate.to(dtype).to(tl.float32)  # both rounded as the unfused product rounds them
    act = g / (1.0 + tl.exp(-g)) * up.to(dtype).to(tl.float32)
    out_desc.store([off_m, off_n], act.to(dtype))
