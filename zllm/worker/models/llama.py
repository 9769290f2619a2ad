"""Llama 2/3.x as a tensor-parallel shard, from fairscale's model-parallel layers.

Column-parallel layers split their output features across ranks (each rank holds whole heads);
row-parallel layers split their input and all-reduce the result, so each block has two
all-reduces (after attention and after the MLP). q/k/v and gate/up are fused into one
column-parallel layer each; the weight loader fills each rank's fused shard from the separate
checkpoint tensors. When there are fewer KV heads than ranks, KV heads are replicated.

The residual stream is carried beside the hidden states (as in vLLM), so each norm can add the
skip connection and normalise in one fused kernel on CUDA; the arithmetic is the reference's.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import torch
from fairscale.nn.model_parallel import layers as fs_layers
from fairscale.nn.model_parallel.mappings import gather_from_model_parallel_region
from fairscale.nn.model_parallel.layers import (ColumnParallelLinear, RowParallelLinear,
                                                VocabParallelEmbedding)
from torch import nn

from zllm.config import LlamaArchitecture
from zllm.worker.attention.base import AttentionBackend
from zllm.worker.models.layers import RMSNorm, RotaryEmbedding, silu_and_mul, use_fused_kernels


class ShardDims:
    """Per-rank head counts and sizes."""

    def __init__(self, arch: LlamaArchitecture, tp_size: int) -> None:
        for name, total in (("num_attention_heads", arch.num_heads),
                            ("intermediate_size", arch.intermediate_size),
                            ("vocab_size", arch.vocab_size)):
            if total % tp_size:
                raise ValueError(f"model {name} = {total} is not divisible by "
                                 f"tensor_parallel_size = {tp_size}")
        if arch.num_kv_heads % tp_size and tp_size % arch.num_kv_heads:
            raise ValueError(f"num_key_value_heads = {arch.num_kv_heads} and tensor_parallel_size = "
                             f"{tp_size}: one must divide the other")
        self.tp_size = tp_size
        self.head_dim = arch.head_dim
        self.num_heads = arch.num_heads // tp_size
        self.num_kv_heads = max(1, arch.num_kv_heads // tp_size)
        self.q_size = self.num_heads * arch.head_dim
        self.kv_size = self.num_kv_heads * arch.head_dim
        self.intermediate_size = arch.intermediate_size // tp_size

    def kv_head_start(self, rank: int, total_kv_heads: int) -> int:
        """First KV head of `rank` (several ranks share one head when replicated)."""
        if total_kv_heads >= self.tp_size:
            return rank * self.num_kv_heads
        return rank * total_kv_heads // self.tp_size


class LlamaAttention(nn.Module):
    def __init__(self, arch: LlamaArchitecture, dims: ShardDims) -> None:
        super().__init__()
        self.dims = dims
        tp = dims.tp_size
        self.qkv_proj = ColumnParallelLinear(
            arch.hidden_size, tp * (dims.q_size + 2 * dims.kv_size), bias=False, gather_output=False)
        self.o_proj = RowParallelLinear(arch.num_heads * arch.head_dim, arch.hidden_size, bias=False,
                                        input_is_parallel=True)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, rope: RotaryEmbedding,
                kv_cache: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        d = self.dims
        q, k, v = self.qkv_proj(x).split([d.q_size, d.kv_size, d.kv_size], dim=-1)
        q = q.view(-1, d.num_heads, d.head_dim)
        k = k.view(-1, d.num_kv_heads, d.head_dim)
        v = v.view(-1, d.num_kv_heads, d.head_dim)
        q, k = rope(positions, q, k)
        out = attn.forward(q, k, v, kv_cache)
        return self.o_proj(out.reshape(-1, d.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, arch: LlamaArchitecture, dims: ShardDims) -> None:
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(arch.hidden_size, 2 * arch.intermediate_size,
                                                 bias=False, gather_output=False)
        self.down_proj = RowParallelLinear(arch.intermediate_size, arch.hidden_size, bias=False,
                                           input_is_parallel=True)
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x), self.fused))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, arch: LlamaArchitecture, dims: ShardDims) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = LlamaAttention(arch, dims)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = LlamaMLP(arch, dims)

    def forward(self, positions, x, residual, rope, kv_cache, attn):
        """(x, residual) -> (this block's MLP output, the residual stream before it)."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, rope, kv_cache, attn)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, arch: LlamaArchitecture, tp_size: int, max_positions: int) -> None:
        super().__init__()
        self.arch = arch
        self.dims = ShardDims(arch, tp_size)
        self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size)
        self.rope = RotaryEmbedding(arch.head_dim, max_positions, arch.rope_theta, arch.rope_scaling)
        self.layers = nn.ModuleList(LlamaDecoderLayer(arch, self.dims) for _ in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        # Sharded over the vocabulary like the embedding; gathered to full logits on every rank,
        # so all ranks sample the same token.
        self.lm_head = ColumnParallelLinear(arch.hidden_size, arch.vocab_size, bias=False,
                                            gather_output=True)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight  # same [vocab/tp, hidden] shard

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], attn: AttentionBackend) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(positions, x, residual, self.rope, kv_cache, attn)
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [T, vocab]. On CUDA the 16-bit matmul writes float32 directly: rounding
        logits to bf16 (8 bits of mantissa) would turn many close candidates into exact ties and
        make greedy decoding depend on kernel choice."""
        weight = self.lm_head.weight
        if hidden.is_cuda and hidden.dtype != torch.float32:
            logits = torch.mm(hidden, weight.t(), out_dtype=torch.float32)
        else:
            logits = torch.nn.functional.linear(hidden, weight).float()
        return gather_from_model_parallel_region(logits)

    def set_fused_kernels(self, on: bool) -> None:
        """Norms, RoPE and SiLU-and-mul in flashinfer's fused CUDA kernels (on) or in PyTorch."""
        for module in self.modules():
            if isinstance(module, (RMSNorm, RotaryEmbedding, LlamaMLP)):
                module.fused = on
        self.rope.init_tables(self.rope.cos.device)


def build_model(arch: LlamaArchitecture, tp_size: int, max_positions: int, dtype: torch.dtype,
                device: torch.device) -> LlamaForCausalLM:
    """This rank's shard, with uninitialised weights on `device` (the loader fills them)."""
    with skip_fairscale_init(dtype):
        model = LlamaForCausalLM(arch, tp_size, max_positions)
    model.to_empty(device=device)
    model.rope.init_tables(device)
    if use_fused_kernels(device, dtype):
        model.set_fused_kernels(True)
    if arch.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval().requires_grad_(False)


@contextlib.contextmanager
def skip_fairscale_init(dtype: torch.dtype):
    """Build fairscale layers without initialising them.

    fairscale fills a full-size master weight on every rank and scatters it; zllm loads each
    rank's shard itself, so that work (and memory) is skipped, and parameters are created
    uninitialised in the target dtype, to be materialised on the device by `to_empty`.
    """
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with mock.patch.object(fs_layers, "_initialize_affine_weight", lambda *a, **k: None):
            yield
    finally:
        torch.set_default_dtype(old_dtype)
