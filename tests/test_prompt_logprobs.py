"""SamplingParams.prompt_logprobs (vLLM's extension): each prompt token's log-probability, rank
and the top-N at its position equal Hugging Face's forward pass (float32), whatever splits or
repeats the prompt's computation: chunked prefill, the prefix cache, n samples, preemption."""

from __future__ import annotations

import pytest
import torch

from zllm import LLM, SamplingParams
from tests.conftest import PROMPTS

TOP = 3


def _hf_logprobs(hf, model_dir: str, prompt_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = hf.model(model_dir)(torch.tensor([prompt_ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)  # [position, vocab]: the next token's


def check_prompt_logprobs(outputs, hf, model_dir: str, top: int = TOP) -> None:
    for out in outputs:
        ids, scored = out.prompt_token_ids, out.prompt_logprobs
        assert len(scored) == len(ids) and scored[0] is None, out.prompt
        assert len(out.prompt_token_ranks) == len(ids) and out.prompt_token_ranks[0] is None
        expected = _hf_logprobs(hf, model_dir, ids)
        for i in range(1, len(ids)):
            row = expected[i - 1]
            want_top = dict(zip(*(t.tolist() for t in reversed(row.topk(top)))))
            want = {**want_top, ids[i]: row[ids[i]].item()}
            assert scored[i].keys() == want.keys(), (out.prompt, i)
            assert all(abs(scored[i][t] - lp) < 1e-4 for t, lp in want.items()), (out.prompt, i)
            assert out.prompt_token_ranks[i] == int((row > row[ids[i]]).sum()) + 1


@pytest.fixture(scope="module")
def llm(gqa_model):
    # A 7-token budget splits every prompt over several steps (chunked prefill).
    with LLM(gqa_model, device="cpu", max_num_batched_tokens=7, max_num_seqs=3) as llm:
        yield llm


def test_prompt_logprobs_equal_transformers_across_prefill_chunks(llm, gqa_model, hf):
    params = SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=TOP)
    check_prompt_logprobs(llm.generate(PROMPTS, params, use_tqdm=False), hf, gqa_model)


def test_the_prefix_cache_does_not_cut_the_scored_prompt(llm, gqa_model, hf):
    plain = SamplingParams(temperature=0, max_tokens=2)
    llm.generate(PROMPTS[:2], plain, use_tqdm=False)  # the prompts' blocks are now cached
    scored = llm.generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=2,
                                                      prompt_logprobs=0), use_tqdm=False)
    check_prompt_logprobs(scored, hf, gqa_model, top=0)
    assert all(o.num_cached_tokens == 0 for o in scored)


def test_n_samples_share_one_scored_prompt_and_stream_it_first(llm, gqa_model, hf):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=3, prompt_logprobs=1)
    (out,) = llm.generate(PROMPTS[:1], params, use_tqdm=False)
    check_prompt_logprobs([out], hf, gqa_model, top=1)
    assert len(out.outputs) == 3
    llm.engine.add_request("streamed", PROMPTS[0], params, stream=True)
    updates = []
    while llm.engine.has_unfinished_requests():
        updates += llm.engine.step()
    assert updates[0].prompt_logprobs == out.prompt_logprobs  # the first update carries them
    assert all(u.prompt_logprobs is None for u in updates[1:])


def test_prompt_logprobs_survive_preemption_by_recompute(gqa_model, hf):
    # 8 requests of up to ~40 tokens each need far more than 24 blocks of 4 tokens.
    with LLM(gqa_model, device="cpu", block_size=4, num_kv_blocks=24, max_model_len=96,
             watermark=0.0) as llm:
        params = SamplingParams(temperature=0, max_tokens=24, prompt_logprobs=2)
        outputs = llm.generate(PROMPTS, params, use_tqdm=False)
        assert llm.stats().num_preemptions > 0
    check_prompt_logprobs(outputs, hf, gqa_model, top=2)


def test_prompt_logprobs_are_bounded_like_logprobs():
    for bad in (-1, 21, 2.5, True):
        with pytest.raises(ValueError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)
