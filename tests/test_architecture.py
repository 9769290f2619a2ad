"""config.json -> ModelArchitecture: each family's fields as Hugging Face means them, and the errors
that stop an unsupported model or tensor-parallel size before any worker (or Ray) starts."""

from __future__ import annotations

import json
import shutil

import pytest

from zllm import LLM
from zllm.architecture import FULL, SLIDING, ModelArchitecture

# Real config.json files (fields that matter here), from the Hugging Face hub.
QWEN25_7B = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584, "intermediate_size": 18944,
             "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
             "max_window_layers": 28, "rope_theta": 1000000.0, "sliding_window": 131072,
             "use_sliding_window": False, "tie_word_embeddings": False, "vocab_size": 152064}
QWEN3_8B = {"architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "head_dim": 128,
            "hidden_size": 4096, "intermediate_size": 12288, "max_position_embeddings": 40960,
            "max_window_layers": 36, "num_attention_heads": 32, "num_hidden_layers": 36,
            "num_key_value_heads": 8, "rope_scaling": None, "rope_theta": 1000000,
            "sliding_window": None, "use_sliding_window": False, "vocab_size": 151936}
MISTRAL_7B_V01 = {"architectures": ["MistralForCausalLM"], "hidden_size": 4096,
                  "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32,
                  "num_key_value_heads": 8, "rope_theta": 10000.0, "sliding_window": 4096,
                  "vocab_size": 32000}
GEMMA2_2B = {"architectures": ["Gemma2ForCausalLM"], "attn_logit_softcapping": 50.0,
             "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
             "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304,
             "intermediate_size": 9216, "num_attention_heads": 8, "num_hidden_layers": 26,
             "num_key_value_heads": 4, "query_pre_attn_scalar": 256, "sliding_window": 4096,
             "vocab_size": 256000}
GEMMA3_1B = {"architectures": ["Gemma3ForCausalLM"], "head_dim": 256,
             "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152,
             "intermediate_size": 6912, "num_attention_heads": 4, "num_hidden_layers": 26,
             "num_key_value_heads": 1, "query_pre_attn_scalar": 256, "rope_local_base_freq": 10000,
             "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 512,
             "sliding_window_pattern": 6, "vocab_size": 262144}


def test_qwen_window_is_off_unless_use_sliding_window():
    arch = ModelArchitecture.from_hf_config(QWEN25_7B)
    assert (arch.qkv_bias, arch.o_bias, arch.qk_norm) == (True, False, False)
    assert arch.sliding_windows == (None,)
    on = ModelArchitecture.from_hf_config({**QWEN25_7B, "use_sliding_window": True,
                                           "max_window_layers": 20})
    assert on.layer_types == [FULL] * 20 + [SLIDING] * 8
    assert on.sliding_windows == (None, 131072)


def test_qwen3_has_qk_norm_and_no_bias():
    arch = ModelArchitecture.from_hf_config(QWEN3_8B)
    assert (arch.qkv_bias, arch.o_bias, arch.qk_norm) == (False, False, True)
    assert (arch.head_dim, arch.rope_theta, arch.sliding_windows) == (128, 1e6, (None,))


def test_mistral_window_applies_to_every_layer():
    arch = ModelArchitecture.from_hf_config(MISTRAL_7B_V01)
    assert arch.layer_types == [SLIDING] * 32 and arch.sliding_windows == (4096,)
    assert (arch.head_dim, arch.qkv_bias) == (128, False)


def test_gemma2_alternates_windows_and_soft_caps():
    arch = ModelArchitecture.from_hf_config(GEMMA2_2B)
    assert arch.layer_types[:3] == [SLIDING, FULL, SLIDING]
    assert (arch.attn_logit_softcap, arch.final_logit_softcap) == (50.0, 30.0)
    assert arch.attn_scale == 256 ** -0.5 and arch.hidden_act == "gelu_pytorch_tanh"
    assert arch.tie_word_embeddings and not arch.qk_norm


def test_gemma3_old_config_format():
    arch = ModelArchitecture.from_hf_config(GEMMA3_1B)
    assert arch.layer_types[:6] == [SLIDING] * 5 + [FULL]
    assert (arch.rope_theta, arch.sliding_rope_theta, arch.sliding_window) == (1e6, 1e4, 512)
    assert arch.qk_norm and arch.attn_logit_softcap is None


@pytest.mark.parametrize("config, tp, message", [
    (QWEN3_8B, 3, "'tensor_parallel_size' = 3 does not divide the model's num_attention_heads = 32"),
    (QWEN25_7B, 8, "'tensor_parallel_size' = 8 does not divide the model's num_attention_heads = 28"),
    ({**QWEN3_8B, "num_key_value_heads": 6}, 4, "num_key_value_heads = 6"),
    ({**MISTRAL_7B_V01, "vocab_size": 32001}, 2, "vocab_size = 32001"),
])
def test_tensor_parallel_size_must_split_the_model_evenly(config, tp, message):
    with pytest.raises(ValueError, match=message):
        ModelArchitecture.from_hf_config(config).check_tensor_parallel(tp)


def test_unsupported_rope_scaling_is_rejected():
    config = {**QWEN3_8B, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(ValueError, match="rope scaling type 'yarn' is not supported"):
        ModelArchitecture.from_hf_config(config)


def _with_config(src: str, dst, **changes) -> str:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, **changes}))
    return str(dst)


def test_unsupported_architecture_fails_fast_naming_the_supported(gqa_model, tmp_path):
    path = _with_config(gqa_model, tmp_path / "m", architectures=["MambaForCausalLM"])
    with pytest.raises(ValueError, match=r"'MambaForCausalLM' is not supported; supported are: "
                                         r"LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        LLM(path, device="cpu")


def test_bad_tensor_parallel_size_fails_before_ray_starts(gqa_model):
    import ray

    assert not ray.is_initialized()
    with pytest.raises(ValueError, match="'tensor_parallel_size' = 3 does not divide the model's "
                                         "num_attention_heads = 4"):
        LLM(gqa_model, device="cpu", tensor_parallel_size=3, distributed_executor_backend="ray")
    assert not ray.is_initialized()
