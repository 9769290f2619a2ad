"""Small building blocks of the Llama model: RMSNorm, SiLU-and-mul and rotary embeddings.

Each has two implementations of the same arithmetic: plain PyTorch (the reference, and the CPU
path) and flashinfer's fused CUDA kernels (one launch instead of several, in place where the
caller allows it). `use_fused_kernels` decides once, when the model is built.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn


def use_fused_kernels(device: torch.device, dtype: torch.dtype) -> bool:
    """flashinfer's norm/activation/RoPE kernels exist for CUDA and 16-bit activations."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    return importlib.util.find_spec("flashinfer") is not None


class RMSNorm(nn.Module):
    """RMSNorm; with `residual`, first adds x to it (the decoder's skip connection) and returns
    (normalised sum, sum), which the fused kernel does in place in one pass."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.fused = False

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        if self.fused:
            from flashinfer.norm import fused_add_rmsnorm, rmsnorm

            if residual is None:
                return rmsnorm(x, self.weight, self.eps)
            fused_add_rmsnorm(x, residual, self.weight, self.eps)
            return x, residual
        if residual is None:
            return self._norm(x)
        residual = x + residual
        return self._norm(residual), residual

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32, as the reference implementation does, then cast back.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def silu_and_mul(gate_up: torch.Tensor, fused: bool) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] along the last dimension."""
    if fused:
        from flashinfer.activation import silu_and_mul as kernel

        return kernel(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_inverse_frequencies(head_dim: int, theta: float,
                             scaling: Optional[dict[str, Any]]) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind != "llama3":
        raise ValueError(f"rope scaling type {kind!r} is not supported (default, linear, llama3)")
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Rotates q and k by position (the rotate-half layout of Hugging Face checkpoints), from a
    precomputed cos/sin table. The fused path rotates q and k in place (they may be strided views
    into the fused qkv projection's output)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float,
                 scaling: Optional[dict[str, Any]]) -> None:
        super().__init__()
        self.head_dim, self.max_positions = head_dim, max_positions
        self.theta, self.scaling = theta, scaling
        self.fused = False
        self.register_buffer("cos", torch.empty(0), persistent=False)  # [P, D/2], float32
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.register_buffer("cos_sin", torch.empty(0), persistent=False)  # [P, D]: fused layout
        self.init_tables(torch.device("cpu"))

    def init_tables(self, device: torch.device) -> None:
        """(Re)compute the cos/sin tables, e.g. after the module was materialised with to_empty."""
        inv_freq = rope_inverse_frequencies(self.head_dim, self.theta, self.scaling)
        positions = torch.arange(self.max_positions, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        self.cos = freqs.cos().to(device)
        self.sin = freqs.sin().to(device)
        self.cos_sin = torch.cat([self.cos, self.sin], dim=-1) if self.fused else torch.empty(0)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q [T, H, D], k [T, KVH, D] -> rotated (q, k)."""
        if self.fused:
            from flashinfer.rope import apply_rope_with_cos_sin_cache_inplace

            apply_rope_with_cos_sin_cache_inplace(positions, q, k, self.head_dim, self.cos_sin)
            return q, k
        cos = self.cos[positions][:, None, :]  # [T, 1, D/2]
        sin = self.sin[positions][:, None, :]
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
