"""x @ W^T for a few rows of x (a decode step at a small batch) in one Triton kernel.

At one to a few rows a linear layer only streams its weight, so its floor is the weight's bytes
over the memory bandwidth. cuBLAS is far from it on narrow layers: on an H100 the Llama-3.2-1B
shape's four matmuls of a decoder layer took 54 us at one row against a 24 us floor
(zllm.bench.linear_shapes). This kernel gives each program a tile of BLOCK_N output features and
one of SPLIT_K equal slices of the inner dimension. With SPLIT_K > 1 each program leaves its
float32 partial sum in a workspace and takes a ticket for its tile; the last program of a tile
adds the slices in order (so the result does not depend on which finished first), writes the
output and puts the ticket counter back to zero for the next call. One launch, no memset: CUDA
graphs capture it as one node.

The weight may be row-major ([out, in] as checkpoints store it) or column-major (see
column_major_linears); its strides say which. Rows of x beyond BLOCK_M are not this kernel's
job: callers use it for at most MAX_ROWS rows.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Optional

import torch

MAX_ROWS = 16  # tl.dot's smallest tile: rows of x past the batch are masked, never read

try:  # Triton comes with CUDA builds of torch; without it (CPU wheels) this path is off
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None


def available() -> bool:
    return importlib.util.find_spec("triton") is not None


@dataclass(frozen=True)
class SkinnyConfig:
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 4

    def fits(self, n: int, k: int) -> bool:
        return k % (self.block_k * self.split_k) == 0


def pick_config(n: int, k: int, column_major: bool, sms: int = 132) -> SkinnyConfig:
    """A tile for an [n, k] weight: rows of at least 128 contiguous bytes of the weight where
    the shape allows, and the inner dimension split until there are programs enough to keep
    every SM streaming (two per SM)."""
    block_n, block_k = (64, 64) if column_major else (16, 128)
    while k % block_k and block_k > 16:  # tl.dot's smallest inner tile is 16
        block_k //= 2
    split = 1
    while -(-n // block_n) * split < 2 * sms and k % (block_k * split * 2) == 0 and split < 8:
        split *= 2
    return SkinnyConfig(block_n, block_k, split)


class _Workspace:
    """Per device: float32 partial sums and the ticket counters (zero between calls)."""

    def __init__(self, device: torch.device) -> None:
        self.partials = torch.empty(0, dtype=torch.float32, device=device)
        self.tickets = torch.zeros(1 << 16, dtype=torch.int32, device=device)

    def partials_for(self, numel: int) -> torch.Tensor:
        if self.partials.numel() < numel:
            # A graph captured earlier keeps the old buffer's address: reserve() before capture.
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(f"skinny_matmul needs {numel} floats of workspace while a CUDA "
                                   f"graph is captured; reserve() them before capturing")
            self.partials = torch.empty(numel, dtype=torch.float32, device=self.partials.device)
        return self.partials


def reserve(device: torch.device, shapes: list[tuple[int, int]]) -> None:
    """Size the workspace for weights of these [n, k] shapes, in either layout, at any row count
    up to MAX_ROWS: before any CUDA graph that calls skinny_matmul is captured."""
    ws = _workspaces.get(device) or _workspaces.setdefault(device, _Workspace(device))
    need = max((max(pick_config(n, k, cm).split_k for cm in (False, True)) * MAX_ROWS * n
                for n, k in shapes), default=0)
    ws.partials_for(need)


_workspaces: dict[torch.device, _Workspace] = {}


def skinny_matmul(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  config: Optional[SkinnyConfig] = None) -> torch.Tensor:
    """x [M, K] (M <= MAX_ROWS, unit stride along K) times weight [N, K]^T, plus bias [N]."""
    m, k = x.shape
    n = weight.shape[0]
    if m > MAX_ROWS or x.stride(1) != 1:
        raise ValueError(f"skinny_matmul takes at most {MAX_ROWS} rows with unit stride along "
                         f"the inner dimension, got shape {tuple(x.shape)} strides {x.stride()}")
    column_major = weight.stride(0) == 1
    config = config or pick_config(n, k, column_major)
    if not config.fits(n, k):
        raise ValueError(f"inner dimension {k} is not a multiple of block_k * split_k "
                         f"({config.block_k} * {config.split_k})")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, config.block_n), config.split_k)
    if config.split_k > 1:
        ws = _workspaces.get(x.device) or _workspaces.setdefault(x.device, _Workspace(x.device))
        if grid[0] > ws.tickets.numel():
            raise ValueError(f"{grid[0]} output tiles, more than the {ws.tickets.numel()} tickets")
        partials, tickets = ws.partials_for(config.split_k * m * n), ws.tickets
    else:
        partials, tickets = out, out  # unused
    _skinny_kernel[grid](
        x, weight, bias if bias is not None else out, out, partials, tickets,
        m, n, k, x.stride(0), weight.stride(0), weight.stride(1), out.stride(0),
        HAS_BIAS=bias is not None, SPLIT_K=config.split_k, BLOCK_M=MAX_ROWS,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages)
    return out


if triton is not None:
    @triton.jit
    def _skinny_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, part_ptr, ticket_ptr,
                       M, N, K, stride_xm, stride_wn, stride_wk, stride_om,
                       HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        k_slice = K // SPLIT_K
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = pid_k * k_slice + tl.arange(0, BLOCK_K)
        m_ok = offs_m[:, None] < M
        n_ok = offs_n[None, :] < N
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
        w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in range(0, k_slice, BLOCK_K):
            x = tl.load(x_ptrs, mask=m_ok, other=0.0)
            w = tl.load(w_ptrs, mask=n_ok, other=0.0)
            acc = tl.dot(x, w, acc)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K * stride_wk
        mask = m_ok & n_ok
        if SPLIT_K > 1:
            # Leave this slice's sum; the tile's last program to arrive adds all slices in order.
            p_offs = offs_m[:, None] * N + offs_n[None, :]
            tl.store(part_ptr + pid_k * M * N + p_offs, acc, mask=mask)
            tl.debug_barrier()  # every thread's partial is written before the ticket is taken
            ticket = tl.atomic_add(ticket_ptr + pid_n, 1, sem="acq_rel")
            if ticket == SPLIT_K - 1:
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for s in tl.static_range(SPLIT_K):
                    acc += tl.load(part_ptr + s * M * N + p_offs, mask=mask, other=0.0,
                                   cache_modifier=".cg")
                if HAS_BIAS:
                    acc += tl.load(bias_ptr + offs_n[None, :], mask=n_ok, other=0.0).to(tl.float32)
                tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
                         acc.to(out_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(ticket_ptr + pid_n, 0)
        else:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n[None, :], mask=n_ok, other=0.0).to(tl.float32)
            tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
                     acc.to(out_ptr.dtype.element_ty), mask=mask)
