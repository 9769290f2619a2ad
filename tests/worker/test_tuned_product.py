"""Linear layers route their matmul to a tuned algorithm (zllm/worker/models/cublaslt.py) at the
row counts it was tuned for, and to torch's call everywhere else, without changing the tokens.

cuBLASLt needs CUDA (gpu_check runs the real algorithms against float32 products); here a
stand-in choice computes the same product on the CPU and records the row counts it was asked
for, which is what the routing decides."""

from __future__ import annotations

import torch.nn.functional as F

from zllm import LLM, SamplingParams
from zllm.worker.models.gemm_tuning import TunedProduct
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
            layer.tuned_rows = {3: choice}  # three requests decode together: 3 rows
        outputs = llm.generate(prompts, params, use_tqdm=False)
    for out in outputs:
        assert out.outputs[0].token_ids == hf.greedy(gqa_model, out.prompt_token_ids, 8)
    # 7 decode steps after the prompts' step, through every tuned layer; and the LM head in the
    # prompts' step, which has 3 rows there too (one per sequence). The prompts' step itself
    # (more rows) ran torch's call.
    assert set(choice.rows) == {3}
    assert len(choice.rows) == len(layers) * 7 + 1


class FixedChoice:
    """A choice whose product is a known tensor, to see that the layer returns it."""

    def __init__(self, out) -> None:
        self.out = out

    def run(self, x, weight):
        return self.out.clone()


def test_tuned_product_is_what_the_layer_returns(gqa_model):
    import torch

    from zllm.worker.models.linear import ColumnParallelLinear

    with LLM(gqa_model, device="cpu", engine_process=False) as llm:
        model = llm.engine.engine_core.executor.worker.model_runner.model
        layer0 = model.model.layers[0]
        biased = ColumnParallelLinear(8, [("q_proj", 0, 4)], bias=True)
        biased.weight.data.normal_()
        biased.bias.data.copy_(torch.arange(4.0))
        for layer in (layer0.self_attn.o_proj, layer0.mlp.gate_up_proj, model.lm_head, biased):
            rows, n = 2, layer.weight.shape[0]
            x = torch.randn(rows, layer.weight.shape[1])
            fixed = torch.full((rows, n), 7.0)
            layer.tuned_rows = {rows: FixedChoice(fixed)}
            bias = 0 if layer.bias is None else layer.bias
            assert torch.equal(layer(x), fixed + bias), layer
            # Other row counts, and inputs the choice cannot take, go to torch's call.
            assert torch.allclose(layer(x[:1]), F.linear(x[:1], layer.weight) + bias, atol=1e-5)
            strided = torch.randn(layer.weight.shape[1], rows).t()
            assert torch.allclose(layer(strided), F.linear(strided, layer.weight) + bias,
                                  atol=1e-5)
            layer.tuned_rows = None


def test_triton_tiles_in_the_model_keep_greedy_output(gqa_model, hf):
    """The Triton matmul as the tuner hands it to the layers (TritonChoice), run by the
    interpreter for every linear layer's three-row products: Hugging Face's greedy tokens."""
    import torch

    from zllm.worker.models.gemm_tuning import TritonChoice
    from zllm.worker.models.triton_matmul import TileConfig

    params = SamplingParams(temperature=0, max_tokens=6)
    with LLM(gqa_model, device="cpu", engine_process=False, async_scheduling=False) as llm:
        model = llm.engine.engine_core.executor.worker.model_runner.model
        layers = [m for m in model.modules() if isinstance(m, TunedProduct)]
        for layer in layers:
            layer.tuned_rows = {3: TritonChoice(TileConfig(16, 32, 16), torch.float32)}
        outputs = llm.generate(PROMPTS[:3], params, use_tqdm=False)
        assert all(layer.tuned_rows[3].tile.fits(3, *layer.weight.shape) for layer in layers)
    for out in outputs:
        assert out.outputs[0].token_ids == hf.greedy(gqa_model, out.prompt_token_ids, 6)


def test_gate_up_fused_with_silu_in_the_model_keeps_greedy_output(gqa_model, hf):
    """A gated MLP's gate_up product and SiLU in one Triton kernel (GatedChoice), as the tuner
    hands it to the layers, at the decode steps' three rows: Hugging Face's greedy tokens, and
    the kernel really ran in place of the product and the activation."""
    from zllm.worker.models.gemm_tuning import GatedChoice
    from zllm.worker.models.layers import GatedMLP
    from zllm.worker.models.triton_matmul import TileConfig

    class CountingGated(GatedChoice):
        calls = 0

        def run(self, x, weight):
            out = super().run(x, weight)
            assert out is not None  # the kernel ran, not the layer's product and activation
            CountingGated.calls += 1
            return out

    params = SamplingParams(temperature=0, max_tokens=6)
    with LLM(gqa_model, device="cpu", engine_process=False, async_scheduling=False) as llm:
        model = llm.engine.engine_core.executor.worker.model_runner.model
        mlps = [m for m in model.modules() if isinstance(m, GatedMLP)]
        assert all(mlp.gate_up_proj.gated_act is not None for mlp in mlps)  # Llama: SiLU
        for mlp in mlps:
            mlp.gate_up_proj.tuned_gated_rows = {3: CountingGated(TileConfig(16, 32, 16))}
        outputs = llm.generate(PROMPTS[:3], params, use_tqdm=False)
    for out in outputs:
        assert out.outputs[0].token_ids == hf.greedy(gqa_model, out.prompt_token_ids, 6)
    assert CountingGated.calls == len(mlps) * 5  # five decode steps of three rows


def test_a_choice_must_match_torch_in_every_element():
    """The tuner's check on a choice's result: bf16 rounding passes; one wrong column of many
    (a bad edge tile) fails, though it moves the whole result's error by under 1%."""
    import torch

    from zllm.worker.models.gemm_tuning import REL_TOL, matches_torch

    gen = torch.Generator().manual_seed(0)
    expected = torch.randn(16, 14336, generator=gen)  # the 8B shape's activation width
    assert matches_torch(expected.bfloat16(), expected)
    wrong = expected.clone()
    wrong[:, -1] = 0
    assert (wrong - expected).norm() < REL_TOL * expected.norm()
    assert not matches_torch(wrong, expected)
