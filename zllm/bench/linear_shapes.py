"""The model's matrix products alone, against their floor, and the ways to call them.

    python -m zllm.bench.linear_shapes [--shapes llama-3.2-1b,llama-3.1-8b] [--rows 1,256,8192]

For each model shape, every linear layer of one decoder layer (qkv, o, gate_up, down) and the LM
head runs at each row count (1: batch-1 decode; 256: W1's decode batch; 8192: a prefill chunk),
in several forms:
  linear     F.linear(x, W), W [out, in] as checkpoints store it (the engine's call)
  nn         torch.mm(x, Wt), the weight stored transposed ([in, out], contiguous)
  splitk2/4  the inner dimension cut in 2 or 4, partial products in float32 (bmm), summed
  lt, nn_lt  linear and nn with cuBLASLt as torch's preferred BLAS library
  algoN      with --lt-algos: the column-major product through cuBLASLt directly, with the
             heuristic's N-th algorithm (algo0 is its first pick; zllm.worker.models.cublaslt)
  triN       with --triton: the column-major product through zllm's Triton kernel
             (zllm.worker.models.triton_matmul), with the N-th of its tile configurations
  few        with --few-rows, at 16 rows or fewer: that kernel with the tile the engine's
             rule picks for the shape on this GPU (gemm_tuning.few_rows_tile), where it picks
  few_rm     the same tile on the row-major weight
and for gate_up with --triton (or --few-rows), the product and the SiLU after it (the floor
counts the product):
  linear_act F.linear, then flashinfer's silu_and_mul (the engine's unfused calls)
  gatedN     zllm's Triton kernel computing both at once (gated_matmul), N-th tile
  gated_tma  its TMA form (gated_matmul_tma) with the tile the engine gives it
             (gemm_tuning.BATCH_GATED_TILE; Hopper and later), at any row count above 16: the
             engine takes it from 128 rows where they fill three quarters of the last tile
  gated_tmaN with --triton, the TMA form at the N-th of TMA_GATED_TILES
  gated_few  with --few-rows (without --triton: then only the engine's forms), at 16 rows or
             fewer, gated_matmul with the tile few_rows_gated_tile picks
and for the LM head, whose logits are float32:
  head       torch.mm(x, W.t(), out_dtype=float32) (the engine's call)
  head_nn    the same on the transposed weight
  head_bf16  F.linear(x, W).float(): bf16 logits, widened
Each form is checked against a float32 product (relative error) and timed as a CUDA graph of
calls that cycle through enough copies of the weight to defeat the L2 cache, as a forward
meets a new layer's weights at each call. The floor is max(bytes / copy bandwidth, FLOPs /
matmul rate), both measured in the same run. On a GPU only: this picks how the layers call
cuBLAS.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from zllm.architecture import ModelArchitecture
from zllm.bench.report import add_report_args, write_results
from zllm.bench.roofline import measure_hardware
from zllm.bench.throughput import model_dir_for

ROTATE_BYTES = 512 * 2**20  # weight copies cycled per timing: several times any L2
# Tiles for the TMA form of the gated kernel with --triton, (block_m, block_n, block_k, warps,
# stages), within an H100's shared memory (a gate and an up tile per stage) and registers.
TMA_GATED_TILES = [(64, 128, 64, 4, 4), (64, 128, 64, 4, 6), (64, 128, 128, 4, 3),
                   (64, 64, 128, 4, 4), (64, 64, 64, 4, 6), (128, 128, 64, 8, 4),
                   (128, 64, 64, 4, 4), (128, 64, 128, 8, 3), (128, 64, 128, 4, 4),
                   (256, 64, 64, 8, 3), (256, 64, 64, 8, 4), (256, 32, 128, 8, 3),
                   (128, 128, 64, 8, 3)]


def layer_shapes(arch: ModelArchitecture) -> list[tuple[str, int, int]]:
    """(name, in_features, out_features) of one layer's linears and the LM head."""
    h, d = arch.hidden_size, arch.head_dim
    q, kv = arch.num_heads * d, arch.num_kv_heads * d
    return [("qkv", h, q + 2 * kv), ("o", q, h), ("gate_up", h, 2 * arch.intermediate_size),
            ("down", arch.intermediate_size, h), ("lm_head", h, arch.vocab_size)]


def _split_k(x: torch.Tensor, wt: torch.Tensor, parts: int) -> torch.Tensor:
    m, k = x.shape
    xs = x.view(m, parts, k // parts).transpose(0, 1)  # [parts, m, k / parts]
    partial = torch.bmm(xs, wt.view(parts, k // parts, -1), out_dtype=torch.float32)
    return partial.sum(0).to(x.dtype)


Form = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # f(x, W, Wt)


def _lt(fn: Form) -> Form:
    """`fn` with cuBLASLt as torch's preferred BLAS library for the call."""
    def call(x, w, wt):
        before = torch.backends.cuda.preferred_blas_library()
        torch.backends.cuda.preferred_blas_library("cublaslt")
        try:
            return fn(x, w, wt)
        finally:
            torch.backends.cuda.preferred_blas_library(before)
    return call


def forms(name: str) -> dict[str, Form]:
    """The ways to compute the layer `name`, by form name."""
    if name == "lm_head":
        return {"head": lambda x, w, wt: torch.mm(x, w.t(), out_dtype=torch.float32),
                "head_nn": lambda x, w, wt: torch.mm(x, wt, out_dtype=torch.float32),
                "head_bf16": lambda x, w, wt: F.linear(x, w).float()}
    linear = lambda x, w, wt: F.linear(x, w)  # noqa: E731
    nn_form = lambda x, w, wt: torch.mm(x, wt)  # noqa: E731
    return {"linear": linear, "nn": nn_form, "lt": _lt(linear), "nn_lt": _lt(nn_form),
            "splitk2": lambda x, w, wt: _split_k(x, wt, 2),
            "splitk4": lambda x, w, wt: _split_k(x, wt, 4)}


def time_form(fn, x: torch.Tensor, weights: list[torch.Tensor], transposed: list[torch.Tensor],
              reps: int = 20) -> float:
    """Seconds per call: a graph of one call per weight copy, replayed `reps` times."""
    from zllm.worker.models.gemm_tuning import time_graph
    calls = [lambda w=w, wt=wt: fn(x, w, wt) for w, wt in zip(weights, transposed)]
    return time_graph(calls, reps) / len(weights)


def lt_forms(name: str, m: int, k: int, n: int, count: int) -> dict[str, tuple[Form, dict]]:
    """The heuristic's first `count` cuBLASLt algorithms for the column-major product, by form
    name, each with its configuration (tile, stages, split-K ...) for the report."""
    from zllm.worker.models.cublaslt import LtMatmul
    plan = LtMatmul(m, k, n, weight_column_major=True,
                    out_dtype=torch.float32 if name == "lm_head" else torch.bfloat16)
    out = torch.empty(m, n, dtype=plan.out_dtype, device="cuda")

    def form(algo):
        return lambda x, w, wt: plan.run(x, wt.t(), algo, out)
    return {f"algo{i}": (form(a), {**a.config, "waves": round(a.waves, 2),
                                   "workspace": a.workspace_bytes})
            for i, a in enumerate(plan.candidates(count))}


def triton_forms(name: str, m: int, k: int, n: int) -> dict[str, tuple[Form, dict]]:
    """zllm's Triton kernel on the column-major weight, one form per tile configuration that
    fits the product."""
    from zllm.worker.models import triton_matmul as tm
    out_dtype = torch.float32 if name == "lm_head" else torch.bfloat16
    out = torch.empty(m, n, dtype=out_dtype, device="cuda")
    configs = [c for c in tm.tile_configs(m) if c.fits(m, n, k)]
    if not configs:
        return {}
    workspace = tm.Workspace(out.device, max(c.split_k for c in configs) * m * n,
                             max(c.tiles(m, n) for c in configs))

    def form(config):
        return lambda x, w, wt: tm.matmul(x, wt.t(), config, workspace, out)
    return {f"tri{i}": (form(c), c.config) for i, c in enumerate(configs)}


def few_forms(name: str, m: int, k: int, n: int) -> dict[str, tuple[Form, dict]]:
    """The Triton kernel on the column-major weight with few_rows_tile's tile for this GPU, as
    the engine runs products of at most few_rows_matmul_max_rows rows; none above 16 rows or
    where the rule picks torch's call."""
    from zllm.worker.models import triton_matmul as tm
    from zllm.worker.models.gemm_tuning import few_rows_tile
    sm_count = torch.cuda.get_device_properties(0).multi_processor_count
    tile = few_rows_tile(n, k, sm_count) if m <= 16 else None
    if tile is None:
        return {}
    out = torch.empty(m, n, dtype=torch.float32 if name == "lm_head" else torch.bfloat16,
                      device="cuda")
    return {"few": (lambda x, w, wt: tm.matmul(x, wt.t(), tile, out=out), tile.config),
            "few_rm": (lambda x, w, wt: tm.matmul(x, w, tile, out=out), tile.config)}


def gated_forms(m: int, k: int, n: int, rules_only: bool = False) -> dict[str, tuple[Form, dict]]:
    """gate_up's product and SiLU: the engine's two calls, and zllm's fused kernel at each tile
    that fits (a gate and an up tile per program, in an H100's shared memory); with
    `rules_only`, only the tile the engine gives it (few_rows_gated_tile up to 16 rows, the TMA
    form's BATCH_GATED_TILE above, timed at rows the engine's rule may not take it)."""
    from flashinfer.activation import silu_and_mul

    from zllm.worker.models import triton_matmul as tm
    from zllm.worker.models.gemm_tuning import (BATCH_GATED_TILE, TMA_CAPABILITY,
                                                few_rows_gated_tile)
    out = {"linear_act": (lambda x, w, wt: silu_and_mul(F.linear(x, wt.t())), {})}
    if rules_only and m <= 16:
        sm_count = torch.cuda.get_device_properties(0).multi_processor_count
        tile = few_rows_gated_tile(n // 2, k, sm_count)
        if tile is not None:
            out["gated_few"] = (lambda x, w, wt: tm.gated_matmul(x, wt.t(), tile), tile.config)
        return out
    if torch.cuda.get_device_capability() >= TMA_CAPABILITY:
        out["gated_tma"] = (lambda x, w, wt: tm.gated_matmul_tma(x, wt.t(), BATCH_GATED_TILE),
                            BATCH_GATED_TILE.config)
    if rules_only:
        return out
    configs = [c for c in tm.tile_configs(m) if c.split_k == 1 and c.fits(m, n // 2, k)
               and c.num_stages * (c.block_m * c.block_k + 2 * c.block_k * c.block_n) * 2
               <= 200 * 1024]

    def form(config, tma=False):
        fn = tm.gated_matmul_tma if tma else tm.gated_matmul
        return lambda x, w, wt: fn(x, wt.t(), config)
    out.update({f"gated{i}": (form(c), c.config) for i, c in enumerate(configs)})
    if "gated_tma" in out:  # the TMA form's other tiles (the sweep BATCH_GATED_TILE came from)
        tiles = [tm.TileConfig(bm, bn, bk, 1, w, st) for bm, bn, bk, w, st in TMA_GATED_TILES]
        out.update({f"gated_tma{i}": (form(c, tma=True), c.config) for i, c in enumerate(tiles)})
    return out


def run(shapes: list[str], rows_list: list[int], lt_algos: int = 0,
        triton: bool = False, layers: Optional[list[str]] = None,
        few_rows: bool = False) -> dict[str, Any]:
    device = torch.device("cuda")
    hw = measure_hardware(device)
    results = []
    for shape in shapes:
        arch = ModelArchitecture.from_model_dir(model_dir_for(shape))
        for name, k, n in layer_shapes(arch):
            if layers and name not in layers:
                continue
            copies = max(2, -(-ROTATE_BYTES // (2 * k * n)))
            weights = [torch.randn(n, k, dtype=torch.bfloat16, device=device) * k ** -0.5
                       for _ in range(copies)]
            transposed = [w.t().contiguous() for w in weights]
            for m in rows_list:
                x = torch.randn(m, k, dtype=torch.bfloat16, device=device)
                ref = x.float() @ weights[0].float().t()
                if name == "gate_up" and (triton or few_rows):
                    gate, up = ref.to(x.dtype).float().chunk(2, dim=-1)
                    act_ref = F.silu(gate) * up
                out_bytes = m * n * (4 if name == "lm_head" else 2)
                floor = max((2 * k * n + 2 * m * k + out_bytes) / hw.copy_bytes_per_s,
                            2 * m * k * n / hw.matmul_flops_per_s)
                every = {f: (fn, {}) for f, fn in forms(name).items()}
                if lt_algos:
                    every.update(lt_forms(name, m, k, n, lt_algos))
                if triton:
                    every.update(triton_forms(name, m, k, n))
                if few_rows and name != "gate_up":  # gate_up's: the fused kernel's (below)
                    every.update(few_forms(name, m, k, n))
                if (triton or few_rows) and name == "gate_up":
                    every.update(gated_forms(m, k, n, rules_only=not triton))
                for form, (fn, config) in every.items():
                    if form.startswith("splitk") and k % int(form[-1]):
                        continue
                    try:
                        want = act_ref if form.startswith(("gated", "linear_act")) else ref
                        err = ((fn(x, weights[0], transposed[0]).float() - want).norm()
                               / want.norm()).item()
                        t = time_form(fn, x, weights, transposed)
                    except Exception as e:  # a form this torch lacks: say so, go on
                        print(json.dumps({"shape": shape, "linear": name, "rows": m,
                                          "form": form, "error": repr(e)[:300]}), flush=True)
                        continue
                    results.append({"shape": shape, "linear": name, "in": k, "out": n,
                                    "rows": m, "form": form, "us": round(1e6 * t, 2),
                                    "floor_us": round(1e6 * floor, 2),
                                    "of_floor": round(floor / t, 3), "rel_err": round(err, 5),
                                    **config})
                    if not form.startswith(("algo", "tri", "gated", "few")):
                        print(json.dumps(results[-1]), flush=True)
            del weights, transposed
            torch.cuda.empty_cache()
    return {"hardware": hw.as_dict(), "rows": results}


def best_forms(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per layer and row count: the engine's call, the column-major one, and the fastest form;
    gate_up's product with its activation ("gate_up+act") apart from the product alone."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        act = "+act" if r["form"].startswith(("gated", "linear_act")) else ""
        groups.setdefault((r["shape"], r["linear"] + act, r["rows"]), []).append(r)
    out = []
    for (shape, name, m), rs in groups.items():
        us = {r["form"]: r["us"] for r in rs}
        best = min(rs, key=lambda r: r["us"])
        out.append({"shape": shape, "layer": name, "rows": m, "floor_us": rs[0]["floor_us"],
                    **{f: us[f] for f in ("linear", "nn", "head", "head_nn", "algo0", "linear_act",
                                          "gated_tma", "gated_few", "few", "few_rm")
                       if f in us},
                    "best": best["form"], "best_us": best["us"],
                    **{c: best[c] for c in ("tile", "stages", "splitk", "swizzle", "warps") if c in best}})
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="llama-3.2-1b,llama-3.1-8b")
    parser.add_argument("--rows", default="1,256,8192", help="rows per call, comma-separated")
    parser.add_argument("--lt-algos", type=int, default=0,
                        help="also time the first N algorithms of cuBLASLt's heuristic")
    parser.add_argument("--triton", action="store_true",
                        help="also time zllm's Triton kernel at each of its tile configurations "
                             "(and for gate_up, fused with SiLU)")
    parser.add_argument("--few-rows", action="store_true",
                        help="also time the tiles the engine's rules pick: at 16 rows or fewer "
                             "few_rows_tile's and few_rows_gated_tile's, above that for gate_up "
                             "the TMA form's")
    parser.add_argument("--layers", default="", help="only these layers (e.g. gate_up,o)")
    add_report_args(parser, markdown="")
    args = parser.parse_args(argv)
    report = run(args.shapes.split(","), [int(r) for r in args.rows.split(",")], args.lt_algos,
                 args.triton, [name for name in args.layers.split(",") if name], args.few_rows)
    report["best"] = best_forms(report["rows"])
    for b in report["best"]:
        print("best", json.dumps(b), flush=True)
    write_results("Linear layers' matmuls alone (python -m zllm.bench.linear_shapes)",
                  {"shapes": args.shapes, "rows": args.rows, "lt_algos": args.lt_algos,
                   "triton": args.triton, "few_rows": args.few_rows},
                  report.pop("rows"), args.out,
                  args.markdown, extra=report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
