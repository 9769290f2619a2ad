"""cuBLASLt matmuls with a chosen algorithm, through ctypes.

torch picks one cuBLAS algorithm per call from cuBLAS's heuristic, and its TunableOp offers no
alternatives on CUDA. The heuristic's first pick is not always its fastest: on an H100
(2026-12-05, `python -m zllm.bench.linear_shapes --lt-algos 24`) another of its algorithms
ran the Llama-3.1-8B shape's qkv projection 10% faster at 8192 rows and 9% faster at one row,
though at W1's 256-row decode none beat torch's call by more than 1%.

`LtMatmul` holds the descriptors of one product shape: `candidates` lists the heuristic's
algorithms for it (at most 8 here, however many are asked for), `run` calls one on torch's
current stream (CUDA-graph capturable). zllm/worker/models/gemm_tuning.py times them.

The product is y[m, n] = x[m, k] W^T for a weight W [n, k] stored row-major (as checkpoints
store it) or column-major (`column_major_linears`), bf16 or fp16 in, the same or float32 out,
float32 accumulation, every pointer aligned to 256 bytes (the heuristic's default
assumption; callers check it). CUDA only; the library is the one torch loaded.
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
ALIGNMENT = 256  # bytes; the heuristic's algorithms may assume it of every pointer


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
    if len(paths) != 1:
        raise RuntimeError(f"expected torch's one libcublasLt in this process, found {paths}")
    lib = ctypes.CDLL(paths.pop())
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
        # Descriptors are host memory of the library: free those of plans the tuner drops.
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
