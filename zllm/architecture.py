"""What network a model directory holds: its family and shapes, from config.json or Meta's params.json.

Shared by the engine (context length, vocabulary, KV sizing, and the checks below, all made before
any worker starts) and the workers (building the network). The engine never imports model code:
the registry here maps each supported `architectures` name to the dotted path of its model class,
and only a worker imports that path.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

# `architectures` in config.json -> the class that runs it. Llama, Mistral, Qwen2 and Qwen3 share
# one decoder (zllm/worker/models/llama.py): they differ only in what this file reads from their
# configs (QKV bias, q/k norms, sliding windows). Gemma's block is different and has its own file.
MODEL_CLASSES: dict[str, str] = {
    "LlamaForCausalLM": "zllm.worker.models.llama.LlamaForCausalLM",
    "MistralForCausalLM": "zllm.worker.models.llama.LlamaForCausalLM",
    "Qwen2ForCausalLM": "zllm.worker.models.llama.LlamaForCausalLM",
    "Qwen3ForCausalLM": "zllm.worker.models.llama.LlamaForCausalLM",
    "Gemma2ForCausalLM": "zllm.worker.models.gemma.GemmaForCausalLM",
    "Gemma3ForCausalLM": "zllm.worker.models.gemma.GemmaForCausalLM",
}

# For configs written without `architectures` (old or hand-made ones).
_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                  "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}

ROPE_TYPES = ("default", "linear", "llama3")


def llama3_rope_scaling(factor: float = 8.0,
                        original_max_position_embeddings: int = 8192) -> dict[str, Any]:
    """Llama 3.1's RoPE scaling as Hugging Face writes it (the defaults are Llama 3.1's, and
    the constants Meta's reference code applies with use_scaled_rope)."""
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": original_max_position_embeddings}
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
FULL, SLIDING = "full_attention", "sliding_attention"  # Hugging Face's names of the layer types


@dataclass
class ModelArchitecture:
    """The network's hyperparameters, in one vocabulary for every family (Hugging Face's
    meaning, zllm's names). Fields after `eos_token_ids` default to plain Llama."""

    architecture: str  # the `architectures` name: picks the model class
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Optional[dict[str, Any]]
    tie_word_embeddings: bool
    max_position_embeddings: int
    torch_dtype: Optional[str]
    eos_token_ids: list[int]
    qkv_bias: bool = False  # Qwen2: biases on q/k/v (not on o)
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each head of q and k, before RoPE
    # A query at position p sees keys p - sliding_window + 1 .. p, in the layers whose type is
    # SLIDING (Mistral: all of them; Qwen: those from max_window_layers on; Gemma: alternating).
    sliding_window: Optional[int] = None
    layer_types: list[str] = field(default_factory=list)  # FULL or SLIDING per layer
    hidden_act: str = "silu"  # of the gated MLP: silu (SwiGLU) or gelu_pytorch_tanh (GeGLU)
    attn_scale: Optional[float] = None  # softmax scale; None: head_dim ** -0.5
    attn_logit_softcap: Optional[float] = None  # Gemma 2: cap * tanh(score / cap)
    final_logit_softcap: Optional[float] = None
    sliding_rope_theta: Optional[float] = None  # Gemma 3: RoPE base of the sliding layers

    def __post_init__(self) -> None:
        if not self.layer_types:
            kind = SLIDING if self.sliding_window else FULL
            self.layer_types = [kind] * self.num_layers

    def layer_window(self, layer: int) -> Optional[int]:
        """The sliding window of `layer` (None: it attends to the whole sequence)."""
        return self.sliding_window if self.layer_types[layer] == SLIDING else None

    @property
    def sliding_windows(self) -> tuple[Optional[int], ...]:
        """The distinct windows of the layers: the attention backend plans each once a step."""
        return tuple(sorted({self.layer_window(i) for i in range(self.num_layers)},
                            key=lambda w: -1 if w is None else w))

    def check_tensor_parallel(self, tp_size: int) -> None:
        """Raise ValueError unless every rank can hold an equal shard (whole heads each)."""
        for name, total in (("num_attention_heads", self.num_heads),
                            ("intermediate_size", self.intermediate_size),
                            ("vocab_size", self.vocab_size)):
            if total % tp_size:
                raise ValueError(f"config key 'tensor_parallel_size' = {tp_size} does not divide the "
                                 f"model's {name} = {total} ({self.architecture}): use a divisor of it")
        kv = self.num_kv_heads
        if kv % tp_size and tp_size % kv:
            raise ValueError(f"config key 'tensor_parallel_size' = {tp_size} and the model's "
                             f"num_key_value_heads = {kv} ({self.architecture}): one must divide the "
                             f"other (KV heads are split, or replicated when there are fewer)")

    @classmethod
    def from_model_dir(cls, path: str) -> "ModelArchitecture":
        """From config.json, Meta's params.json, or a GGUF file's metadata (`path` may be the
        .gguf file itself)."""
        from zllm.gguf_file import find_gguf_file, gguf_hf_config
        from zllm.model_files import meta_vocab_size

        hf_config = os.path.join(path, "config.json")
        meta_params = os.path.join(path, "params.json")
        if os.path.isfile(hf_config):
            arch = cls.from_hf_config(_read_json(hf_config))
        elif os.path.isfile(meta_params):
            params = _read_json(meta_params)
            if params.get("vocab_size", -1) <= 0:  # Llama 2 writes -1
                params["vocab_size"] = meta_vocab_size(path)
            arch = cls.from_meta_params(params)
        elif find_gguf_file(path):
            return cls.from_hf_config(gguf_hf_config(find_gguf_file(path)))
        else:
            raise ValueError(f"model directory {path!r} has none of config.json, params.json "
                             f"or a .gguf file")
        generation_config = os.path.join(path, "generation_config.json")
        if os.path.isfile(generation_config):
            eos = _read_json(generation_config).get("eos_token_id")
            if eos is not None:
                arch.eos_token_ids = [eos] if isinstance(eos, int) else list(eos)
        return arch

    @classmethod
    def from_hf_config(cls, c: dict[str, Any]) -> "ModelArchitecture":
        name = architecture_name(c)
        heads = c["num_attention_heads"]
        eos = c.get("eos_token_id")
        theta, scaling, sliding_theta = _rope(c)
        act = c.get("hidden_activation") or c.get("hidden_act") or "silu"
        if act not in ACTIVATIONS:
            raise ValueError(f"model activation {act!r} is not supported (supported: {ACTIVATIONS})")
        gemma = name.startswith("Gemma")
        qwen2 = name == "Qwen2ForCausalLM"
        bias = bool(c.get("attention_bias", False))
        window, layer_types = _sliding_layers(name, c)
        scalar = c.get("query_pre_attn_scalar") if gemma else None
        return cls(
            architecture=name,
            hidden_size=c["hidden_size"],
            num_layers=c["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            intermediate_size=c["intermediate_size"],
            vocab_size=c["vocab_size"],
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(c.get("tie_word_embeddings", gemma)),
            max_position_embeddings=c.get("max_position_embeddings", 2048),
            torch_dtype=c.get("torch_dtype") or c.get("dtype"),
            eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
            qkv_bias=qwen2 or bias,
            o_bias=bias and not qwen2,
            mlp_bias=bool(c.get("mlp_bias", False)),
            qk_norm=name in ("Qwen3ForCausalLM", "Gemma3ForCausalLM"),
            sliding_window=window,
            layer_types=layer_types,
            hidden_act=act,
            attn_scale=float(scalar) ** -0.5 if scalar else None,
            attn_logit_softcap=c.get("attn_logit_softcapping") if gemma else None,
            final_logit_softcap=c.get("final_logit_softcapping") if gemma else None,
            sliding_rope_theta=sliding_theta,
        )

    @classmethod
    def from_meta_params(cls, p: dict[str, Any]) -> "ModelArchitecture":
        dim = p["dim"]
        # Meta's FeedForward sizing (llama/model.py): 2/3 of 4*dim, scaled, rounded up.
        hidden = int(2 * 4 * dim / 3)
        if p.get("ffn_dim_multiplier") is not None:
            hidden = int(p["ffn_dim_multiplier"] * hidden)
        multiple_of = p.get("multiple_of", 256)
        hidden = multiple_of * math.ceil(hidden / multiple_of)
        scaling = None
        if p.get("use_scaled_rope"):
            scaling = llama3_rope_scaling()
        return cls(
            architecture="LlamaForCausalLM",
            hidden_size=dim,
            num_layers=p["n_layers"],
            num_heads=p["n_heads"],
            num_kv_heads=p.get("n_kv_heads") or p["n_heads"],
            head_dim=dim // p["n_heads"],
            intermediate_size=hidden,
            vocab_size=p["vocab_size"],
            rms_norm_eps=p.get("norm_eps", 1e-5),
            rope_theta=float(p.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            tie_word_embeddings=False,
            max_position_embeddings=p.get("max_seq_len", 131072 if scaling else 8192),
            torch_dtype="bfloat16",
            eos_token_ids=[],
        )


def architecture_name(c: dict[str, Any]) -> str:
    """The config's architecture, or ValueError naming it and the supported ones."""
    names = c.get("architectures") or [_BY_MODEL_TYPE.get(c.get("model_type") or "llama",
                                                          f"model_type {c.get('model_type')!r}")]
    if names[0] not in MODEL_CLASSES:
        raise ValueError(f"model architecture {names[0]!r} is not supported; supported are: "
                         f"{', '.join(MODEL_CLASSES)}")
    return names[0]


def _rope(c: dict[str, Any]) -> tuple[float, Optional[dict[str, Any]], Optional[float]]:
    """(theta, scaling of the full-attention layers, theta of the sliding layers if it differs).

    transformers 5 folds rope_theta and rope_scaling into rope_parameters, nested by layer type
    where the types differ (Gemma 3); older configs keep them apart (Gemma 3: rope_local_base_freq).
    """
    params = c.get("rope_parameters") or c.get("rope_scaling") or {}
    sliding_theta = c.get("rope_local_base_freq")
    if FULL in params:
        sliding_theta = params.get(SLIDING, {}).get("rope_theta", sliding_theta)
        params = params[FULL]
    rope = dict(params)
    theta = float(rope.pop("rope_theta", c.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope scaling type {kind!r} is not supported (supported: {ROPE_TYPES})")
    return theta, rope if kind != "default" else None, sliding_theta and float(sliding_theta)


def _sliding_layers(name: str, c: dict[str, Any]) -> tuple[Optional[int], list[str]]:
    """(window, per-layer types) as Hugging Face's config classes derive them."""
    n = c["num_hidden_layers"]
    window = c.get("sliding_window")
    if name in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and not c.get("use_sliding_window"):
        window = None  # Qwen configs carry a window that is off unless use_sliding_window is set
    if not window or name == "LlamaForCausalLM":
        return None, [FULL] * n
    if c.get("layer_types"):
        return window, list(c["layer_types"])
    if name == "MistralForCausalLM":
        return window, [SLIDING] * n
    if name.startswith("Qwen"):
        first = c.get("max_window_layers", n)
        return window, [SLIDING if i >= first else FULL for i in range(n)]
    period = 2 if name == "Gemma2ForCausalLM" else c.get("sliding_window_pattern", 6)
    return window, [SLIDING if (i + 1) % period else FULL for i in range(n)]


def _read_json(path: str) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)
