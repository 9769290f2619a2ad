"""zllm's greedy tokens equal Hugging Face transformers' generate, token for token (float32)."""

from __future__ import annotations

import pytest

from zllm import LLM, SamplingParams
from tests.conftest import PROMPTS

MAX_TOKENS = 24


def _check_against_hf(llm: LLM, model_dir: str, hf, max_tokens: int = MAX_TOKENS) -> list:
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert len(outputs) == len(PROMPTS)
    for out in outputs:
        expected = hf.greedy(model_dir, out.prompt_token_ids, max_tokens)
        assert out.outputs[0].token_ids == expected, out.prompt
        reason = "stop" if expected[-1] == 1 and len(expected) < max_tokens else "length"
        assert out.outputs[0].finish_reason == reason
    return outputs


def test_greedy_matches_hf_with_plenty_of_blocks(gqa_model, hf):
    with LLM(gqa_model, device="cpu") as llm:
        _check_against_hf(llm, gqa_model, hf)
        assert llm.stats().num_preemptions == 0


def test_preemption_keeps_greedy_output(gqa_model, hf):
    # 8 requests of up to ~40 tokens each need far more than 24 blocks of 4 tokens.
    with LLM(gqa_model, device="cpu", block_size=4, num_kv_blocks=24, max_model_len=96,
             watermark=0.0) as llm:
        _check_against_hf(llm, gqa_model, hf)
        assert llm.stats().num_preemptions > 0
        assert llm.stats().num_free_blocks == 24  # everything given back


def test_split_token_budget_keeps_greedy_output(gqa_model, hf):
    # A 7-token budget splits prompts across steps (chunked prefill) and mixes them with decodes.
    with LLM(gqa_model, device="cpu", max_num_batched_tokens=7, max_num_seqs=3) as llm:
        _check_against_hf(llm, gqa_model, hf)


def test_tied_embeddings_without_gqa_match_hf(tied_model, hf):
    with LLM(tied_model, device="cpu") as llm:
        _check_against_hf(llm, tied_model, hf)


def test_sharded_safetensors_index_loads(gqa_model, tmp_path, hf):
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(gqa_model).save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (sharded / name).write_bytes(open(f"{gqa_model}/{name}", "rb").read())
    with LLM(str(sharded), device="cpu") as llm:
        _check_against_hf(llm, gqa_model, hf)


@pytest.mark.parametrize("prompt_as_ids", [False, True])
def test_token_id_prompts_equal_text_prompts(gqa_model, hf, prompt_as_ids):
    """A prompt given as text or as the Hugging Face tokenizer's ids for it: either way, the same
    prompt ids, HF's greedy tokens and the tokenizer's decoding of them."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gqa_model)
    texts = PROMPTS[:3]
    ids = [tokenizer(t)["input_ids"] for t in texts]
    with LLM(gqa_model, device="cpu", engine_process=False) as llm:
        outputs = llm.generate(ids if prompt_as_ids else texts,
                               SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    for out, text, prompt_ids in zip(outputs, texts, ids):
        assert out.prompt == (None if prompt_as_ids else text)
        assert out.prompt_token_ids == prompt_ids
        expected = hf.greedy(gqa_model, prompt_ids, 8)
        assert out.outputs[0].token_ids == expected
        assert out.outputs[0].text == tokenizer.decode(expected, skip_special_tokens=True)
