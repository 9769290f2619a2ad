"""The CUDA-graph decode path's padding, run eagerly on CPU: decode batches padded to a captured
size (padding rows write into the scratch block) give the same greedy tokens as Hugging Face."""

from __future__ import annotations

from zllm import LLM, SamplingParams
from zllm.worker.cuda_graphs import DecodeGraphs, graph_batch_sizes
from tests.conftest import PROMPTS


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
