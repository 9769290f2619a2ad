"""Bad input raises ValueError naming the value and the limit; other requests are unharmed."""

from __future__ import annotations

import pytest

from zllm import LLM, EngineConfig, SamplingParams
from tests.conftest import PROMPTS


@pytest.fixture(scope="module")
def llm(gqa_model):
    with LLM(gqa_model, device="cpu", max_model_len=64) as llm:
        yield llm


@pytest.mark.parametrize("prompt, message", [
    ("", "prompt is empty"),
    ([], "prompt is empty"),
    (list(range(70)), "maximum context length is 64 tokens. However, you requested 86 tokens "
                      "(70 in the messages, 16 in the completion)"),
    (list(range(60)), "you requested 76 tokens (60 in the messages, 16 in the completion)"),
    ([5, 384, 7], "prompt token id 384 at position 1 is outside the vocabulary [0, 384)"),
    ([-1], "prompt token id -1 at position 0 is outside the vocabulary"),
])
def test_bad_prompts_are_rejected_and_others_finish(llm, prompt, message):
    engine = llm.engine
    engine.add_request("good", PROMPTS[1], SamplingParams(temperature=0, max_tokens=6))
    with pytest.raises(ValueError) as err:
        engine.add_request("bad", prompt, SamplingParams())
    assert message in str(err.value)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert [o.request_id for o in outputs] == ["good"]
    expected = llm.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    assert outputs[0].outputs[0].token_ids == expected[0].outputs[0].token_ids


def test_generate_validates_every_prompt_before_queueing_any(llm):
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate([PROMPTS[0], ""], SamplingParams(max_tokens=4), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.5), "temperature = -0.5 is out of range: must be >= 0"),
    (dict(top_p=0.0), "top_p = 0.0 is out of range: must be in (0, 1]"),
    (dict(top_p=1.5), "top_p = 1.5"),
    (dict(top_k=-2), "top_k = -2"),
    (dict(n=0), "n = 0 is out of range: must be >= 1"),
    (dict(max_tokens=0), "max_tokens = 0 is out of range: must be >= 1"),
    (dict(logprobs=21), "logprobs = 21 is out of range: must be in [0, 20]"),
    (dict(min_tokens=20, max_tokens=10), "min_tokens = 20"),
    (dict(seed=2**63), "seed = 9223372036854775808 is out of range: must be a signed 64-bit"),
    (dict(seed=-2**63 - 1), "seed = -9223372036854775809 is out of range"),
    (dict(temperature=float("inf")), "temperature = inf is out of range: must be >= 0 and finite"),
    (dict(top_p=float("nan")), "top_p = nan"),
    (dict(stop=["x"] * 17), "stop = '17 strings' is out of range: must be at most 16 strings"),
    (dict(stop=["x" * 257]), "must be non-empty strings of at most 256 characters"),
    (dict(stop_token_ids=["2"]), "stop_token_ids = ['2'] is out of range"),
    (dict(n=True), "n = True"),
])
def test_bad_sampling_params_name_value_and_limit(kwargs, message):
    with pytest.raises(ValueError) as err:
        SamplingParams(**kwargs)
    assert message in str(err.value)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n=129), "n = 129 is larger than max_n = 128 samples per request"),
    (dict(top_k=385), "top_k = 385 is larger than the vocabulary (384 tokens)"),
    (dict(max_tokens=2**64), "max_tokens = 18446744073709551616 must be less than this model's "
                             "maximum context length, 64 tokens"),
    (dict(max_tokens=None, min_tokens=2**64), "min_tokens = 18446744073709551616 must be less"),
    (dict(stop_token_ids=[2**64]), "stop token id 18446744073709551616 is outside the vocabulary"),
    (dict(logit_bias={2**64: 1.0}), "logit_bias token id 18446744073709551616 is outside"),
])
def test_limits_of_the_model_and_config_are_checked_before_queueing(llm, kwargs, message):
    with pytest.raises(ValueError) as err:
        llm.generate(["Hello"], SamplingParams(**kwargs), use_tqdm=False)
    assert message in str(err.value)
    assert not llm.engine.has_unfinished_requests()


def test_every_number_validation_lets_through_survives_the_wire(llm):
    """The largest accepted values travel to the engine core and the workers as msgpack: the
    last sample's seed wraps around instead of leaving the signed 64-bit range."""
    params = SamplingParams(n=2, seed=2**63 - 1, top_k=384, max_tokens=3, ignore_eos=True,
                            logprobs=20, stop_token_ids=[383], logit_bias={383: -100.0})
    (out,) = llm.generate(["Hello"], params, use_tqdm=False)
    assert [len(o.token_ids) for o in out.outputs] == [3, 3]
    low = llm.generate(["Hello"], SamplingParams(seed=-2**63, max_tokens=2), use_tqdm=False)
    assert len(low[0].outputs[0].token_ids) >= 1
    with pytest.raises(ValueError, match=r"priority 9223372036854775808 must be an integer in \[-9223372036854775808, "):
        llm.engine.add_request("p", "Hello", SamplingParams(), priority=2**63)


def test_max_n_is_a_config_key(gqa_model):
    with LLM(gqa_model, device="cpu", max_model_len=64, max_n=2, num_kv_blocks=16) as small:
        with pytest.raises(ValueError, match="n = 3 is larger than max_n = 2"):
            small.generate(["Hello"], SamplingParams(n=3), use_tqdm=False)
        assert len(small.generate(["Hello"], SamplingParams(n=2, max_tokens=2),
                                  use_tqdm=False)[0].outputs) == 2
    with pytest.raises(ValueError, match="'max_n' = 0 is not allowed: must be >= 1"):
        EngineConfig.from_dict({"max_n": 0})


def test_unknown_yaml_key_is_rejected(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  model: demo\ncache:\n  blok_size: 16\n")
    with pytest.raises(ValueError, match="unknown config key 'blok_size' in section 'cache'"):
        EngineConfig.from_yaml(str(path))
    path.write_text("max_num_seq: 4\n")
    with pytest.raises(ValueError, match="unknown config key 'max_num_seq'"):
        EngineConfig.from_yaml(str(path))


@pytest.mark.parametrize("values, message", [
    ({"block_size": 3}, "'block_size' = 3 is not allowed: must be a power of two"),
    ({"dtype": "float64"}, "'dtype' = 'float64' is not allowed"),
    ({"max_num_seqs": "many"}, "'max_num_seqs' = 'many' must be of type int"),
    ({"gpu_memory_utilization": 1.5}, "'gpu_memory_utilization' = 1.5"),
    ({"async_steps_ahead": 0}, "'async_steps_ahead' = 0 is not allowed: must be from 1 to 4"),
    ({"async_steps_ahead": 2}, "'async_steps_ahead' = 2 is not allowed: must be 1 without "
                               "async_scheduling"),
    ({"gated_mlp_max_rows": -1}, "'gated_mlp_max_rows' = -1 is not allowed: must be >= 0"),
    ({"gated_mlp_tma_max_rows": 64}, "'gated_mlp_tma_max_rows' = 64 is not allowed: must be 0 "
     "(off) or >= 128"),
])
def test_bad_config_values_name_key_value_and_limit(values, message):
    with pytest.raises(ValueError) as err:
        EngineConfig.from_dict(values)
    assert message in str(err.value)


def test_yaml_sections_flat_keys_and_overrides(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("model:\n  model: demo\n  dtype: float32\nblock_size: 8\n"
                    "scheduler:\n  max_num_seqs: 4\n")
    config = EngineConfig.from_yaml(str(path), max_num_seqs="6")
    assert (config.model.dtype, config.cache.block_size, config.scheduler.max_num_seqs) == ("float32", 8, 6)


def test_every_shipped_config_loads():
    import glob

    paths = glob.glob("configs/*.yaml")
    assert paths
    for path in paths:
        EngineConfig.from_yaml(path)


def test_missing_model_directory_or_weights(tmp_path):
    with pytest.raises(ValueError, match="model path '/nonexistent/llama' does not exist"):
        LLM("/nonexistent/llama", device="cpu")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="has no weights"):
        LLM(str(tmp_path), device="cpu")


def test_max_model_len_beyond_the_model_is_rejected(gqa_model):
    with pytest.raises(ValueError, match="'max_model_len' = 5000 is larger than the model's "
                                         "max_position_embeddings \\(2048\\)"):
        LLM(gqa_model, device="cpu", max_model_len=5000)
