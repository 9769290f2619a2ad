"""Column-major linear weights (what build_model gives on CUDA) load from the same checkpoint and
give Hugging Face's greedy tokens, like the checkpoint's own row-major layout."""

from __future__ import annotations

from zllm import LLM, SamplingParams
from zllm.worker.models.linear import (ColumnParallelLinear, ParallelLMHead, RowParallelLinear,
                                       column_major_linears)
from tests.conftest import PROMPTS


def test_column_major_linears_keep_greedy_output(gqa_model, tied_model, hf):
    params = SamplingParams(temperature=0, max_tokens=12)
    for model_dir in (gqa_model, tied_model):
        with LLM(model_dir, device="cpu", engine_process=False) as llm:
            runner = llm.engine.engine_core.executor.worker.model_runner
            column_major_linears(runner.model)
            runner.load_weights()
            linears = [m for m in runner.model.modules()
                       if isinstance(m, (ColumnParallelLinear, RowParallelLinear, ParallelLMHead))]
            head = runner.model.lm_head
            for m in linears:
                # [out, in] as a tensor, [in, out] in memory: the transpose is contiguous. A tied
                # head stays the embedding's row-major table.
                assert m.weight.t().is_contiguous() != (m is head and head.tied), m
            assert head.tied == (model_dir == tied_model)
            outputs = llm.generate(PROMPTS, params, use_tqdm=False)
        for out in outputs:
            assert out.outputs[0].token_ids == hf.greedy(model_dir, out.prompt_token_ids, 12)
