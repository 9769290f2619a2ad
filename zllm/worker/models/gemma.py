"""Gemma 2 and Gemma 3 (text): one tensor-parallel decoder.

Gemma's block differs from Llama's: every sublayer's output is normalised again before it joins
the residual stream (four norms per block), norms scale by (1 + w), embeddings are multiplied by
sqrt(hidden_size), and the MLP is GeGLU. Layers alternate sliding-window and full attention
(Gemma 2: every other layer; Gemma 3: five sliding, one full), which the attention backend plans
once per step per window. Gemma 2 soft-caps attention scores and final logits
(cap * tanh(x / cap)); Gemma 3 instead normalises each head of q and k, and its sliding layers
use their own RoPE base. Both scale scores by query_pre_attn_scalar ** -0.5.
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


class GemmaDecoderLayer(nn.Module):
    def __init__(self, arch: ModelArchitecture, layer: int, fused: bool) -> None:
        super().__init__()
        norm = partial(rms_norm, eps=arch.rms_norm_eps, fused=fused, gemma=True)
        self.input_layernorm = norm(arch.hidden_size)
        self.self_attn = SelfAttention(arch, layer, qk_norm=norm if arch.qk_norm else None)
        self.post_attention_layernorm = norm(arch.hidden_size)
        self.pre_feedforward_layernorm = norm(arch.hidden_size)
        self.mlp = GatedMLP(arch, fused)
        self.post_feedforward_layernorm = norm(arch.hidden_size)

    def forward(self, positions, x, residual, rope, kv_cache, attn):
        """(x, residual) -> (this block's normalised MLP output, the residual stream before it)."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.post_attention_layernorm(self.self_attn(positions, x, rope, kv_cache, attn))
        x, residual = self.pre_feedforward_layernorm(x, residual)
        return self.post_feedforward_layernorm(self.mlp(x)), residual


class GemmaModel(nn.Module):
    def __init__(self, arch: ModelArchitecture, fused: bool) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size)
        # The reference rounds the scale to the model's dtype before multiplying.
        self.register_buffer("normalizer", torch.tensor(arch.hidden_size ** 0.5), persistent=False)
        rope = partial(rotary_embedding, arch.head_dim, arch.max_position_embeddings, fused=fused)
        self.rotary_emb = rope(arch.rope_theta, arch.rope_scaling)
        self.rotary_emb_local = rope(arch.sliding_rope_theta, None) if arch.sliding_rope_theta else None
        self.layers = nn.ModuleList(GemmaDecoderLayer(arch, i, fused) for i in range(arch.num_layers))
        self.norm = rms_norm(arch.hidden_size, arch.rms_norm_eps, fused, gemma=True)
        # Each layer's RoPE (a plain list: the modules are registered above).
        local = self.rotary_emb_local or self.rotary_emb
        self.layer_ropes = [local if arch.layer_window(i) else self.rotary_emb
                            for i in range(arch.num_layers)]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], attn: AttentionBackend) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids) * self.normalizer, None
        for layer, rope, kv_cache in zip(self.layers, self.layer_ropes, kv_caches):
            x, residual = layer(positions, x, residual, rope, kv_cache, attn)
        return self.norm(x, residual)[0]


class GemmaForCausalLM(CausalLM):
    """Gemma 2 and Gemma 3 text checkpoints."""

    decoder_class = GemmaModel
