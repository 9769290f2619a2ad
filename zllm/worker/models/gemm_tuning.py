"""Tuned matmuls for the linear layers: cuBLASLt algorithms and Triton tiles timed at start-up.

With the `gemm_tuning_algos` config key, the model runner calls `tune_model` before it captures
the decode CUDA graphs. For each product (in and out features, weight layout, output dtype) at
each of the graphs' batch sizes, it times torch's own call, the heuristic's algorithms
(zllm/worker/models/cublaslt.py) and, from 64 rows, a few tiles of zllm's Triton matmul
(zllm/worker/models/triton_matmul.py: TRITON_TILES) over the model's own weights, checks each
one's result against torch's, and gives the linear layers (`TunedProduct`) the one at least 3%
faster where there is one. A layer then uses it for any input with exactly that many rows: the
decode graphs' steps, and an eager step (or the LM head of one) that happens to have that many.

Not for steps of many prompt tokens: on an H100 (2026-12-05) algorithms chosen this way at
8192 rows made the 8B shape's prompt step's GEMMs slower in the engine (166.3 against 162.7
ms), though faster in the tuner's own timing. The choice can differ between two start-ups
(a timing within a few percent), and so can a near-tie's greedy token.

The Triton tiles are those that beat cuBLAS in `python -m zllm.bench.linear_shapes --triton` on
an H100 (2026-12-06): at W1's 256 rows the 8B shape's o and down products took 17.5 and 53.5 µs
with 64 x 128 x 128 tiles against cuBLAS's 19.5 and 59.1 (split-K did not pay, so none is
offered and no workspace is needed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch

from zllm.worker.models.cublaslt import ALIGNMENT, LtAlgo, LtMatmul
from zllm.worker.models.triton_matmul import TileConfig, matmul

if TYPE_CHECKING:
    from zllm.worker.models.weight_prefetch import NextWeight

# (block_m, block_n, block_k, split_k, warps, stages): the fastest tiles for some decode product
# in linear_shapes' sweep; tried from TRITON_MIN_ROWS rows, where a 64-row tile is not mostly
# padding.
TRITON_TILES = [TileConfig(64, 128, 128, 1, 4, 4), TileConfig(64, 128, 64, 1, 4, 4),
                TileConfig(128, 256, 64, 1, 8, 3)]
TRITON_MIN_ROWS = 64

TUNE_BYTES = 256 * 2**20  # weights a timing cycles through: several times any L2, as a forward
REL_TOL = 1e-2  # an algorithm's result against torch's, both 16-bit


@dataclass
class LtChoice:
    """The algorithm chosen for one product at one row count."""
    plan: LtMatmul
    algo: LtAlgo

    def run(self, x: torch.Tensor, weight: torch.Tensor) -> Optional[torch.Tensor]:
        """x @ weight.T, or None where x is not as the algorithm may assume."""
        if x.dtype != weight.dtype or x.data_ptr() % ALIGNMENT:
            return None
        return self.plan.run(x, weight, self.algo)

    @property
    def config(self) -> dict:
        return {"kernel": "cublaslt", **self.algo.config}


@dataclass
class TritonChoice:
    """The Triton tile chosen for one product at one row count."""
    tile: TileConfig
    out_dtype: torch.dtype

    def run(self, x: torch.Tensor, weight: torch.Tensor) -> Optional[torch.Tensor]:
        """x @ weight.T, or None where x is not as the tile was timed on."""
        if x.dtype != weight.dtype or not self.tile.fits(x.shape[0], weight.shape[0], x.shape[1]):
            return None
        return matmul(x, weight, self.tile, out_dtype=self.out_dtype)

    @property
    def config(self) -> dict:
        return {"kernel": "triton", **self.tile.config}


class TunedProduct:
    """A linear layer whose matmul may run through a cuBLASLt algorithm or a Triton tile that
    timed faster than torch's own call on this GPU, at the row counts `tune_model` tuned it
    for. Elsewhere, and until tuned, torch's call."""

    tuned_rows: Optional[dict[int, "LtChoice | TritonChoice"]] = None  # row count -> choice
    tuned_out_dtype: Optional[torch.dtype] = None  # None: the weight's
    # Read ahead into L2 after this layer's product (zllm/worker/models/weight_prefetch.py).
    next_weight: Optional["NextWeight"] = None

    def tuned_product(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """x @ weight.T through the choice tuned for x's row count, or None (call torch)."""
        if self.tuned_rows is None:
            return None
        choice = self.tuned_rows.get(x.shape[0])
        if choice is None or not x.is_contiguous():
            return None
        return choice.run(x, self.weight)


def time_graph(calls: list[Callable[[], object]], reps: int = 3) -> float:
    """Median seconds of one replay of a CUDA graph of `calls` (after a warm-up replay)."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del graph
    return sorted(times)[len(times) // 2]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def tune_model(model: torch.nn.Module, sizes: list[int], count: int,
               min_gain: float = 0.03) -> list[dict]:
    """Give each bias-free TunedProduct of `model`, at each row count in `sizes` (the decode
    graphs' batch sizes, before they are captured), the fastest of the cuBLASLt algorithms among
    the heuristic's first `count` and (from TRITON_MIN_ROWS rows) the TRITON_TILES, if it beats
    torch's own call by at least `min_gain`, among those whose result matches torch's. Layers
    with the same product (in and out features, weight layout, output dtype) are timed
    together, over their own weights. Returns one report row per product and row count."""
    # A layer with a bias would add it in a kernel of its own; torch's call fuses it.
    groups: dict[tuple, list[TunedProduct]] = {}
    for layer in model.modules():
        if isinstance(layer, TunedProduct) and getattr(layer, "bias", None) is None:
            w = layer.weight
            key = (w.shape[1], w.shape[0], w.stride(0) == 1, layer.tuned_out_dtype)
            groups.setdefault(key, []).append(layer)
    report = []
    for (k, n, column_major, out_dtype), members in groups.items():
        w0 = members[0].weight
        per_copy = w0.numel() * w0.itemsize
        weights = [layer.weight for layer in members[:max(1, -(-TUNE_BYTES // per_copy))]]
        out_dtype = out_dtype or w0.dtype
        for m in sizes:
            x = torch.randn(m, k, dtype=w0.dtype, device=w0.device)
            if out_dtype == w0.dtype:
                own = [lambda w=w: torch.nn.functional.linear(x, w) for w in weights]
            else:
                own = [lambda w=w: torch.mm(x, w.t(), out_dtype=out_dtype) for w in weights]
            expected = own[0]()
            torch_s = time_graph(own)
            plan = LtMatmul(m, k, n, column_major, w0.dtype, out_dtype, w0.device)
            candidates: list[LtChoice | TritonChoice] = [
                LtChoice(plan, algo) for algo in plan.candidates(count)]
            if m >= TRITON_MIN_ROWS:
                candidates += [TritonChoice(tile, out_dtype) for tile in TRITON_TILES
                               if tile.fits(m, n, k)]
            best, best_s = None, torch_s
            for choice in candidates:
                try:
                    result = choice.run(x, weights[0])
                    if result is None or _rel_err(result, expected) > REL_TOL:
                        continue
                    s = time_graph([lambda w=w, c=choice: c.run(x, w) for w in weights])
                except RuntimeError:  # an algorithm that refuses this product: skip it
                    continue
                if s < best_s:
                    best, best_s = choice, s
            chosen = best is not None and best_s < torch_s * (1 - min_gain)
            if chosen:
                for layer in members:
                    layer.tuned_rows = {**(layer.tuned_rows or {}), m: best}
            report.append({"in": k, "out": n, "rows": m, "torch_us": 1e6 * torch_s / len(weights),
                           "best_us": 1e6 * best_s / len(weights), "chosen": chosen,
                           **(best.config if chosen else {})})
    return report
