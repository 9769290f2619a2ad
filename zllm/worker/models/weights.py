"""Fill one rank's Llama shard from a checkpoint, reading only that rank's slice of each tensor.

Every parameter is described in Hugging Face terms: which checkpoint tensors, along which dim,
which range. A reader (zllm/worker/models/checkpoint.py) turns that into I/O for the format:
safetensors, Meta's consolidated.NN.pth or GGUF. `dummy` fills random weights of the right shapes.
"""

from __future__ import annotations

import torch
from torch import nn

from zllm.worker.models.checkpoint import Piece, make_reader
from zllm.worker.models.llama import LlamaForCausalLM


def shard_plan(model: LlamaForCausalLM, rank: int) -> dict[str, list[Piece]]:
    """For each parameter of this rank, the checkpoint pieces it is the concatenation of."""
    arch, d = model.arch, model.dims
    vocab = arch.vocab_size // d.tp_size
    q0 = rank * d.q_size
    kv0 = d.kv_head_start(rank, arch.num_kv_heads) * d.head_dim
    i0 = rank * d.intermediate_size
    plan = {
        "embed_tokens.weight": [Piece("model.embed_tokens.weight", 0, rank * vocab, (rank + 1) * vocab)],
        "norm.weight": [Piece("model.norm.weight")],
    }
    if not arch.tie_word_embeddings:
        plan["lm_head.weight"] = [Piece("lm_head.weight", 0, rank * vocab, (rank + 1) * vocab)]
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        plan[f"layers.{i}.input_layernorm.weight"] = [Piece(p + "input_layernorm.weight")]
        plan[f"layers.{i}.post_attention_layernorm.weight"] = [Piece(p + "post_attention_layernorm.weight")]
        plan[f"layers.{i}.self_attn.qkv_proj.weight"] = [
            Piece(p + "self_attn.q_proj.weight", 0, q0, q0 + d.q_size),
            Piece(p + "self_attn.k_proj.weight", 0, kv0, kv0 + d.kv_size),
            Piece(p + "self_attn.v_proj.weight", 0, kv0, kv0 + d.kv_size),
        ]
        plan[f"layers.{i}.self_attn.o_proj.weight"] = [Piece(p + "self_attn.o_proj.weight", 1, q0, q0 + d.q_size)]
        plan[f"layers.{i}.mlp.gate_up_proj.weight"] = [
            Piece(p + "mlp.gate_proj.weight", 0, i0, i0 + d.intermediate_size),
            Piece(p + "mlp.up_proj.weight", 0, i0, i0 + d.intermediate_size),
        ]
        plan[f"layers.{i}.mlp.down_proj.weight"] = [Piece(p + "mlp.down_proj.weight", 1, i0, i0 + d.intermediate_size)]
    return plan


def load_weights(model: LlamaForCausalLM, model_dir: str, load_format: str, rank: int,
                 seed: int) -> None:
    params = dict(model.named_parameters())
    if load_format == "dummy":
        _fill_dummy(params, seed + rank)
        return
    reader = make_reader(model_dir, load_format, model.arch)
    with torch.no_grad():
        for name, pieces in shard_plan(model, rank).items():
            tensor = torch.cat([reader.read(piece) for piece in pieces], dim=0)
            param = params[name]
            if tensor.shape != param.shape:
                raise ValueError(f"checkpoint gives {name} shape {tuple(tensor.shape)}, this rank "
                                 f"expects {tuple(param.shape)}")
            param.copy_(tensor)


def _fill_dummy(params: dict[str, nn.Parameter], seed: int) -> None:
    generator = None
    for name, param in params.items():
        if generator is None or generator.device != param.device:
            generator = torch.Generator(device=param.device).manual_seed(seed)
        with torch.no_grad():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
