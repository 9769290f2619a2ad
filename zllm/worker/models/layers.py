"""The blocks model files compose: RMSNorm, gated activations, rotary embeddings, self-attention,
the gated MLP, and the causal-LM shell around a family's decoder.

Norms, activations and RoPE each come in two classes with the same arithmetic: plain PyTorch (the
reference, and the CPU path) and flashinfer's fused CUDA kernels (one launch instead of several,
in place where the caller allows it). The model picks one class per layer when it is built
(`fused`, from `use_fused_kernels`), so forward passes never branch on it.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from zllm.architecture import ModelArchitecture
from zllm.worker.attention.base import AttentionBackend, AttentionSpec
from zllm.worker.models.linear import (ColumnParallelLinear, ParallelLMHead, QKVParallelLinear,
                                       RowParallelLinear)


def use_fused_kernels(device: torch.device, dtype: torch.dtype) -> bool:
    """flashinfer's norm/activation/RoPE kernels exist for CUDA and 16-bit activations."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    return importlib.util.find_spec("flashinfer") is not None


# -- RMSNorm ---------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """x / rms(x) * w. With `residual`, first adds x to it (the decoder's skip connection) and
    returns (normalised sum, sum), which the fused kernel does in place in one pass."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
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


class GemmaRMSNorm(RMSNorm):
    """Gemma's x / rms(x) * (1 + w), all in float32 and rounded once (its reference's order)."""

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).to(x.dtype)


class FusedRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        from flashinfer.norm import fused_add_rmsnorm, rmsnorm

        if residual is None:  # also per head ([T, H, D]), which the kernel takes as 2-D rows
            return rmsnorm(x.reshape(-1, x.shape[-1]), self.weight, self.eps).view(x.shape)
        fused_add_rmsnorm(x, residual, self.weight, self.eps)
        return x, residual


class FusedGemmaRMSNorm(GemmaRMSNorm):
    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        from flashinfer.norm import gemma_fused_add_rmsnorm, gemma_rmsnorm

        if residual is None:
            return gemma_rmsnorm(x.reshape(-1, x.shape[-1]), self.weight, self.eps).view(x.shape)
        gemma_fused_add_rmsnorm(x, residual, self.weight, self.eps)
        return x, residual


def rms_norm(dim: int, eps: float, fused: bool, gemma: bool = False) -> RMSNorm:
    kinds = {(False, False): RMSNorm, (True, False): FusedRMSNorm,
             (False, True): GemmaRMSNorm, (True, True): FusedGemmaRMSNorm}
    return kinds[fused, gemma](dim, eps)


# -- gated activations -----------------------------------------------------------------------------

class SiluAndMul(nn.Module):
    """silu(gate) * up for gate_up = [gate | up] along the last dimension (SwiGLU)."""

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


class GeluTanhAndMul(nn.Module):
    """gelu_tanh(gate) * up (GeGLU, Gemma's `gelu_pytorch_tanh`)."""

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up


class FusedSiluAndMul(nn.Module):
    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        from flashinfer.activation import silu_and_mul

        return silu_and_mul(gate_up)


class FusedGeluTanhAndMul(nn.Module):
    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        from flashinfer.activation import gelu_tanh_and_mul

        return gelu_tanh_and_mul(gate_up)


def gated_activation(name: str, fused: bool) -> nn.Module:
    kinds = {("silu", False): SiluAndMul, ("silu", True): FusedSiluAndMul,
             ("gelu_pytorch_tanh", False): GeluTanhAndMul,
             ("gelu_pytorch_tanh", True): FusedGeluTanhAndMul}
    return kinds[name, fused]()


# -- rotary embeddings -----------------------------------------------------------------------------

def rope_inverse_frequencies(head_dim: int, theta: float,
                             scaling: Optional[dict[str, Any]]) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv_freq / scaling["factor"]
    # Llama 3.1 (the only other kind the architecture admits): keep high frequencies, divide
    # low ones by `factor`, blend in between.
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
    cos/sin table computed on the CPU once (as the reference does) and kept on the build device."""

    def __init__(self, head_dim: int, max_positions: int, theta: float,
                 scaling: Optional[dict[str, Any]]) -> None:
        super().__init__()
        self.head_dim = head_dim
        with torch.device("cpu"):
            inv_freq = rope_inverse_frequencies(head_dim, theta, scaling)
            freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        device = torch.get_default_device()
        self.register_buffer("cos", freqs.cos().to(device), persistent=False)  # [P, D/2] float32
        self.register_buffer("sin", freqs.sin().to(device), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q [T, H, D], k [T, KVH, D] -> rotated (q, k)."""
        cos = self.cos[positions][:, None, :]  # [T, 1, D/2]
        sin = self.sin[positions][:, None, :]
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


class FusedRotaryEmbedding(RotaryEmbedding):
    """flashinfer's RoPE, in place on q and k (they may be strided views into the fused qkv
    projection's output), from one [P, D] table of cos | sin."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.register_buffer("cos_sin", torch.cat([self.cos, self.sin], dim=-1), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        from flashinfer.rope import apply_rope_with_cos_sin_cache_inplace

        apply_rope_with_cos_sin_cache_inplace(positions, q, k, self.head_dim, self.cos_sin)
        return q, k


def rotary_embedding(head_dim: int, max_positions: int, theta: float,
                     scaling: Optional[dict[str, Any]], fused: bool) -> RotaryEmbedding:
    return (FusedRotaryEmbedding if fused else RotaryEmbedding)(head_dim, max_positions, theta, scaling)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


# -- attention and MLP blocks ----------------------------------------------------------------------

class SelfAttention(nn.Module):
    """qkv projection, optional per-head q/k norm, RoPE and paged attention over this layer's
    window (the backend planned each distinct window once for the step; it applies RoPE, which
    it may fuse with its K/V store), output projection."""

    def __init__(self, arch: ModelArchitecture, layer: int,
                 qk_norm: Optional[Callable[[int], RMSNorm]] = None) -> None:
        super().__init__()
        self.qkv_proj = QKVParallelLinear(arch.hidden_size, arch.num_heads, arch.num_kv_heads,
                                          arch.head_dim, arch.qkv_bias)
        self.o_proj = RowParallelLinear(arch.num_heads * arch.head_dim, arch.hidden_size, arch.o_bias)
        self.q_norm = qk_norm(arch.head_dim) if qk_norm else None
        self.k_norm = qk_norm(arch.head_dim) if qk_norm else None
        self.window = arch.layer_window(layer)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, rope: RotaryEmbedding,
                kv_cache: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        q, k, v = self.qkv_proj(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        out = attn.forward_rotated(rope, positions, q, k, v, kv_cache, self.window)
        return self.o_proj(out.reshape(-1, self.qkv_proj.q_size))

    def spec(self, arch: ModelArchitecture) -> AttentionSpec:
        """What the attention backend computes for the layers of `arch` on this rank."""
        qkv = self.qkv_proj
        return AttentionSpec(qkv.num_heads, qkv.num_kv_heads, qkv.head_dim,
                             scale=arch.attn_scale or arch.head_dim ** -0.5,
                             logits_soft_cap=arch.attn_logit_softcap,
                             sliding_windows=arch.sliding_windows)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), with gate and up in one column-parallel matmul."""

    def __init__(self, arch: ModelArchitecture, fused: bool) -> None:
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear.split(
            arch.hidden_size, arch.intermediate_size, ("gate_proj", "up_proj"), bias=arch.mlp_bias)
        self.act = gated_activation(arch.hidden_act, fused)
        self.down_proj = RowParallelLinear(arch.intermediate_size, arch.hidden_size, arch.mlp_bias)
        if arch.hidden_act == "silu":  # the tuner may fuse it with the product (gemm_tuning.py)
            self.gate_up_proj.gated_act = self.act.forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.gate_up_proj.tuned_gated_product(x)
        if act is None:
            act = self.act(self.gate_up_proj(x))
        return self.down_proj(act)


class CausalLM(nn.Module):
    """A family's decoder (`model`, built from `decoder_class`) under the LM head; this rank's
    shard. `fused`: norms, RoPE and activations in flashinfer's CUDA kernels."""

    decoder_class: type[nn.Module]

    def __init__(self, arch: ModelArchitecture, fused: bool = False) -> None:
        super().__init__()
        self.arch = arch
        self.model = self.decoder_class(arch, fused)
        embedding = self.model.embed_tokens
        self.lm_head = ParallelLMHead(arch.hidden_size, arch.vocab_size,
                                      embedding if arch.tie_word_embeddings else None)
        self.attention_spec = self.model.layers[0].self_attn.spec(arch)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], attn: AttentionBackend) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, attn)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [T, vocab] of the full vocabulary on every rank, soft-capped where the
        model says so (Gemma 2: cap * tanh(logits / cap))."""
        logits = self.lm_head(hidden)
        cap = self.arch.final_logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap
