"""Writes a Hugging Face Llama (and its byte-level BPE tokenizer) as a GGUF file, with the gguf
package's writer, for tests of zllm's GGUF reader.

Written from llama.cpp's conventions (convert_hf_to_gguf.py and the GGUF spec's standardized
tensor names), not from zllm's reader: q and k rows permuted into llama.cpp's interleaved rotary
order, 1-D tensors (norms) in F32, 2-D weights in the chosen type. The gguf package cannot
quantise the K formats (Q4_K, Q5_K, Q6_K), so those tensors get random blocks with small scales:
tests compare against transformers reading the same file, so the source weights do not matter.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, TokenType, quants
from safetensors.numpy import load_file

Q = GGMLQuantizationType
LAYER_NAMES = {  # Hugging Face name in a layer -> llama.cpp's
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}


def gguf_name(hf_name: str) -> str:
    if hf_name.startswith("model.layers."):
        _, _, layer, rest = hf_name.split(".", 3)
        return f"blk.{layer}.{LAYER_NAMES[rest]}"
    return TOP_NAMES[hf_name]


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: rotate-half rows -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_blocks(shape: tuple[int, int], qtype: GGMLQuantizationType,
                  rng: np.random.Generator) -> np.ndarray:
    """Random K-quant blocks whose f16 scales (d, and dmin where the format has it) are small,
    so the weights stay within about +-0.1."""
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(shape[0] * shape[1] // block, block_bytes), dtype=np.uint8)
    n = len(blocks)
    if qtype == Q.Q6_K:  # ..., int8 scales[16], f16 d (last)
        blocks[:, -2:] = rng.uniform(1e-5, 2e-5, n).astype(np.float16).view(np.uint8).reshape(n, 2)
    else:  # Q4_K, Q5_K: f16 d, f16 dmin, ...
        blocks[:, 0:2] = rng.uniform(5e-5, 1e-4, n).astype(np.float16).view(np.uint8).reshape(n, 2)
        blocks[:, 2:4] = rng.uniform(0, 1e-3, n).astype(np.float16).view(np.uint8).reshape(n, 2)
    return blocks.reshape(shape[0], -1)


def write_llama_gguf(hf_dir: str, path: str, weight_type: Callable[[str], GGMLQuantizationType],
                     seed: int = 0) -> None:
    """`weight_type(gguf_name)` picks each 2-D weight's type."""
    with open(os.path.join(hf_dir, "config.json")) as f:
        config = json.load(f)
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config["hidden_size"] // n_head
    writer = GGUFWriter(path, "llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(1)  # "mostly F16": informational only
    _add_tokenizer(writer, hf_dir, config)
    rng = np.random.default_rng(seed)
    for hf_name, w in load_file(os.path.join(hf_dir, "model.safetensors")).items():
        name = gguf_name(hf_name)
        if name.endswith("attn_q.weight"):
            w = llama_cpp_permute(w, n_head)
        elif name.endswith("attn_k.weight"):
            w = llama_cpp_permute(w, n_kv)
        qtype = Q.F32 if w.ndim == 1 else weight_type(name)
        if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
            writer.add_tensor(name, random_blocks(w.shape, qtype, rng), raw_dtype=qtype)
        elif qtype in (Q.F32, Q.F16):
            writer.add_tensor(name, w.astype(np.float32 if qtype == Q.F32 else np.float16))
        else:
            writer.add_tensor(name, quants.quantize(w.astype(np.float32), qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_tokenizer(writer: GGUFWriter, hf_dir: str, config: dict) -> None:
    """A byte-level BPE tokenizer as llama.cpp stores it ("gpt2"): tokens by id, merges as
    "a b" strings, special tokens typed CONTROL."""
    with open(os.path.join(hf_dir, "tokenizer.json")) as f:
        tokenizer = json.load(f)
    template_file = os.path.join(hf_dir, "chat_template.jinja")  # where transformers 5 saves it
    chat_template = open(template_file).read() if os.path.isfile(template_file) else None
    vocab = dict(tokenizer["model"]["vocab"])
    special = {t["content"] for t in tokenizer["added_tokens"] if t["special"]}
    vocab.update({t["content"]: t["id"] for t in tokenizer["added_tokens"]})
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    tokens += [f"[PAD{i}]" for i in range(len(tokens), config["vocab_size"])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([TokenType.CONTROL if t in special else TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_add_bos_token(False)
    if chat_template:
        writer.add_chat_template(chat_template)
