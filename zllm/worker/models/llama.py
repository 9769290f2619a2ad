"""Llama 2/3.x (and SmolLM2), Mistral, Qwen2/2.5 and Qwen3: one tensor-parallel decoder.

The four families share the block: RMSNorm, self-attention with RoPE, RMSNorm, SwiGLU MLP. What
sets them apart is read from config.json into the architecture, and the shared layers act on it:
biases on q/k/v (Qwen2), RMSNorm over each head of q and k before RoPE (Qwen3), and sliding-window
attention in some or all layers (Mistral, Qwen with use_sliding_window). Their checkpoints name
tensors alike, so the module tree below mirrors those names.

Each block has two all-reduces (after attention and after the MLP). The residual stream is carried
beside the hidden states (as in vLLM), so each norm can add the skip connection and normalise in
one fused kernel on CUDA; the arithmetic is the reference's.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from zllm.architecture import ModelArchitecture
from zllm.worker.attention.base import AttentionBackend
from zllm.worker.models.layers import (CausalLM, GatedMLP, SelfAttention, rms_norm,
                                       rotary_embedding)
from zllm.worker.models.linear import VocabParallelEmbedding


class LlamaDecoderLayer(nn.Module):
    def __init__(self, arch: ModelArchitecture, layer: int, fused: bool) -> None:
        super().__init__()
        norm = partial(rms_norm, eps=arch.rms_norm_eps, fused=fused)
        self.input_layernorm = norm(arch.hidden_size)
        self.self_attn = SelfAttention(arch, layer, qk_norm=norm if arch.qk_norm else None)
        self.post_attention_layernorm = norm(arch.hidden_size)
        self.mlp = GatedMLP(arch, fused)

    def forward(self, positions, x, residual, rope, kv_cache, attn):
        """(x, residual) -> (this block's MLP output, the residual stream before it)."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, rope, kv_cache, attn)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, arch: ModelArchitecture, fused: bool) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size)
        self.rotary_emb = rotary_embedding(arch.head_dim, arch.max_position_embeddings,
                                           arch.rope_theta, arch.rope_scaling, fused)
        self.layers = nn.ModuleList(LlamaDecoderLayer(arch, i, fused) for i in range(arch.num_layers))
        self.norm = rms_norm(arch.hidden_size, arch.rms_norm_eps, fused)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], attn: AttentionBackend) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(positions, x, residual, self.rotary_emb, kv_cache, attn)
        return self.norm(x, residual)[0]


class LlamaForCausalLM(CausalLM):
    """Llama, Mistral, Qwen2 and Qwen3 checkpoints (MODEL_CLASSES in zllm/architecture.py)."""

    decoder_class = LlamaModel
