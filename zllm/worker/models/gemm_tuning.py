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

A gated MLP's gate_up projection with SiLU may also get `gated_matmul` (GATED_TILES), which
computes the activation in the product's epilogue: no [rows, 2 x intermediate] product in memory
and no activation kernel. On an H100 (2026-12-06, linear_shapes --triton --layers gate_up) the
8B shape's gate_up and SiLU took 85.1 µs at 128 rows against 94.0 for cuBLAS's product and
flashinfer's activation, and 113.5 against 109.9 at 256 rows (where the tuner keeps the two).

At a few rows the same kernel runs without the tuner (`gated_mlp_max_rows`, on by default): the
model runner gives every such projection the tile `few_rows_gated_tile` picks from its shape and
the GPU's SM count, for inputs of at most that many rows for which the tuner chose no fused
kernel. On an H100 (2026-12-06) at 1 and 4 rows the rule's tiles took 78.8 and 79.4 µs on the
8B shape (16 x 128 x 64; floor 79.1) against 83.3 and 83.5 for cuBLAS's product and
flashinfer's activation, and 24.5 and 24.7 on the 1B shape (16 x 64 x 128; floor 22.6) against
26.1 and 26.3.

On Hopper and later, from 128 rows up to `gated_mlp_tma_max_rows` (on by default), where the
rows fill at least three quarters of the last 128-row tile, the same fused kernel runs in its
TMA form (`gated_matmul_tma`, BATCH_GATED_TILE): at W1's 256 decode rows on an H100
(2026-12-06) 100.8-102.6 µs on the 8B shape against 109.7-110.3 for cuBLAS's product and the
activation, and W1's decode steps took 1.3% less time (1.0% on the 1B shape).

The other products of at most `few_rows_matmul_max_rows` rows (on by default) run the plain
Triton matmul with the tile `few_rows_tile` picks from their shape and the SM count, where it
picks one and the tuner chose nothing for that row count: at such rows a tile narrow enough to
give every SM a program streams the weight faster than cuBLAS. On two H100s (2026-12-06,
`zllm bench throughput`, base/new/new/base) the 8B shape's batch-1 token took 5.79 ms against
5.94, and 5.71 against 5.87 (that run also gave the LM head a tile, since left out); the 1B
shape's (only its qkv qualifies) 1.29-1.30 against 1.30.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch

from zllm.worker.models.cublaslt import ALIGNMENT, LtAlgo, LtMatmul
from zllm.worker.models.triton_matmul import TileConfig, gated_matmul, gated_matmul_tma, matmul

if TYPE_CHECKING:
    from zllm.worker.models.weight_prefetch import NextWeight

# (block_m, block_n, block_k, split_k, warps, stages): the fastest tiles for some decode product
# in linear_shapes' sweep; tried from TRITON_MIN_ROWS rows, where a 64-row tile is not mostly
# padding.
TRITON_TILES = [TileConfig(64, 128, 128, 1, 4, 4), TileConfig(64, 128, 64, 1, 4, 4),
                TileConfig(128, 256, 64, 1, 8, 3)]
TRITON_MIN_ROWS = 64
# Tiles for a gated MLP's gate_up product with its SiLU in the same kernel (gated_matmul): each
# program holds a gate and an up tile, so within an H100's shared memory at these stages.
GATED_TILES = [TileConfig(64, 64, 128, 1, 4, 4), TileConfig(64, 128, 64, 1, 4, 4),
               TileConfig(64, 64, 64, 1, 4, 4), TileConfig(128, 128, 64, 1, 8, 3)]
# The few-rows gated tile (few_rows_gated_tile): block_n x block_k weight elements of gate and
# of up per stage, so 96 KiB of 16-bit weight tiles in flight per program at 3 stages, whichever
# block_n.
FEW_ROWS_GATED_ELEMENTS = 8192
# gate_up and SiLU at the decode batch, from BATCH_GATED_MIN_ROWS rows up to
# gated_mlp_tma_max_rows where the last row tile is at least three quarters full (at most a
# quarter of its rows padding): gated_matmul_tma's tile, the fastest of 16 timed on
# both shapes at 128 and 256 rows (H100, 2026-12-06). Against cuBLAS's product plus the
# activation (linear_shapes --few-rows) it took 0.96x at 128 rows on the 8B shape, 0.96x,
# 0.92x and 0.91-0.93x at 224, 248 and 256; but 1.01-1.12x below 128 rows and 1.42x, 1.30x
# and 1.05x at 136, 160 and 192, where padding rows fill much of the last tile (the 1B shape
# likewise: 0.86-0.98x in the rule's rows, 1.04-1.11x below 128 and 1.06x at 136). Its
# operands come through TMA descriptors: Hopper (compute capability 9) and later.
BATCH_GATED_TILE = TileConfig(128, 128, 64, 1, 8, 4)
BATCH_GATED_MIN_ROWS = 128
TMA_CAPABILITY = (9, 0)
# Plain products at a few rows (few_rows_tile): for each block_n, widest first, the tile that
# streamed the weight fastest at that width in linear_shapes' sweep at one row (H100,
# 2026-12-06). Split 1: split-K's last-program reduction costs more than it gains there.
FEW_ROWS_TILES = [TileConfig(16, 128, 128, 1, 4, 4), TileConfig(16, 64, 256, 1, 4, 4),
                  TileConfig(16, 32, 256, 1, 4, 4)]
FEW_ROWS_WAVE = 0.7  # the fewest programs, as a share of the SMs, worth leaving cuBLAS for

TUNE_BYTES = 256 * 2**20  # weights a timing cycles through: several times any L2, as a forward
REL_TOL = 1e-2  # an algorithm's result against torch's, both 16-bit, as a whole
ELEMENT_TOL = 5e-2  # and each element, relative to itself plus the RMS of torch's result


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
    """The Triton tile chosen for one product at one row count (or, few_rows_tile's, up to a
    row count)."""
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


@dataclass
class GatedChoice:
    """The Triton tile chosen for a gated MLP's gate_up product fused with its SiLU, in
    gated_matmul's pointer form or (tma) gated_matmul_tma's descriptor form."""
    tile: TileConfig
    tma: bool = False

    def run(self, x: torch.Tensor, weight: torch.Tensor) -> Optional[torch.Tensor]:
        """silu(x @ gate.T) * (x @ up.T), or None where x is not as the tile was timed on."""
        if x.dtype != weight.dtype:
            return None
        if self.tma:  # any shape; None where x is not as a descriptor takes it
            return gated_matmul_tma(x, weight, self.tile)
        if not self.tile.fits(x.shape[0], weight.shape[0] // 2, x.shape[1]):
            return None
        return gated_matmul(x, weight, self.tile)

    @property
    def config(self) -> dict:
        return {"kernel": "triton_gated_tma" if self.tma else "triton_gated", **self.tile.config}


def few_rows_gated_tile(intermediate: int, k: int, sm_count: int) -> Optional[TileConfig]:
    """The gated_matmul tile for a gate_up product ([2 x intermediate, k]) of at most 16 rows on
    a GPU of `sm_count` SMs, or None where k is no multiple of its block_k. At such rows the
    kernel only streams the weight, so what counts is enough programs (one per block_n columns)
    to keep the SMs reading: 128 columns each where that still gives 80% of the SMs one, else
    64 with twice the depth. On an H100 (132 SMs, 2026-12-06, linear_shapes --triton) that is the
    fastest tile measured on both shapes: the 8B's 14336 columns make 112 programs of 128
    (16 x 128 x 64: 78.8 µs at 1 row; 16 x 64 x 64: 79.9), the 1B's 8192 only 64, which left
    SMs idle (16 x 128 x 64: 27.5 µs; 16 x 64 x 128: 24.5)."""
    block_n = 128 if -(-intermediate // 128) >= 0.8 * sm_count else 64
    tile = TileConfig(16, block_n, FEW_ROWS_GATED_ELEMENTS // block_n, 1, 8, 3)
    return tile if tile.fits(16, intermediate, k) else None


def few_rows_tile(n: int, k: int, sm_count: int) -> Optional[TileConfig]:
    """The Triton matmul tile for a product of at most 16 rows with a column-major [n, k]
    weight on a GPU of `sm_count` SMs, or None (torch's call). At such rows the kernel only
    streams the weight, and what counts is that its programs (one per block_n columns) fill
    the SMs in one wave: the tile of FEW_ROWS_TILES (no wider than n) that gives the most
    programs no more than the SMs, if at least FEW_ROWS_WAVE of them.

    On an H100 (132 SMs, 2026-12-06, linear_shapes --few-rows, µs at 1, 4 and 16 rows; torch's
    call on the same column-major weight in brackets) that gives the 8B shape's qkv 16 x 64 x
    256 with 96 programs: 19.3, 19.6, 20.1 (21.0, 21.4, 21.0); its o 16 x 32 x 256 with 128:
    13.5, 13.7, 13.7 (14.2, 14.4, 15.5) and down the same: 41.1, 41.2, 42.1 (42.0, 42.3, 43.4);
    the 1B shape's qkv 16 x 32 x 256 with 96: 7.1, 7.1, 7.0 (7.4, 7.2, 7.3). The 1B's o and
    down (64 programs of 32 columns) and the LM heads (many waves) keep torch's call: split-K
    to fill the SMs and the LM head's tiles won some runs and lost others, by under 2%."""
    best, best_programs = None, 0
    for tile in FEW_ROWS_TILES:
        programs = tile.tiles(16, n)
        if tile.fits(16, n, k) and tile.block_n <= n and best_programs < programs <= sm_count:
            best, best_programs = tile, programs
    return best if best_programs >= FEW_ROWS_WAVE * sm_count else None


class TunedProduct:
    """A linear layer whose matmul may run through a cuBLASLt algorithm or a Triton tile that
    timed faster than torch's own call on this GPU, at the row counts `tune_model` tuned it
    for. Elsewhere, and until tuned, torch's call."""

    tuned_rows: Optional[dict[int, "LtChoice | TritonChoice"]] = None  # row count -> choice
    tuned_out_dtype: Optional[torch.dtype] = None  # None: the weight's
    # Read ahead into L2 after this layer's product (zllm/worker/models/weight_prefetch.py).
    next_weight: Optional["NextWeight"] = None
    # A gated MLP's gate_up projection followed by SiLU: that activation (GatedMLP sets it), and
    # the row counts at which the tuner found the product and SiLU in one kernel faster.
    gated_act: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    tuned_gated_rows: Optional[dict[int, GatedChoice]] = None
    # And for inputs of 1 to gated_max_rows rows at whose count the tuner chose no fused kernel:
    # the fused kernel with few_rows_gated_tile's tile (the model runner sets both, from
    # gated_mlp_max_rows, through give_few_rows_gated).
    few_rows_gated: Optional[GatedChoice] = None
    gated_max_rows: int = 0
    # For inputs of batch_gated_min_rows to batch_gated_max_rows rows that leave at most
    # batch_gated_max_padding rows of the last row tile empty, where the tuner chose no fused
    # kernel: gated_matmul_tma with BATCH_GATED_TILE (give_batch_gated, from
    # BATCH_GATED_MIN_ROWS and gated_mlp_tma_max_rows).
    batch_gated: Optional[GatedChoice] = None
    batch_gated_min_rows: int = 0
    batch_gated_max_rows: int = 0
    batch_gated_max_padding: int = 0
    # Any other product of 1 to few_max_rows rows at whose count the tuner chose nothing: the
    # Triton matmul with few_rows_tile's tile (give_few_rows, from few_rows_matmul_max_rows).
    few_rows: Optional[TritonChoice] = None
    few_max_rows: int = 0

    def read_next_weight(self) -> None:
        """After this layer's product: start reading the next layer's weight into L2."""
        if self.next_weight is not None:
            self.next_weight.read()

    def tuned_product(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """x @ weight.T through the choice tuned for x's row count, else through the few-rows
        tile where x has at most few_max_rows rows; else None (call torch)."""
        m = x.shape[0]
        choice = None if self.tuned_rows is None else self.tuned_rows.get(m)
        if choice is None and 0 < m <= self.few_max_rows:
            choice = self.few_rows
        if choice is None or not x.is_contiguous():
            return None
        return choice.run(x, self.weight)

    def tuned_gated_product(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """gated_act(x @ weight.T) in one kernel where the tuner chose one for x's row count,
        else where x has at most gated_max_rows rows (the rule's tile: at such rows it beat
        every product plus the activation that was timed), else where it has batch_gated_min_rows
        to batch_gated_max_rows rows and fills the descriptor form's last row tile but for
        batch_gated_max_padding rows, unless the tuner chose a product for that count (the
        form was timed against torch's product, not a tuned one); else None (the caller runs
        the product, then the activation)."""
        if getattr(self, "bias", None) is not None or not x.is_contiguous():
            return None
        m = x.shape[0]
        choice = None if self.tuned_gated_rows is None else self.tuned_gated_rows.get(m)
        if choice is None and 0 < m <= self.gated_max_rows:
            choice = self.few_rows_gated
        if (choice is None and self.batch_gated is not None
                and max(1, self.batch_gated_min_rows) <= m <= self.batch_gated_max_rows
                and -m % self.batch_gated.tile.block_m <= self.batch_gated_max_padding
                and (self.tuned_rows is None or m not in self.tuned_rows)):
            choice = self.batch_gated
        if choice is None:
            return None
        out = choice.run(x, self.weight)
        if out is not None:
            self.read_next_weight()
        return out


def _gated_projections(model: torch.nn.Module) -> list[TunedProduct]:
    """The bias-free gated MLP gate_up projections of `model` (`gated_act` set)."""
    return [layer for layer in model.modules() if isinstance(layer, TunedProduct)
            and layer.gated_act is not None and getattr(layer, "bias", None) is None]


def give_few_rows_gated(model: torch.nn.Module, max_rows: int,
                        sm_count: int) -> dict[tuple[int, int], Optional[TileConfig]]:
    """Give each bias-free gated MLP gate_up projection of `model` (`gated_act` set) the fused
    kernel with few_rows_gated_tile's tile for inputs of at most `max_rows` rows, where the
    tile fits its shape. Returns the tile (or None) per (intermediate, in features) met."""
    tiles: dict[tuple[int, int], Optional[TileConfig]] = {}
    for layer in _gated_projections(model):
        shape = (layer.weight.shape[0] // 2, layer.weight.shape[1])
        if shape not in tiles:
            tiles[shape] = few_rows_gated_tile(*shape, sm_count)
        if tiles[shape] is not None:
            layer.few_rows_gated, layer.gated_max_rows = GatedChoice(tiles[shape]), max_rows
    return tiles


def give_batch_gated(model: torch.nn.Module, max_rows: int, min_rows: int = BATCH_GATED_MIN_ROWS,
                     tile: TileConfig = BATCH_GATED_TILE,
                     max_padding: Optional[int] = None) -> int:
    """Give each bias-free gated MLP gate_up projection of `model` the fused kernel in its
    descriptor form (gated_matmul_tma) with `tile`, for inputs of `min_rows` to `max_rows` rows
    that leave at most `max_padding` rows of their last row tile empty (default: a quarter of
    the tile's). Returns how many projections got it."""
    if max_padding is None:
        max_padding = tile.block_m // 4
    layers = _gated_projections(model)
    for layer in layers:
        layer.batch_gated = GatedChoice(tile, tma=True)
        layer.batch_gated_min_rows, layer.batch_gated_max_rows = min_rows, max_rows
        layer.batch_gated_max_padding = max_padding
    return len(layers)


def give_few_rows(model: torch.nn.Module, max_rows: int,
                  sm_count: int) -> dict[tuple[int, int], Optional[TileConfig]]:
    """Give each bias-free TunedProduct of `model` whose weight is column-major and 16-bit,
    other than gated MLPs' gate_up projections (gated_matmul's at few rows), the Triton matmul
    with few_rows_tile's tile for inputs of at most `max_rows` (at most 16) rows, where the rule
    gives one. Returns the tile (or None) per (out, in features) met."""
    if not 0 < max_rows <= 16:
        raise ValueError(f"few-rows products take 1 to 16 rows, not {max_rows}")
    tiles: dict[tuple[int, int], Optional[TileConfig]] = {}
    for layer in model.modules():
        w = getattr(layer, "weight", None)
        if (not isinstance(layer, TunedProduct) or getattr(layer, "bias", None) is not None
                or layer.gated_act is not None or w.stride(0) != 1
                or w.dtype not in (torch.float16, torch.bfloat16)):
            continue
        shape = (w.shape[0], w.shape[1])
        if shape not in tiles:
            tiles[shape] = few_rows_tile(*shape, sm_count)
        if tiles[shape] is not None:
            layer.few_rows = TritonChoice(tiles[shape], layer.tuned_out_dtype or w.dtype)
            layer.few_max_rows = max_rows
    return tiles


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


def matches_torch(result: torch.Tensor, expected: torch.Tensor) -> bool:
    """Whether `result` is torch's `expected` up to 16-bit rounding, as a whole and in each
    element (a wrong edge tile moves the whole's error by less than REL_TOL)."""
    a, b = result.float(), expected.float()
    scale = b.norm() / b.numel() ** 0.5
    return bool((a - b).norm() <= REL_TOL * b.norm().clamp_min(1e-30)
                and ((a - b).abs() <= ELEMENT_TOL * (b.abs() + scale)).all())


def _fastest(candidates: list, x: torch.Tensor, weights: list[torch.Tensor],
             expected: torch.Tensor, baseline_s: float) -> tuple[Optional[object], float]:
    """The candidate (a choice with `run(x, weight)`) whose result matches torch's `expected`
    and whose graph over `weights` is fastest, if faster than `baseline_s`, and its time."""
    best, best_s = None, baseline_s
    for choice in candidates:
        try:
            result = choice.run(x, weights[0])
            if result is None or not matches_torch(result, expected):
                continue
            s = time_graph([lambda w=w, c=choice: c.run(x, w) for w in weights])
        except Exception:  # refused here (cuBLASLt; Triton: out of shared memory): skip
            continue
        if s < best_s:
            best, best_s = choice, s
    return best, best_s


def tune_model(model: torch.nn.Module, sizes: list[int], count: int,
               min_gain: float = 0.03) -> list[dict]:
    """Give each bias-free TunedProduct of `model`, at each row count in `sizes` (the decode
    graphs' batch sizes, before they are captured), the fastest of the cuBLASLt algorithms among
    the heuristic's first `count` and (from TRITON_MIN_ROWS rows) the TRITON_TILES, if it beats
    torch's own call by at least `min_gain`, among those whose result matches torch's. Layers
    with the same product (in and out features, weight layout, output dtype) are timed
    together, over their own weights. A gated MLP's gate_up projection (`gated_act` set) also
    gets, from TRITON_MIN_ROWS rows, the GATED_TILES that compute it and its SiLU in one kernel,
    if one beats the product so chosen followed by the activation. Returns one report row per
    product and row count (and per fused product and row count)."""
    # A layer with a bias would add it in a kernel of its own; torch's call fuses it.
    groups: dict[tuple, list[TunedProduct]] = {}
    for layer in model.modules():
        if isinstance(layer, TunedProduct) and getattr(layer, "bias", None) is None:
            w = layer.weight
            key = (w.shape[1], w.shape[0], w.stride(0) == 1, layer.tuned_out_dtype,
                   layer.gated_act is not None)
            groups.setdefault(key, []).append(layer)
    report = []
    for (k, n, column_major, out_dtype, gated), members in groups.items():
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
            best, best_s = _fastest(candidates, x, weights, expected, torch_s)
            chosen = best is not None and best_s < torch_s * (1 - min_gain)
            if chosen:
                for layer in members:
                    layer.tuned_rows = {**(layer.tuned_rows or {}), m: best}
            report.append({"in": k, "out": n, "rows": m, "torch_us": 1e6 * torch_s / len(weights),
                           "best_us": 1e6 * best_s / len(weights), "chosen": chosen,
                           **(best.config if chosen else {})})
            if gated and m >= TRITON_MIN_ROWS:
                report.append(_tune_gated(members, weights, x, best if chosen else None, min_gain))
    return report


def _tune_gated(members: list[TunedProduct], weights: list[torch.Tensor], x: torch.Tensor,
                product: Optional["LtChoice | TritonChoice"], min_gain: float) -> dict:
    """Give `members` (gate_up projections) the fastest GATED_TILES kernel at x's row count if
    it beats their product (`product`, or torch's call) and activation by `min_gain`."""
    act = members[0].gated_act

    def unfused(w: torch.Tensor) -> torch.Tensor:
        out = product.run(x, w) if product is not None else None
        return act(torch.nn.functional.linear(x, w) if out is None else out)

    expected = act(torch.nn.functional.linear(x, weights[0]))  # torch's, as for the products
    unfused_s = time_graph([lambda w=w: unfused(w) for w in weights])
    best, best_s = _fastest([GatedChoice(tile) for tile in GATED_TILES], x, weights, expected,
                            unfused_s)
    chosen = best is not None and best_s < unfused_s * (1 - min_gain)
    m = x.shape[0]
    if chosen:
        for layer in members:
            layer.tuned_gated_rows = {**(layer.tuned_gated_rows or {}), m: best}
    w0 = weights[0]
    return {"in": w0.shape[1], "out": w0.shape[0] // 2, "rows": m, "fused": "gate_up+act",
            "torch_us": 1e6 * unfused_s / len(weights), "best_us": 1e6 * best_s / len(weights),
            "chosen": chosen, **(best.config if chosen else {})}
