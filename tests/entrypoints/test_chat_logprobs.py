"""Chat `logprobs` / `top_logprobs` over HTTP carry the values of Hugging Face's own forward pass
on the prompt that the tokenizer's chat template gives."""

from __future__ import annotations

import pytest
import torch

from tests.entrypoints.conftest import MODEL_NAME

MAX_TOKENS, TOP = 6, 3


def _hf_logprobs(hf, model_dir: str, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
    """Log-probabilities over the vocabulary at each output position (one forward pass)."""
    ids = torch.tensor([prompt_ids + output_ids])
    with torch.no_grad():
        logits = hf.model(model_dir)(ids).logits[0].float()
    start = len(prompt_ids) - 1
    return torch.log_softmax(logits[start:start + len(output_ids)], dim=-1)


def test_chat_logprobs_and_top_logprobs_equal_transformers(openai_client, gqa_model, hf):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gqa_model)
    messages = [{"role": "user", "content": "Hello there, how are you?"}]
    out = openai_client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=MAX_TOKENS, temperature=0, logprobs=True,
        top_logprobs=TOP, extra_body={"ignore_eos": True}).choices[0]
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    prompt_ids = list(prompt_ids["input_ids"] if hasattr(prompt_ids, "keys") else prompt_ids)
    output_ids = hf.greedy(gqa_model, prompt_ids, MAX_TOKENS)
    reference = _hf_logprobs(hf, gqa_model, prompt_ids, output_ids)
    assert len(out.logprobs.content) == MAX_TOKENS
    for step, (entry, token_id) in enumerate(zip(out.logprobs.content, output_ids)):
        text = tokenizer.decode([token_id])
        if "\ufffd" not in text:  # a whole character: the token's own text
            assert entry.token == text, step
        assert entry.logprob == pytest.approx(reference[step, token_id].item(), abs=1e-3), step
        top = torch.topk(reference[step], TOP)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(),
                                                                         abs=1e-3), step
        for t, top_id in zip(entry.top_logprobs, top.indices.tolist()):
            if "\ufffd" not in tokenizer.decode([top_id]):
                assert t.token == tokenizer.decode([top_id]), step
