"""The CUDA-graph paths' padding, run eagerly on CPU: decode batches padded to a captured size
(padding rows write into the scratch block), and steps with prompt tokens padded to a piecewise
size (attention between the pieces through the static buffers, on the real tokens only), give
the same greedy tokens as Hugging Face."""

from __future__ import annotations

import pytest

from zllm import LLM, SamplingParams
from zllm.config import EngineConfig
from zllm.worker.cuda_graphs import DecodeGraphs, PiecewiseGraphs, graph_batch_sizes, piecewise_sizes
from tests.conftest import PROMPTS
from tests.test_prompt_logprobs import check_prompt_logprobs


class EagerDecodeGraphs(DecodeGraphs):
    """DecodeGraphs whose replay runs the captured forward eagerly on the static buffers."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.replayed: list[int] = []

    def replay(self, input_ids, positions):
        bs = len(input_ids)
        self.replayed.append(bs)
        self.input_ids[:bs].copy_(input_ids)
        self.positions[:bs].copy_(positions)
        return self._forward(bs)


def test_padded_decode_batches_keep_greedy_output(gqa_model, hf):
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 24]
    assert graph_batch_sizes(256)[-3:] == [240, 248, 256]
    with LLM(gqa_model, device="cpu", max_num_seqs=20, async_scheduling=True,
             engine_process=False) as llm:
        runner = llm.engine.engine_core.executor.worker.model_runner
        runner.graphs = EagerDecodeGraphs(runner.model, runner.kv_caches, runner.attn,
                                          graph_batch_sizes(20), runner.device)
        scratch = runner.kv_caches[0][runner.scratch_block].clone()
        outputs = llm.generate(PROMPTS[:5], SamplingParams(temperature=0, max_tokens=12),
                               use_tqdm=False)
        # Five running decodes ran as batches of 8 (and fewer as requests stopped).
        assert 8 in runner.graphs.replayed
        assert not runner.kv_caches[0][runner.scratch_block].equal(scratch)  # padding wrote there
        # Four decodes fit the graph of 4 exactly: it replays, with no padding row.
        runner.graphs.replayed.clear()
        outputs += llm.generate(PROMPTS[4:8], SamplingParams(temperature=0, max_tokens=12),
                                use_tqdm=False)
        assert runner.graphs.replayed.count(4) >= 10
    for out in outputs:
        assert out.outputs[0].token_ids == hf.greedy(gqa_model, out.prompt_token_ids, 12)


def test_a_one_token_prompt_chunk_in_a_decode_graph_step_scores_its_prompt(gqa_model, hf):
    # A budget of 3 tokens for 3 requests: once two decode, the third prompt gets one token a
    # step, so its prefill runs as decode-graph steps (one token per request, padded to 4) that
    # carry its prompt log-probabilities. They come from the graph's hidden states.
    with LLM(gqa_model, device="cpu", max_num_seqs=3, max_num_batched_tokens=3,
             engine_process=False) as llm:
        runner = llm.engine.engine_core.executor.worker.model_runner
        runner.graphs = EagerDecodeGraphs(runner.model, runner.kv_caches, runner.attn,
                                          graph_batch_sizes(3), runner.device)
        plain = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
        scored = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2)
        outputs = llm.generate(PROMPTS[:3], [plain, plain, scored], use_tqdm=False)
        assert runner.graphs.replayed.count(4) >= 10
    check_prompt_logprobs(outputs[2:], hf, gqa_model, top=2)


class EagerPiecewiseGraphs(PiecewiseGraphs):
    """PiecewiseGraphs whose replay runs the padded forward eagerly: each layer's q, k and v go
    through the static buffers, and the real backend attends over the step's real tokens and
    writes into the static output, as between the pieces of a replay."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.replayed: list[tuple[int, int]] = []  # (tokens, padded size)

    def replay(self, input_ids, positions, attn):
        n = len(input_ids)
        size = self.size_for(n)
        self.replayed.append((n, size))
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        return self._forward(size, _AttendBetweenPieces(self, attn, n))[:n]


class _AttendBetweenPieces:
    def __init__(self, owner: PiecewiseGraphs, attn, num_tokens: int) -> None:
        self.owner, self.attn, self.n = owner, attn, num_tokens

    def forward_rotated(self, rope, positions, q, k, v, kv_cache, window=None):
        return self.forward(q, k, v, kv_cache, window, rope)

    def forward(self, q, k, v, kv_cache, window=None, rope=None):
        o, n, size = self.owner, self.n, len(q)
        o.q[:size].copy_(q)
        o.k[:size].copy_(k)
        o.v[:size].copy_(v)
        if rope is None:
            self.attn.forward(o.q[:n], o.k[:n], o.v[:n], kv_cache, window, out=o.out[:n])
        else:  # as PiecewiseGraphs.replay calls it
            self.attn.forward_rotated(rope, o.positions[:n], o.q[:n], o.k[:n], o.v[:n], kv_cache,
                                      window, out=o.out[:n])
        return o.out[:size]


def test_piecewise_sizes():
    assert piecewise_sizes(1024) == [16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024]
    assert piecewise_sizes(100) == [16, 32, 48, 64, 96, 100]
    assert piecewise_sizes(16) == [16] and piecewise_sizes(0) == []


def test_piecewise_tokens_config_is_checked():
    assert EngineConfig.from_dict({}, piecewise_cuda_graph_tokens=0).device.piecewise_cuda_graph_tokens == 0
    with pytest.raises(ValueError, match="'piecewise_cuda_graph_tokens' = 8 .*0 \\(off\\) or in \\[16, 16384\\]"):
        EngineConfig.from_dict({}, piecewise_cuda_graph_tokens=8)


def test_padded_prompt_steps_keep_greedy_output(gqa_model, hf):
    """Chunked prompts mixed with decodes, every step with prompt tokens padded to 16 or 32."""
    with LLM(gqa_model, device="cpu", max_num_batched_tokens=32, async_scheduling=True,
             engine_process=False) as llm:
        runner = llm.engine.engine_core.executor.worker.model_runner
        runner.piecewise = EagerPiecewiseGraphs(runner.model, runner.kv_caches,
                                                runner.model.attention_spec, piecewise_sizes(32),
                                                runner.dtype, runner.device)
        prompts = [p * 3 for p in PROMPTS[:6]]
        outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10),
                               use_tqdm=False)
    replayed = runner.piecewise.replayed
    assert any(size > n for n, size in replayed)  # padding rows ran
    assert {size for _, size in replayed} == {16, 32}
    for out in outputs:
        assert out.outputs[0].token_ids == hf.greedy(gqa_model, out.prompt_token_ids, 10)
