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
    """An LtChoice's interface: the product, or None where it refuses the row count."""

    def __init__(self, refuse: bool = False) -> None:
        self.rows: list[int] = []
        self.refuse = refuse

    def run(self, x, weight):
        self.rows.append(x.shape[0])
        return None if self.refuse else F.linear(x, weight)


def test_tuned_rows_route_to_the_choice_and_keep_greedy_output(gqa_model, hf):
    params = SamplingParams(temperature=0, max_tokens=8)
    prompts = PROMPTS[:3]
    with LLM(gqa_model, device="cpu", engine_process=False, async_scheduling=False) as llm:
        model = llm.engine.engine_core.executor.worker.model_runner.model
        layers = [m for m in model.modules() if isinstance(m, TunedProduct)]
        decode, prefill, refusing = RecordingChoice(), RecordingChoice(), RecordingChoice(True)
        prompt_tokens = sum(len(llm.tokenizer.encode(p)) for p in prompts)
        for i, layer in enumerate(layers):
            # Three requests decode together: 3 rows. The prompts' step has prompt_tokens rows.
            layer.lt_rows = {3: refusing if i == 0 else decode}
            if layer.lt_tune_prefill:
                layer.lt_prefill, layer.lt_prefill_rows = prefill, prompt_tokens
        outputs = llm.generate(prompts, params, use_tqdm=False)
    for out in outputs:
        assert out.outputs[0].token_ids == hf.greedy(gqa_model, out.prompt_token_ids, 8)
    # Every decode step of all three went through the choice, in every tuned layer but the
    # first, whose choice refused (torch's call then ran, and the tokens stayed right); and so
    # did the LM head in the prompts' step, which has 3 rows there too (one per sequence).
    decode_steps = len(refusing.rows)
    assert decode_steps == 7 and set(decode.rows) == {3}
    assert len(decode.rows) == (len(layers) - 1) * decode_steps + 1
    # The prompts' step: every layer but the LM head, whose rows are sequences.
    assert prefill.rows == [prompt_tokens] * sum(layer.lt_tune_prefill for layer in layers)
