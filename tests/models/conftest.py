"""Tiny random checkpoints of every supported family, made with transformers' own config classes.

Each is small (2 to 4 layers, hidden size 64 to 96) but keeps what sets its family apart; the
prompts (tests/conftest.py) run up to 25 tokens, so every sliding window here is shorter than most
of them and generation decodes past it.
"""

from __future__ import annotations

from typing import Callable

import pytest

_SHAPE = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              bos_token_id=0, eos_token_id=1)


def family_configs() -> dict[str, object]:
    from transformers import (Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig,
                              Qwen2Config, Qwen3Config)

    return {
        # SmolLM2's shape: 3 query heads sharing one KV head, tied embeddings, no rope scaling.
        "smollm2": LlamaConfig(**{**_SHAPE, "hidden_size": 96, "num_attention_heads": 3,
                                  "num_key_value_heads": 1}, rope_theta=100000.0,
                               tie_word_embeddings=True),
        "mistral": MistralConfig(**_SHAPE, sliding_window=8, tie_word_embeddings=False),
        # QKV bias, tied embeddings; the sliding window on in layers >= max_window_layers only.
        "qwen2": Qwen2Config(**_SHAPE, tie_word_embeddings=True, use_sliding_window=True,
                             sliding_window=6, max_window_layers=1),
        # q/k norms, untied, head_dim 32 != hidden_size / heads.
        "qwen3": Qwen3Config(**_SHAPE, head_dim=32, tie_word_embeddings=False),
        # Alternating windows, soft-capped scores (a small cap, so it bites) and logits.
        "gemma2": Gemma2Config(**{**_SHAPE, "num_hidden_layers": 4}, head_dim=16,
                               query_pre_attn_scalar=24, sliding_window=6,
                               attn_logit_softcapping=5.0, final_logit_softcapping=3.0),
        # Two sliding layers with their own RoPE base, then a full one; q/k norms; untied.
        "gemma3": Gemma3TextConfig(**{**_SHAPE, "num_hidden_layers": 3}, head_dim=16,
                                   query_pre_attn_scalar=24, sliding_window=6,
                                   sliding_window_pattern=3, rope_theta=5000.0,
                                   rope_local_base_freq=100.0, tie_word_embeddings=False),
    }


FAMILIES = ("smollm2", "mistral", "qwen2", "qwen3", "gemma2", "gemma3")


@pytest.fixture(scope="session")
def family_checkpoint(tmp_path_factory) -> Callable[[str], str]:
    """family name -> directory of its tiny checkpoint (built once per session)."""
    from zllm.demo import save_random_checkpoint

    built: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in built:
            path = str(tmp_path_factory.mktemp(name))
            save_random_checkpoint(path, family_configs()[name], seed=2)
            built[name] = path
        return built[name]

    return get
