"""Linear layers route their matmul to a tuned algorithm (zllm/worker/models/cublaslt.py) at the
row counts it was tuned for, and to torch's call everywhere else, without changing the tokens.

cuBLASLt needs CUDA (gpu_check runs the real algorithms against float32 products); here a
stand-in choice computes the same product on the CPU and records the row counts it was asked
for, which is what the routing decides."""

from __future__ import annotations

import torch.nn.functional as F

from zllm import LLM, SamplingParams
from zllm.worker.models.cublaslt import TunedProduct
from tests.conftest import PROMPTS


class RecordingChoice:
    """An LtChoice's interface: the product."""

    def __init__(self) -> None:
        self.rows: list[int] = []

    def run(self, x, weight):
        self.rows.append(x.shape[0])
        return F.linear(x, weight)


def test_tuned_rows_route_to_the_choice_and_keep_greedy_output(gqa_model, hf):
    params = SamplingParams(temperature=0, max_tokens=8)
    prompts = PROMPTS[:3]
    with LLM(gqa_model, device="cpu", engine_process=False, async_scheduling=False) as llm:
        model = llm.engine.engine_core.executor.worker.model_runner.model
        layers = [m for m in model.modules() if isinstance(m, TunedProduct)]
        choice = RecordingChoice()
        for layer in layers:
            layer.lt_rows = {3: choice}  # three requests decode together: 3 rows
        outputs = llm.generate(prompts, params, use_tqdm=False)
    for out in outputs:
        assert out.outputs[0].token_ids == hf.greedy(gqa_model, out.prompt_token_ids, 8)
    # 7 decode steps after the prompts' step, through every tuned layer; and the LM head in the
    # prompts' step, which has 3 rows there too (one per sequence). The prompts' step itself
    # (more rows) ran torch's call.
    assert set(choice.rows) == {3}
    assert len(choice.rows) == len(layers) * 7 + 1
