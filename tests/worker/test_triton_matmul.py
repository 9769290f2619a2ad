"""The tiled split-K Triton matmul (zllm/worker/models/triton_matmul.py) on Triton's CPU
interpreter against float64 products: both weight layouts, ragged edges, splits of 1 to 4, a
float32 output, and a second call on the same workspace (the tickets must read zero again).
bfloat16 dots do not run in the interpreter, so the cases are float32 and float16;
zllm.bench.linear_shapes --triton runs it in bfloat16 on a GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")  # Linux only (the test extra installs it there)

# tests/conftest.py sets TRITON_INTERPRET before triton is imported.
from zllm.worker.models import triton_matmul as tm  # noqa: E402

CASES = [  # m, n, k, column-major weight, tile, output dtype (None: x's)
    (5, 64, 128, True, tm.TileConfig(16, 32, 32, 2), None),
    (40, 96, 256, False, tm.TileConfig(32, 64, 32, 4), None),
    (64, 64, 128, True, tm.TileConfig(32, 32, 64, 1), torch.float32),
    (33, 50, 64, True, tm.TileConfig(16, 32, 16, 2), torch.float32),
]


@pytest.mark.parametrize("m,n,k,column_major,config,out_dtype", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matmul_matches_float64(m, n, k, column_major, config, out_dtype, dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = torch.randn(n, k, generator=gen).to(dtype)
    if column_major:
        w = w.t().contiguous().t()
    ref = x.double() @ w.double().t()
    ws = tm.Workspace(torch.device("cpu"), config.split_k * m * n, config.tiles(m, n))
    for _ in range(2):
        out = tm.matmul(x, w, config, ws, out_dtype=out_dtype)
        assert out.dtype == (out_dtype or dtype) and out.shape == (m, n)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert err < (1e-6 if out_dtype == torch.float32 or dtype == torch.float32 else 1e-3)
        assert int(ws.tickets.abs().sum()) == 0


def test_matmul_refuses_what_it_cannot_split():
    x, w = torch.randn(4, 96), torch.randn(8, 96)
    with pytest.raises(ValueError, match="96 a multiple of block_k \\* split_k \\(64 \\* 1\\)"):
        tm.matmul(x, w, tm.TileConfig(16, 16, 64))
    with pytest.raises(ValueError, match="needs a workspace"):
        tm.matmul(x, w, tm.TileConfig(16, 16, 16, 2))
    with pytest.raises(ValueError, match=r"out \(8, 4\) .*needs \[4, 8\]"):
        tm.matmul(x, w, tm.TileConfig(16, 16, 16), out=torch.empty(8, 4))
    with pytest.raises(ValueError, match="share the inner dimension and dtype"):
        tm.matmul(x, w.half(), tm.TileConfig(16, 16, 16))


def gated_operands(m: int, i: int, k: int, column_major: bool, dtype: torch.dtype):
    """x [m, k] and a gate_up weight [gate; up] ([2i, k]) in either layout."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = (torch.randn(2 * i, k, generator=gen) * k ** -0.5).to(dtype)
    return x, (w.t().contiguous().t() if column_major else w)


def assert_silu_of_gate_times_up(out: torch.Tensor, gate_up: torch.Tensor,
                                 dtype: torch.dtype) -> None:
    """`out` against the unfused layers' arithmetic on the product `gate_up`: rounded to the
    dtype, silu(gate) * up in float32, rounded again."""
    gate, up = gate_up.to(dtype).float().chunk(2, dim=-1)
    ref = (F.silu(gate) * up).to(dtype)
    assert out.dtype == dtype and out.shape == ref.shape
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err < (1e-6 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("m,i,k,column_major,config", [
    (5, 48, 64, True, tm.TileConfig(16, 32, 32)),
    (33, 100, 128, False, tm.TileConfig(32, 64, 64)),
    (64, 64, 64, True, tm.TileConfig(64, 32, 16)),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gated_matmul_is_silu_of_gate_times_up(m, i, k, column_major, config, dtype):
    """The fused gate_up product and SiLU against a float64 product."""
    x, w = gated_operands(m, i, k, column_major, dtype)
    assert_silu_of_gate_times_up(tm.gated_matmul(x, w, config), x.double() @ w.double().t(),
                                 dtype)


@pytest.mark.parametrize("config", [tm.TileConfig(16, 128, 64, 1, 8, 3),
                                    tm.TileConfig(16, 64, 128, 1, 8, 3)])
@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("column_major", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_few_rows_gated_tiles_match_f_linear(config, m, column_major, dtype):
    """The 16-row tiles that few_rows_gated_tile picks (gated_mlp_max_rows), at one row, a
    ragged five and a full sixteen, against F.linear's product (in float32): 192 columns make
    a ragged last program of 128 columns, or three of 64."""
    x, w = gated_operands(m, 192, 128, column_major, dtype)
    assert_silu_of_gate_times_up(tm.gated_matmul(x, w, config), F.linear(x.float(), w.float()),
                                 dtype)


@pytest.mark.parametrize("m,i,k,column_major,config", [
    (3, 40, 72, True, tm.TileConfig(16, 16, 32)),  # every edge ragged: rows, columns, depth
    (33, 48, 64, False, tm.TileConfig(16, 32, 16)),
    (64, 64, 128, True, tm.TileConfig(32, 32, 64)),
    (20, 24, 40, False, tm.TileConfig(16, 16, 16)),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gated_matmul_tma_is_silu_of_gate_times_up(m, i, k, column_major, config, dtype):
    """The descriptor form of the fused kernel against a float64 product, in both weight
    layouts and at sizes no tile divides: the descriptors' zero reads and dropped stores past
    each edge stand in for masks, and an edge tile's gate columns past i (which read the first
    up columns) never reach the output."""
    x, w = gated_operands(m, i, k, column_major, dtype)
    assert_silu_of_gate_times_up(tm.gated_matmul_tma(x, w, config),
                                 x.double() @ w.double().t(), dtype)


def test_gated_matmul_tma_declines_what_a_descriptor_cannot_take():
    """None (the caller runs the product and the activation) where a row pitch or a start is
    not 16-byte aligned; errors for what no form could compute."""
    x, w = gated_operands(8, 32, 64, True, torch.float16)
    config = tm.TileConfig(16, 16, 16)
    assert tm.gated_matmul_tma(x[:, 4:36], w[:, :32], config) is None  # start off 16 bytes
    x3, w3 = gated_operands(8, 32, 36, True, torch.float16)  # 72-byte rows
    assert tm.gated_matmul_tma(x3, w3, config) is None
    xi, wi = gated_operands(8, 28, 64, False, torch.float16)  # out rows of 28 halves: 56 bytes
    assert tm.gated_matmul_tma(xi, wi, config) is None
    with pytest.raises(ValueError, match="an even number of weight rows"):
        tm.gated_matmul_tma(x, w[:63], config)
    with pytest.raises(ValueError, match="share the inner dimension and dtype"):
        tm.gated_matmul_tma(x.float(), w, config)


def test_gated_matmul_refuses_what_it_cannot_tile():
    x = torch.randn(4, 96)
    with pytest.raises(ValueError, match="an even number of weight rows"):
        tm.gated_matmul(x, torch.randn(7, 96), tm.TileConfig(16, 16, 32))
    with pytest.raises(ValueError, match="split_k 1"):
        tm.gated_matmul(x, torch.randn(8, 96), tm.TileConfig(16, 16, 32, 3))
    with pytest.raises(ValueError, match="share the inner dimension and dtype"):
        tm.gated_matmul(x, torch.randn(8, 96).half(), tm.TileConfig(16, 16, 32))
