"""cuBLASLt matmuls with a chosen algorithm, through ctypes, and the tuner that chooses them.

torch picks one cuBLAS algorithm per call from cuBLAS's heuristic, and its TunableOp offers no
alternatives on CUDA. The heuristic's first pick is not always its fastest: on an H100
(2026-12-05, `python -m zllm.bench.linear_shapes --lt-algos 24`) another of its algorithms
ran the Llama-3.1-8B shape's qkv projection 10% faster at 8192 rows and 9% faster at one row,
though at W1's 256-row decode none beat torch's call by more than 1%.

`LtMatmul` holds the descriptors of one product shape: `candidates` lists the heuristic's
algorithms for it, `run` calls one. `tune_model` times them against torch's call over the
model's own weights and hands the winners to the linear layers (`TunedProduct`) for the
decode CUDA graphs' batch sizes (the `gemm_tuning_algos` config key). Not for steps with
prompt tokens: choices timed this way at 8192 rows made the 8B's prompt step's GEMMs slower
in the engine (166.3 against 162.7 ms, H100), though faster in the tuner's own timing.

The product is y[m, n] = x[m, k] W^T for a weight W [n, k] stored row-major (as checkpoints
store it) or column-major (`column_major_linears`), bf16 or fp16 in, the same or float32 out,
float32 accumulation. CUDA only; the library is the one torch loaded.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Optional

import torch

_OP_N, _OP_T = 0, 1
_COMPUTE_32F = 68  # cublasComputeType_t
_DTYPES = {torch.float32: 0, torch.float16: 2, torch.bfloat16: 14}  # cudaDataType
_DESC_TRANSA, _DESC_TRANSB = 3, 4  # cublasLtMatmulDescAttributes_t
_PREF_MAX_WORKSPACE_BYTES = 1  # cublasLtMatmulPreferenceAttributes_t
_CONFIG_ATTRS = {"id": 0, "tile": 1, "splitk": 2, "reduction": 3, "swizzle": 4, "custom": 5,
                 "stages": 6}  # cublasLtMatmulAlgoConfigAttributes_t, all 32-bit
WORKSPACE_BYTES = 32 * 2**20


class _Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class _HeuristicResult(ctypes.Structure):
    _fields_ = [("algo", _Algo), ("workspace_size", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


def _load_library() -> ctypes.CDLL:
    """The libcublasLt torch loaded (found in this process's mapped files after a matmul)."""
    a = torch.ones(8, 8, device="cuda", dtype=torch.bfloat16)
    (a @ a).sum().item()
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "libcublasLt.so" in line}
    if not paths:
        raise RuntimeError("libcublasLt is not loaded in this process")
    lib = ctypes.CDLL(sorted(paths)[0])
    p, i, u64, i64, size = (ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_int64,
                            ctypes.c_size_t)
    signatures = {
        "cublasLtCreate": [p],
        "cublasLtMatmulDescCreate": [p, i, i],
        "cublasLtMatmulDescSetAttribute": [p, i, p, size],
        "cublasLtMatrixLayoutCreate": [p, i, u64, u64, i64],
        "cublasLtMatmulPreferenceCreate": [p],
        "cublasLtMatmulPreferenceSetAttribute": [p, i, p, size],
        "cublasLtMatmulPreferenceDestroy": [p],
        "cublasLtMatmulAlgoGetHeuristic": [p, p, p, p, p, p, p, i, p, p],
        "cublasLtMatmulAlgoConfigGetAttribute": [p, i, p, size, p],
        "cublasLtMatmulDescDestroy": [p],
        "cublasLtMatrixLayoutDestroy": [p],
        "cublasLtMatmul": [p, p, p, p, p, p, p, p, p, p, p, p, p, p, size, p],
    }
    for name, argtypes in signatures.items():
        getattr(lib, name).argtypes, getattr(lib, name).restype = argtypes, ctypes.c_int
    return lib


@dataclass
class LtAlgo:
    """One algorithm of the heuristic for one product, with its configuration for reports."""
    algo: _Algo
    workspace_bytes: int
    waves: float
    config: dict[str, int]


class LtMatmul:
    """Descriptors of one product shape (rows m, in k, out n, weight layout, dtypes) on one
    device, and calls of it with a given algorithm on torch's current stream."""

    _lib: Optional[ctypes.CDLL] = None
    _handles: dict[int, tuple[ctypes.c_void_p, torch.Tensor]] = {}

    def __init__(self, m: int, k: int, n: int, weight_column_major: bool,
                 dtype: torch.dtype = torch.bfloat16, out_dtype: Optional[torch.dtype] = None,
                 device: Optional[torch.device] = None) -> None:
        if LtMatmul._lib is None:
            LtMatmul._lib = _load_library()
        self.lib = LtMatmul._lib
        self.device = torch.device(device or torch.cuda.current_device())
        self.m, self.k, self.n = m, k, n
        self.out_dtype = out_dtype or dtype
        self.handle, self.workspace = self._handle()
        # cuBLAS is column-major: y^T [n, m] = W [n, k] x^T [k, m]. x [m, k] row-major is x^T
        # column-major (ld k). W column-major is A untransposed (ld n); row-major, A transposed.
        self.desc = self._new("cublasLtMatmulDescCreate", ctypes.c_int(_COMPUTE_32F),
                              ctypes.c_int(_DTYPES[torch.float32]))
        op_a = ctypes.c_int(_OP_N if weight_column_major else _OP_T)
        self._check(self.lib.cublasLtMatmulDescSetAttribute(
            self.desc, _DESC_TRANSA, ctypes.byref(op_a), ctypes.sizeof(op_a)), "set transa")
        op_b = ctypes.c_int(_OP_N)
        self._check(self.lib.cublasLtMatmulDescSetAttribute(
            self.desc, _DESC_TRANSB, ctypes.byref(op_b), ctypes.sizeof(op_b)), "set transb")
        a_shape = (n, k, n) if weight_column_major else (k, n, k)
        self.a_layout = self._layout(dtype, *a_shape)
        self.b_layout = self._layout(dtype, k, m, k)
        self.d_layout = self._layout(self.out_dtype, n, m, n)
        self.alpha, self.beta = ctypes.c_float(1.0), ctypes.c_float(0.0)

    def __del__(self) -> None:
        # Descriptors are host memory of the library; a plan cache that starts over frees them.
        for name in ("a_layout", "b_layout", "d_layout"):
            if getattr(self, name, None):
                self.lib.cublasLtMatrixLayoutDestroy(getattr(self, name))
        if getattr(self, "desc", None):
            self.lib.cublasLtMatmulDescDestroy(self.desc)

    def _handle(self) -> tuple[ctypes.c_void_p, torch.Tensor]:
        index = self.device.index
        if index not in LtMatmul._handles:
            handle = ctypes.c_void_p()
            self._check(self.lib.cublasLtCreate(ctypes.byref(handle)), "create")
            workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
            LtMatmul._handles[index] = (handle, workspace)
        return LtMatmul._handles[index]

    def _check(self, status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"cuBLASLt {what} failed with status {status} "
                               f"(m={self.m}, k={self.k}, n={self.n})")

    def _new(self, fn: str, *args) -> ctypes.c_void_p:
        out = ctypes.c_void_p()
        self._check(getattr(self.lib, fn)(ctypes.byref(out), *args), fn)
        return out

    def _layout(self, dtype: torch.dtype, rows: int, cols: int, ld: int) -> ctypes.c_void_p:
        return self._new("cublasLtMatrixLayoutCreate", ctypes.c_int(_DTYPES[dtype]),
                         ctypes.c_uint64(rows), ctypes.c_uint64(cols), ctypes.c_int64(ld))

    def candidates(self, count: int = 32) -> list[LtAlgo]:
        """The heuristic's algorithms for this product, its first pick first."""
        pref = self._new("cublasLtMatmulPreferenceCreate")
        size = ctypes.c_uint64(WORKSPACE_BYTES)
        self._check(self.lib.cublasLtMatmulPreferenceSetAttribute(
            pref, _PREF_MAX_WORKSPACE_BYTES, ctypes.byref(size), ctypes.sizeof(size)), "pref")
        results = (_HeuristicResult * count)()
        found = ctypes.c_int()
        self._check(self.lib.cublasLtMatmulAlgoGetHeuristic(
            self.handle, self.desc, self.a_layout, self.b_layout, self.d_layout, self.d_layout,
            pref, count, results, ctypes.byref(found)), "heuristic")
        self.lib.cublasLtMatmulPreferenceDestroy(pref)
        algos = []
        for r in results[:found.value]:
            if r.state == 0:
                algos.append(LtAlgo(r.algo, r.workspace_size, r.waves, self._config(r.algo)))
        return algos

    def _config(self, algo: _Algo) -> dict[str, int]:
        config = {}
        for name, attr in _CONFIG_ATTRS.items():
            value, written = ctypes.c_uint32(), ctypes.c_size_t()
            if self.lib.cublasLtMatmulAlgoConfigGetAttribute(
                    ctypes.byref(algo), attr, ctypes.byref(value), 4, ctypes.byref(written)) == 0:
                config[name] = value.value
        return config

    def run(self, x: torch.Tensor, weight: torch.Tensor, algo: LtAlgo,
            out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [m, k] @ weight.T, weight [n, k] in the layout given at construction."""
        if out is None:
            out = torch.empty(self.m, self.n, dtype=self.out_dtype, device=x.device)
        stream = ctypes.c_void_p(torch.cuda.current_stream(x.device).cuda_stream)
        d = ctypes.c_void_p(out.data_ptr())
        self._check(self.lib.cublasLtMatmul(
            self.handle, self.desc, ctypes.byref(self.alpha),
            ctypes.c_void_p(weight.data_ptr()), self.a_layout,
            ctypes.c_void_p(x.data_ptr()), self.b_layout, ctypes.byref(self.beta),
            d, self.d_layout, d, self.d_layout, ctypes.byref(algo.algo),
            ctypes.c_void_p(self.workspace.data_ptr()), ctypes.c_size_t(WORKSPACE_BYTES),
            stream), "matmul")
        return out


class TunedProduct:
    """A linear layer whose matmul may run through a cuBLASLt algorithm that timed faster than
    torch's own call on this GPU, at the decode CUDA graphs' batch sizes (`tune_model`).
    Elsewhere, and until tuned, torch's call."""

    lt_rows: Optional[dict[int, "LtChoice"]] = None  # row count -> choice
    lt_out_dtype: Optional[torch.dtype] = None  # None: the weight's

    def tuned_product(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """x @ weight.T through the algorithm tuned for x's row count, or None (call torch)."""
        if self.lt_rows is None or not x.is_contiguous():
            return None
        choice = self.lt_rows.get(x.shape[0])
        return None if choice is None else choice.run(x, self.weight)


@dataclass
class LtChoice:
    """The algorithm chosen for one product at one row count."""
    plan: LtMatmul
    algo: LtAlgo

    def run(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.plan.run(x, weight, self.algo)


def time_graph(calls: list, reps: int = 3) -> float:
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


TUNE_BYTES = 256 * 2**20  # weights a timing cycles through: several times any L2, as a forward


def tune_linears(layers: list[torch.nn.Module], sizes: list[int], count: int,
                 min_gain: float = 0.03) -> tuple[dict[int, list[LtChoice]], list[dict]]:
    """For each product among `layers` (in and out features, weight layout, output dtype) at
    each row count in `sizes`: the cuBLASLt algorithm among the heuristic's first `count` that
    beats torch's own call by at least `min_gain`, timed over the product's own layers'
    weights. `layers` have `weight` [out, in] and `lt_out_dtype` (None: the weight's).
    Returns, by row count, the choice for each layer (None: torch's call), and one report row
    per product and row count."""
    groups: dict[tuple, list[int]] = {}
    for i, layer in enumerate(layers):
        w = layer.weight
        groups.setdefault((w.shape[1], w.shape[0], w.stride(0) == 1, layer.lt_out_dtype),
                          []).append(i)
    choices: dict[int, list[Optional[LtChoice]]] = {m: [None] * len(layers) for m in sizes}
    report = []
    for (k, n, column_major, out_dtype), members in groups.items():
        w0 = layers[members[0]].weight
        per_copy = w0.numel() * w0.itemsize
        weights = [layers[i].weight for i in members[:max(1, -(-TUNE_BYTES // per_copy))]]
        out_dtype = out_dtype or w0.dtype
        for m in sizes:
            x = torch.randn(m, k, dtype=w0.dtype, device=w0.device)
            if out_dtype == w0.dtype:
                own = [lambda w=w: torch.nn.functional.linear(x, w) for w in weights]
            else:
                own = [lambda w=w: torch.mm(x, w.t(), out_dtype=out_dtype) for w in weights]
            torch_s = time_graph(own)
            plan = LtMatmul(m, k, n, column_major, w0.dtype, out_dtype, w0.device)
            out = torch.empty(m, n, dtype=out_dtype, device=w0.device)
            best, best_s = None, torch_s
            for algo in plan.candidates(count):
                try:
                    s = time_graph([lambda w=w, a=algo: plan.run(x, w, a, out) for w in weights])
                except RuntimeError:  # an algorithm that refuses this product: skip it
                    continue
                if s < best_s:
                    best, best_s = algo, s
            chosen = best is not None and best_s < torch_s * (1 - min_gain)
            if chosen:
                choice = LtChoice(plan, best)
                for i in members:
                    choices[m][i] = choice
            report.append({"in": k, "out": n, "rows": m, "torch_us": 1e6 * torch_s / len(weights),
                           "best_us": 1e6 * best_s / len(weights), "chosen": chosen,
                           **(best.config if chosen else {})})
    return choices, report


def tune_model(model: torch.nn.Module, sizes: list[int], count: int) -> list[dict]:
    """Tune every bias-free TunedProduct of `model` at each of the decode graphs' batch `sizes`
    (before they are captured). Returns the report rows."""
    # A layer with a bias would add it in a kernel of its own; torch's call fuses it.
    layers = [m for m in model.modules()
              if isinstance(m, TunedProduct) and getattr(m, "bias", None) is None]
    choices, report = tune_linears(layers, sizes, count)
    for i, layer in enumerate(layers):
        rows = {m: per_layer[i] for m, per_layer in choices.items() if per_layer[i] is not None}
        layer.lt_rows = rows or None
    return report
