"""The built-in `tiny-random` model: a tiny Llama with random weights and a locally trained
tokenizer.

Nothing is downloaded. The model is written on first use into ~/.cache/zllm (or $ZLLM_CACHE_DIR)
as an ordinary Hugging Face directory, so every loading path is the real one. Its text is random:
it exists so that every part of zllm runs end to end with nothing to download or install. Tests
build their own variants with the same functions. (The default model, `smollm2`, is a real one:
see zllm/model_files.py.)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Optional

DEMO_VERSION = "1"

SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eot_id|>"]

# A Llama 3 style chat template.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# Training text for the demo tokenizer: a little English and some multi-byte characters, so that
# merges and byte fallbacks both occur.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! Hello there. How are you today?",
    "A paged KV cache stores keys and values in fixed-size blocks.",
    "The scheduler picks running and waiting requests under a token budget.",
    "Tensor parallelism splits every layer across several devices.",
    "Once upon a time, in a land far away, there lived a small language model.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Symbols: + - * / = ( ) [ ] { } < >.",
    "Café, naïve, über, señor, 東京, 你好, こんにちは, 🙂 🚀 ✨.",
]


def cache_dir() -> str:
    return os.environ.get("ZLLM_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "zllm"))


def ensure_demo_model() -> str:
    """Path of the tiny-random model, building it on first use (atomically, so parallel runs
    agree)."""
    path = os.path.join(cache_dir(), f"demo-llama-v{DEMO_VERSION}")
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return path
    os.makedirs(cache_dir(), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="demo-", dir=cache_dir())
    try:
        build_tiny_llama(tmp)
        try:
            os.rename(tmp, path)
        except OSError:  # another process finished first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def build_tokenizer(path: str, vocab_size: int = 384) -> None:
    """Train a byte-level BPE tokenizer on the built-in text and save it for AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                   eos_token="<|end_of_text|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)


def build_tiny_llama(path: str, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                     num_kv_heads: int = 2, intermediate_size: int = 128, vocab_size: int = 384,
                     tie_word_embeddings: bool = False, max_position_embeddings: int = 2048,
                     rope_scaling: Optional[dict] = None, rope_theta: float = 500000.0,
                     seed: int = 0, std: float = 0.05, dtype: str = "float32",
                     tokenizer: bool = True) -> None:
    """Write a random Llama (safetensors + config.json) and, optionally, the demo tokenizer.

    Weights come from a seeded generator, so the same arguments give the same model whatever the
    transformers version. vocab_size must be at least the tokenizer's size (384).
    """
    from transformers import LlamaConfig

    from zllm.architecture import llama3_rope_scaling

    if rope_scaling is None:
        rope_scaling = llama3_rope_scaling(original_max_position_embeddings=256)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5, rope_theta=rope_theta, rope_scaling=rope_scaling,
        tie_word_embeddings=tie_word_embeddings, bos_token_id=0, eos_token_id=1,
    )
    save_random_checkpoint(path, config, seed=seed, std=std, dtype=dtype, tokenizer=tokenizer)


def save_random_checkpoint(path: str, config, *, seed: int = 0, std: float = 0.05,
                           dtype: str = "float32", tokenizer: bool = True) -> None:
    """Write a random model of any transformers config class (safetensors + config.json) and,
    optionally, the demo tokenizer (the config's vocab_size must be at least its 384 tokens).

    Weights come from a seeded generator, so the same arguments give the same model whatever the
    transformers version: N(0, std) everywhere, except norm weights, which get 0.1 * N(0, 1)
    added to their initial value (1 for x * w norms, 0 for Gemma's x * (1 + w)).
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.add_(0.1 * noise)
            else:
                param.copy_(std * noise)
    model.to(getattr(torch, dtype)).save_pretrained(path)
    if tokenizer:
        build_tokenizer(path)
