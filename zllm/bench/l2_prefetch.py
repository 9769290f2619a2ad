"""Weights read into L2 ahead of their matmul while a batch-1 decode layer's small kernels run.

    python -m zllm.bench.l2_prefetch [--shape llama-3.1-8b] [--mb 8,16,4/16/4/4]

At one row a decoder layer streams its four weights (qkv, o, gate_up, down) through four matmuls,
and between them runs small kernels (norm, RoPE + K/V store, attention, SiLU) that move few bytes:
the memory bus idles for those microseconds. This measures what zllm's weight prefetch
(zllm/worker/models/weight_prefetch.py) recovers of that time, apart from the engine.

Each layer here is the four matmuls as the engine calls them (F.linear on the [out, in] weight,
column-major in memory as `column_major_linears` lays it out, or row-major with --layout row),
each after a window: a spin kernel of the window's length (--windows, µs, before qkv, o,
gate_up, down) standing in for the small kernels. LAYERS layers with their own weights (more
bytes than any L2) run as one CUDA graph. Timed: the matmuls alone (no windows: the floor a
perfect overlap would reach), the windows without prefetch, and with each of --mb: MB read
ahead in each window (one number for all four, or four separated by "/"), on a side stream
started at the window's start, as the engine does. On a GPU only.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Optional

import torch
import torch.nn.functional as F

from zllm.architecture import ModelArchitecture
from zllm.bench.linear_shapes import layer_shapes
from zllm.bench.report import add_report_args, write_results
from zllm.bench.throughput import model_dir_for
from zllm.worker.models.gemm_tuning import time_graph
from zllm.worker.models.weight_prefetch import WeightPrefetch, weight_words


def spin_cycles_per_us() -> float:
    """The spin kernel's clock: cycles per microsecond, from a timed graph of spins."""
    calls = [lambda: torch.cuda._sleep(10_000)] * 50
    return 10_000 * 50 / (time_graph(calls, 5) * 1e6)


def parse_sizes(spec: str) -> list[int]:
    """"8" -> [8, 8, 8, 8]; "4/16/4/4" -> [4, 16, 4, 4] (MB before qkv, o, gate_up, down)."""
    sizes = [int(s) for s in spec.split("/")]
    return sizes * 4 if len(sizes) == 1 else sizes


def run(shape: str, layers: int, windows_us: list[float], size_specs: list[str],
        column_major: bool) -> dict[str, Any]:
    device = torch.device("cuda")
    arch = ModelArchitecture.from_model_dir(model_dir_for(shape))
    shapes = [(k, n) for name, k, n in layer_shapes(arch) if name != "lm_head"]

    def weight(k: int, n: int) -> torch.Tensor:
        w = torch.randn(k, n, dtype=torch.bfloat16, device=device) * k ** -0.5
        return w.t() if column_major else w.t().contiguous()

    weights = [[weight(k, n) for k, n in shapes] for _ in range(layers)]
    words = [[weight_words(w) for w in ws] for ws in weights]
    x = {k: torch.randn(1, k, dtype=torch.bfloat16, device=device) for k, _ in shapes}
    prefetch = WeightPrefetch(device, 1, max(max(parse_sizes(s)) for s in size_specs) << 20)
    cycles = spin_cycles_per_us()

    def forward(sizes_mb: list[int], windows: bool):
        def call():
            with prefetch.capturing(1):  # joins only if some window read
                for ws, wds in zip(weights, words):
                    for (k, _), w, wd, window, mb in zip(shapes, ws, wds, windows_us, sizes_mb):
                        if mb and prefetch.active:
                            prefetch.read(wd, mb << 20)
                        if windows and window:
                            torch.cuda._sleep(int(window * cycles))
                        F.linear(x[k], w)
        return [call]

    results = []

    def timed(label: str, sizes_mb: list[int], windows: bool = True) -> None:
        t = time_graph(forward(sizes_mb, windows), reps=20) / layers
        results.append({"mode": label, "mb": "/".join(map(str, sizes_mb)),
                        "us_per_layer": round(1e6 * t, 2)})
        print(json.dumps(results[-1]), flush=True)

    timed("matmuls alone", [0] * 4, windows=False)
    timed("windows, no prefetch", [0] * 4)
    for spec in size_specs:
        timed("prefetch", parse_sizes(spec))
    return {"cycles_per_us": round(cycles, 1), "windows_us": windows_us, "layers": layers,
            "column_major": column_major, "rows": results}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-3.1-8b")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--windows", default="4,12,4,3",
                        help="µs of small kernels before qkv, o, gate_up and down")
    parser.add_argument("--mb", default="4,8,16,4/16/4/4,8/16/8/4,8/24/8/8",
                        help="MB read ahead per window: comma-separated runs")
    parser.add_argument("--layout", choices=("col", "row"), default="col")
    add_report_args(parser, markdown="")
    args = parser.parse_args(argv)
    report = run(args.shape, args.layers, [float(w) for w in args.windows.split(",")],
                 args.mb.split(","), args.layout == "col")
    write_results("Weights read into L2 at batch 1 (python -m zllm.bench.l2_prefetch)",
                  vars(args), report.pop("rows"), args.out, args.markdown, extra=report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
