"""Sampling: seeded reproducibility, batch independence, filters and penalties, stop rules."""

from __future__ import annotations

import pytest
import torch

from zllm import LLM, SamplingParams
from zllm.worker.sampler import (SamplingMetadata, gumbel_noise, masked_by_bitmask, sample,
                                 uniform_from_bits)
from tests.conftest import PROMPTS


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async-scheduling"])
def llm(gqa_model, request):
    # Every rule here must hold as well when steps are scheduled one ahead of their results
    # (a request that stops has computed one extra token, which must not show).
    with LLM(gqa_model, device="cpu", async_scheduling=request.param) as llm:
        yield llm


def _tokens(outputs):
    return [c.token_ids for o in outputs for c in o.outputs]


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=1234)
    alone = llm.generate([PROMPTS[1]], params, use_tqdm=False)
    other = SamplingParams(temperature=0.7, max_tokens=12, seed=7)
    in_batch = llm.generate([PROMPTS[0], PROMPTS[1], PROMPTS[2]], [other, params, other],
                            use_tqdm=False)
    assert _tokens(alone) == [in_batch[1].outputs[0].token_ids]
    assert _tokens(llm.generate([PROMPTS[1]], params, use_tqdm=False)) == _tokens(alone)
    different_seed = llm.generate([PROMPTS[1]], SamplingParams(temperature=1.0, top_p=0.9,
                                                               max_tokens=16, seed=99), use_tqdm=False)
    assert _tokens(different_seed) != _tokens(alone)


def test_top_k_one_equals_greedy(llm):
    greedy = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    top1 = llm.generate(PROMPTS, SamplingParams(temperature=1.5, top_k=1, max_tokens=12, seed=3),
                        use_tqdm=False)
    assert _tokens(top1) == _tokens(greedy)


def test_n_samples_differ_and_follow_their_seeds(llm):
    out = llm.generate([PROMPTS[3]], SamplingParams(n=3, temperature=1.0, max_tokens=10, seed=5),
                       use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    samples = [c.token_ids for c in out.outputs]
    assert len({tuple(s) for s in samples}) > 1
    # Sample i of a seeded request is the request with seed + i.
    single = llm.generate([PROMPTS[3]], SamplingParams(temperature=1.0, max_tokens=10, seed=6),
                          use_tqdm=False)
    assert single[0].outputs[0].token_ids == samples[1]


def test_stop_token_ids_and_stop_strings_end_generation(llm):
    greedy = llm.generate([PROMPTS[4]], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0]
    stop_id = greedy.token_ids[5]
    first = greedy.token_ids.index(stop_id)
    out = llm.generate([PROMPTS[4]], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                    stop_token_ids=[stop_id]), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == greedy.token_ids[:first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_id)

    stop = greedy.text[4:7]
    assert stop and stop.strip()
    out = llm.generate([PROMPTS[4]], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                    stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == greedy.text[:greedy.text.index(stop)]  # stop string not returned

    assert llm.generate([PROMPTS[4]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].finish_reason == "length"


def test_min_tokens_suppresses_stop_tokens(llm):
    greedy = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0]
    stop_id = greedy.token_ids[0]
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=12, min_tokens=4,
                                                    stop_token_ids=[stop_id], ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert stop_id not in out.token_ids[:4]
    assert len(out.token_ids) >= 4


def test_logprobs_are_reported_per_token(llm):
    out = llm.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=5, logprobs=3),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == len(out.token_ids)
    for token, entry in zip(out.token_ids, out.logprobs):
        assert token in entry and len(entry) == 3  # greedy token is the top-1
        assert max(entry.values()) == entry[token] <= 0


def _meta(batch, **kw):
    base = dict(temperature=torch.ones(batch), all_greedy=False, top_k=None, top_p=None, min_p=None,
                seeds=torch.arange(batch, dtype=torch.long) + 11,
                output_positions=torch.zeros(batch, dtype=torch.long))
    base.update(kw)
    return SamplingMetadata(**base)


def test_gumbel_noise_is_a_function_of_seed_position_and_token():
    seeds = torch.tensor([1, 2, 1], dtype=torch.long)
    pos = torch.tensor([0, 0, 1], dtype=torch.long)
    noise = gumbel_noise(seeds, pos, 1000)
    assert torch.isfinite(noise).all()
    assert torch.equal(noise[0], gumbel_noise(seeds[:1], pos[:1], 1000)[0])
    assert not torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[2])
    # Gumbel(0, 1) has mean ~0.577.
    assert abs(gumbel_noise(torch.arange(64), torch.zeros(64, dtype=torch.long), 4096).mean() - 0.5772) < 0.02


def test_top_p_and_min_p_keep_only_likely_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(200, 1)
    meta = _meta(200, top_p=torch.full((200,), 0.75), seeds=torch.arange(200, dtype=torch.long))
    tokens, _ = sample(logits, meta)
    assert set(tokens.tolist()) == {0, 1}
    meta = _meta(200, min_p=torch.full((200,), 0.2), seeds=torch.arange(200, dtype=torch.long))
    tokens, _ = sample(logits, meta)
    assert set(tokens.tolist()) == {0, 1, 2}


def test_penalties_push_away_from_seen_tokens():
    logits = torch.tensor([[2.0, 1.9, -1.0]])
    seen = torch.tensor([[True, False, False]])
    counts = torch.tensor([[1.0, 0.0, 0.0]])
    meta = _meta(1, temperature=torch.zeros(1), all_greedy=True,
                 repetition_penalty=torch.tensor([1.2]), presence_penalty=torch.zeros(1),
                 frequency_penalty=torch.zeros(1), seen_tokens=seen, output_counts=counts)
    assert sample(logits, meta)[0].item() == 1  # 2.0 / 1.2 < 1.9
    meta.repetition_penalty = torch.ones(1)
    meta.presence_penalty = torch.tensor([0.2])  # 2.0 - 0.2 < 1.9
    assert sample(logits, meta)[0].item() == 1
    meta.presence_penalty = torch.zeros(1)
    meta.frequency_penalty = torch.tensor([0.2])
    assert sample(logits, meta)[0].item() == 1
    meta.frequency_penalty = torch.tensor([0.05])  # 2.0 - 0.05 > 1.9
    assert sample(logits, meta)[0].item() == 0


def test_runner_builds_penalty_statistics_per_request(llm):
    import numpy as np
    from types import SimpleNamespace

    from zllm.protocol import ContinuingRequestData, NewRequestData, SchedulerOutput
    from zllm.worker.input_batch import InputBatch
    from zllm.worker.sampler import make_sampling_metadata
    from zllm.worker.staging import PinnedStaging

    vocab = llm.engine.arch.vocab_size
    states = [SimpleNamespace(token_ids=[5, 6, 7, 6, 9, 9, 9], num_prompt_tokens=3,
                              params=SamplingParams(temperature=0, presence_penalty=0.5)),
              SimpleNamespace(token_ids=[1, 2], num_prompt_tokens=2,
                              params=SamplingParams(temperature=0, frequency_penalty=1.0)),
              SimpleNamespace(token_ids=[4, 4, 8], num_prompt_tokens=1,
                              params=SamplingParams(temperature=0, repetition_penalty=1.3))]
    # Each request computes its last token this step, so each samples.
    batch = InputBatch(4, 64, 16, vocab, scratch_block=0)
    new = [NewRequestData(f"r{i}", np.array(s.token_ids[:s.num_prompt_tokens], np.int32),
                          np.array(s.token_ids[s.num_prompt_tokens:], np.int32), s.params,
                          np.zeros(0, np.int32), np.array([i], np.int32), len(s.token_ids) - 1)
           for i, s in enumerate(states)]
    slots = batch.update(SchedulerOutput(new, ContinuingRequestData(), np.ones(3, np.int32), 3, []))
    step = batch.prepare(slots, np.ones(3, np.int64), 3, 3)
    meta = make_sampling_metadata(batch.sampling_inputs(step), vocab,
                                  PinnedStaging(torch.device("cpu")))
    for row, s in enumerate(states):
        seen = torch.zeros(vocab, dtype=torch.bool)
        seen[s.token_ids] = True
        counts = torch.zeros(vocab)
        for t in s.token_ids[s.num_prompt_tokens:]:
            counts[t] += 1
        assert torch.equal(meta.seen_tokens[row].cpu(), seen)
        assert torch.equal(meta.output_counts[row].cpu(), counts)
    assert meta.presence_penalty.tolist() == [0.5, 0.0, 0.0]
    assert meta.repetition_penalty.tolist() == pytest.approx([1.0, 1.0, 1.3])


def test_gumbel_noise_is_finite_for_every_32_bit_draw():
    # The extremes of the hash's range: noise of +inf would pick a token whatever its logit
    # (a masked token's -inf + inf is NaN, which argmax takes), 1 token in 2**24 before.
    bits = torch.tensor([0, 1, 2**31, 2**32 - 2**9, 2**32 - 1], dtype=torch.int64)
    uniform = uniform_from_bits(bits)
    assert bool(((uniform > 0) & (uniform < 1)).all())
    assert torch.isfinite(-torch.log(-torch.log(uniform))).all()


def test_the_device_bitmask_path_masks_exactly_as_xgrammar():
    import xgrammar as xgr

    generator = torch.Generator().manual_seed(0)
    for rows, vocab in ((1, 32), (5, 1000), (7, 384)):  # 1000: not a multiple of 32
        bitmask = torch.randint(-2**31, 2**31 - 1, (rows, -(-vocab // 32)), dtype=torch.int32,
                                generator=generator)
        logits = torch.randn(rows, vocab, generator=generator)
        expected = logits.clone()
        xgr.apply_token_bitmask_inplace(expected, bitmask, vocab_size=vocab)
        assert torch.equal(masked_by_bitmask(logits, bitmask), expected)

