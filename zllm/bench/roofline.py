"""The hardware floor of a step: max(bytes / bandwidth, FLOPs / matmul rate).

Bytes count every weight once per step plus the KV cache read (each request's whole context,
the new tokens included) and written (the new tokens); FLOPs count the linear layers (2 per
weight per token), the LM head for sampled rows, and attention (QK^T and PV over each query's
visible keys). Activations are ignored, so the floor is optimistic, as a floor should be.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from zllm.architecture import ModelArchitecture


@dataclass
class Hardware:
    copy_bytes_per_s: float  # device-to-device copy, bytes read + written
    matmul_flops_per_s: float  # bf16 GEMM

    def as_dict(self) -> dict:
        return {"copy_GBps": self.copy_bytes_per_s / 1e9,
                "bf16_matmul_TFLOPs": self.matmul_flops_per_s / 1e12}


def measure_hardware(device: torch.device) -> Hardware:
    """Copy bandwidth and bf16 matmul rate, each the best of 10 timed runs after warm-up."""
    def best(fn, reps=10) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(reps):
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        return min(times)

    def copy_time() -> float:
        src = torch.randint(0, 255, (2**30,), dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        return best(lambda: dst.copy_(src))

    def matmul_time(n: int) -> float:
        a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
        b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
        return best(lambda: a @ b)

    n = 8192
    copy_s, mm_s = copy_time(), matmul_time(n)
    torch.cuda.empty_cache()
    return Hardware(2 * 2**30 / copy_s, 2 * n**3 / mm_s)


class ModelCost:
    """Per-step bytes and FLOPs of a Llama (one tensor-parallel group treated as one device)."""

    def __init__(self, arch: ModelArchitecture, dtype_bytes: int = 2) -> None:
        h, d = arch.hidden_size, arch.head_dim
        q, kv = arch.num_heads * d, arch.num_kv_heads * d
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * arch.intermediate_size
        self.linear_params = arch.num_layers * per_layer
        self.head_params = arch.vocab_size * h
        embed = 0 if arch.tie_word_embeddings else arch.vocab_size * h
        # The embedding table is not read whole (only the looked-up rows): not in the floor.
        self.weight_bytes = (self.linear_params + self.head_params) * dtype_bytes
        self.kv_bytes_per_token = 2 * arch.num_layers * kv * dtype_bytes
        self.attn_flops_per_key = 4 * arch.num_layers * q  # QK^T and PV, 2 FLOPs per MAC
        self.num_params = self.linear_params + self.head_params + embed

    def step(self, contexts: list[tuple[int, int]], num_sampled: int) -> tuple[float, float]:
        """(bytes, FLOPs) of a step; contexts = (cached tokens, new tokens) per request."""
        new = sum(n for _, n in contexts)
        # Query j (0-based) of a request with c cached tokens sees c + j + 1 keys.
        keys_seen = sum(n * c + n * (n + 1) // 2 for c, n in contexts)
        kv_read = sum(c + n for c, n in contexts)
        nbytes = self.weight_bytes + (kv_read + new) * self.kv_bytes_per_token
        flops = (2 * new * self.linear_params + 2 * num_sampled * self.head_params
                 + keys_seen * self.attn_flops_per_key)
        return nbytes, flops

    def floor_s(self, hw: Hardware, contexts: list[tuple[int, int]], num_sampled: int) -> float:
        nbytes, flops = self.step(contexts, num_sampled)
        return max(nbytes / hw.copy_bytes_per_s, flops / hw.matmul_flops_per_s)

    def op_floor_s(self, hw: Hardware, contexts: list[tuple[int, int]], num_sampled: int) -> float:
        """The floor of a step whose operations run one after another, as every layer's do: the
        linear layers' max(weight bytes, FLOPs) plus attention's max(KV bytes, FLOPs). `floor_s`
        lets the weight GEMMs' FLOPs hide under attention's KV reads; at a decode batch where
        the GEMMs are compute-bound (about 180 rows on an H200) that overlap needs both to run
        at once, which no kernel sequence of ours does."""
        new = sum(n for _, n in contexts)
        linear_bytes = self.weight_bytes
        linear_flops = 2 * new * self.linear_params + 2 * num_sampled * self.head_params
        kv_bytes = (sum(c + n for c, n in contexts) + new) * self.kv_bytes_per_token
        attn_flops = sum(n * c + n * (n + 1) // 2 for c, n in contexts) * self.attn_flops_per_key
        bw, rate = hw.copy_bytes_per_s, hw.matmul_flops_per_s
        return max(linear_bytes / bw, linear_flops / rate) + max(kv_bytes / bw, attn_flops / rate)
