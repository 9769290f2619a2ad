"""Writes a Hugging Face Llama in Meta's original layout (params.json, consolidated.NN.pth), for
tests of zllm's Meta reader.

Written from Meta's layout as Hugging Face's conversion script reads it
(transformers/models/llama/convert_llama_weights_to_hf.py), not from zllm's loader: this is the
inverse of that script. Per model-parallel part:
- wq, wk: rows of whole heads (n_heads // parts, n_kv_heads // parts), each head's rows in Meta's
  interleaved rotary order (the script's `permute` maps them to Hugging Face's halves);
- wv, w1, w3, output: split over rows (dim 0); wo, w2: over columns (dim 1);
- tok_embeddings: over the vocabulary (dim 0) in Llama 3, over the model dimension (dim 1) in
  Llama 1/2 (the script's `concat_dim`);
- norms: a full copy in every part. Llama 2 parts also carry `rope.freqs`, which readers ignore.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file

LAYER_TENSORS = {  # Hugging Face name in a layer -> (Meta name, dim it is split along)
    "self_attn.q_proj.weight": ("attention.wq.weight", 0),
    "self_attn.k_proj.weight": ("attention.wk.weight", 0),
    "self_attn.v_proj.weight": ("attention.wv.weight", 0),
    "self_attn.o_proj.weight": ("attention.wo.weight", 1),
    "mlp.gate_proj.weight": ("feed_forward.w1.weight", 0),
    "mlp.down_proj.weight": ("feed_forward.w2.weight", 1),
    "mlp.up_proj.weight": ("feed_forward.w3.weight", 0),
    "input_layernorm.weight": ("attention_norm.weight", None),
    "post_attention_layernorm.weight": ("ffn_norm.weight", None),
}


def to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of the conversion script's permute(w, n_heads, dim1, dim2)."""
    dim1, dim2 = w.shape
    return w.view(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def write_meta_checkpoint(hf_dir: str, out_dir: str, num_parts: int, llama_version: int) -> None:
    """Meta's layout of the Hugging Face Llama in `hf_dir`, in `num_parts` parts."""
    with open(os.path.join(hf_dir, "config.json")) as f:
        config = json.load(f)
    state = load_file(os.path.join(hf_dir, "model.safetensors"))
    n_heads, n_kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    for n in (n_heads, n_kv_heads, config["intermediate_size"], config["vocab_size"]):
        assert n % num_parts == 0, f"{n} does not split into {num_parts} parts"
    full: dict[str, tuple[torch.Tensor, int | None]] = {
        "tok_embeddings.weight": (state["model.embed_tokens.weight"], 0 if llama_version >= 3 else 1),
        "norm.weight": (state["model.norm.weight"], None),
        "output.weight": (state.get("lm_head.weight", state["model.embed_tokens.weight"]), 0),
    }
    for i in range(config["num_hidden_layers"]):
        for hf_name, (meta_name, dim) in LAYER_TENSORS.items():
            w = state[f"model.layers.{i}.{hf_name}"]
            if meta_name == "attention.wq.weight":
                w = to_interleaved(w, n_heads)
            elif meta_name == "attention.wk.weight":
                w = to_interleaved(w, n_kv_heads)
            full[f"layers.{i}.{meta_name}"] = (w, dim)
    parts: list[dict[str, torch.Tensor]] = [{} for _ in range(num_parts)]
    for name, (w, dim) in full.items():
        chunks = [w] * num_parts if dim is None else list(w.chunk(num_parts, dim=dim))
        for part, chunk in zip(parts, chunks):
            part[name] = chunk.clone()
    if llama_version < 3:
        head_dim = config["hidden_size"] // n_heads
        freqs = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        for part in parts:
            part["rope.freqs"] = freqs.clone()
    os.makedirs(out_dir, exist_ok=True)
    for i, part in enumerate(parts):
        torch.save(part, os.path.join(out_dir, f"consolidated.{i:02d}.pth"))
    with open(os.path.join(out_dir, "params.json"), "w") as f:
        json.dump(meta_params(config, llama_version), f)


def meta_params(config: dict, llama_version: int) -> dict:
    """params.json as Meta writes it. Llama 2's has no n_kv_heads for its multi-head models, no
    rope_theta (10000) and vocab_size -1. Meta's FFN size is int(8 * dim / 3) rounded up to
    multiple_of, which the test model's intermediate_size must equal."""
    dim, multiple_of = config["hidden_size"], 32
    assert -(-int(8 * dim / 3) // multiple_of) * multiple_of == config["intermediate_size"]
    theta = config.get("rope_theta") or config["rope_parameters"]["rope_theta"]
    params = {"dim": dim, "n_layers": config["num_hidden_layers"],
              "n_heads": config["num_attention_heads"], "multiple_of": multiple_of,
              "norm_eps": config["rms_norm_eps"]}
    if llama_version < 3:
        assert theta == 10000.0, "Llama 2 has no rope_theta in params.json: it is 10000"
        params["vocab_size"] = -1
        if config["num_key_value_heads"] != config["num_attention_heads"]:
            params["n_kv_heads"] = config["num_key_value_heads"]
        return params
    return {**params, "n_kv_heads": config["num_key_value_heads"],
            "vocab_size": config["vocab_size"], "rope_theta": theta, "use_scaled_rope": True,
            "max_seq_len": config["max_position_embeddings"]}
