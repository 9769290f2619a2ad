"""Linear layers route their matmul to a tuned algorithm (zllm/worker/models/cublaslt.py) at the
row counts it was tuned for, and to torch's call everywhere else, without changing the tokens.

cuBLASLt needs CUDA (gpu_check runs the real algorithms against float32 products); here a
stand-in choice computes the same product on the CPU and records the row counts it was asked
for, which is what the routing decides. A gated MLP's gate_up projection may instead run its
product and SiLU in one Triton kernel (on Triton's interpreter here): where the tuner chose it,
or up to gated_mlp_max_rows rows with the tile few_rows_gated_tile picks."""

from __future__ import annotations

import pytest
import torch.nn.functional as F

from zllm import LLM, SamplingParams
from zllm.worker.models.gemm_tuning import GatedChoice, TunedProduct, few_rows_gated_tile
from zllm.worker.models.triton_matmul import TileConfig
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


class CountingGated(GatedChoice):
    """A GatedChoice (the Triton kernel) that counts its calls and fails where it cannot run."""
    calls = 0

    def run(self, x, weight):
        out = super().run(x, weight)
        assert out is not None  # the kernel ran, not the layer's product and activation
        self.calls += 1
        return out


def test_gate_up_fused_with_silu_in_the_model_keeps_greedy_output(gqa_model, hf):
    """A gated MLP's gate_up product and SiLU in one Triton kernel (GatedChoice), as the tuner
    hands it to the layers, at the decode steps' three rows: Hugging Face's greedy tokens, and
    the kernel really ran in place of the product and the activation."""
    from zllm.worker.models.layers import GatedMLP

    params = SamplingParams(temperature=0, max_tokens=6)
    choice = CountingGated(TileConfig(16, 32, 16))
    with LLM(gqa_model, device="cpu", engine_process=False, async_scheduling=False) as llm:
        model = llm.engine.engine_core.executor.worker.model_runner.model
        mlps = [m for m in model.modules() if isinstance(m, GatedMLP)]
        assert all(mlp.gate_up_proj.gated_act is not None for mlp in mlps)  # Llama: SiLU
        for mlp in mlps:
            mlp.gate_up_proj.tuned_gated_rows = {3: choice}
        outputs = llm.generate(PROMPTS[:3], params, use_tqdm=False)
    for out in outputs:
        assert out.outputs[0].token_ids == hf.greedy(gqa_model, out.prompt_token_ids, 6)
    assert choice.calls == len(mlps) * 5  # five decode steps of three rows


def test_few_rows_gated_tile_gives_every_program_an_sm_on_an_h100():
    """The rule's tile at 132 SMs: the 8B shape's 14336 columns make 112 programs of 128 (at
    least 0.8 x 132), so 16 x 128 x 64; the 1B's 8192 only 64, so 16 x 64 x 128 (both the
    fastest measured). None where the inner dimension is no multiple of block_k."""
    assert few_rows_gated_tile(14336, 4096, 132) == TileConfig(16, 128, 64, 1, 8, 3)
    assert few_rows_gated_tile(8192, 2048, 132) == TileConfig(16, 64, 128, 1, 8, 3)
    assert few_rows_gated_tile(106 * 128, 4096, 132).block_n == 128  # 106 >= 105.6
    assert few_rows_gated_tile(105 * 128, 4096, 132).block_n == 64
    assert few_rows_gated_tile(14336, 4128, 132) is None  # 64.5 x 64
    assert few_rows_gated_tile(8192, 2112, 132) is None  # 16.5 x 128


def test_few_rows_gated_runs_up_to_max_rows_where_the_tuner_chose_nothing(gqa_model):
    """give_few_rows_gated (the model runner's call, gated_mlp_max_rows) hands the gate_up
    projections the rule's tile where it fits their shape; they then run the fused kernel for
    1 to max rows, not above, and not at a row count where the tuner chose a fused kernel."""
    import torch

    from zllm.worker.models.gemm_tuning import give_few_rows_gated

    with LLM(gqa_model, device="cpu", engine_process=False) as llm:
        model = llm.engine.engine_core.executor.worker.model_runner.model
        layer = model.model.layers[0].mlp.gate_up_proj  # [2 x 128, 64]
        # 132 SMs: 16 x 64 x 128, whose block_k the 64 inputs do not fill: nothing given.
        assert give_few_rows_gated(model, 4, sm_count=132) == {(128, 64): None}
        assert layer.few_rows_gated is None
        assert layer.tuned_gated_product(torch.randn(1, 64)) is None
        # One SM: 16 x 128 x 64, given to the gate_up projections only.
        tile = TileConfig(16, 128, 64, 1, 8, 3)
        assert give_few_rows_gated(model, 4, sm_count=1) == {(128, 64): tile}
        given = [m for m in model.modules() if isinstance(m, TunedProduct) and m.few_rows_gated]
        assert given == [decoder.mlp.gate_up_proj for decoder in model.model.layers]
        assert all(m.few_rows_gated.tile == tile and m.gated_max_rows == 4 for m in given)
        for rows in (1, 4):
            x = torch.randn(rows, 64)
            expected = layer.gated_act(F.linear(x, layer.weight))
            assert torch.allclose(layer.tuned_gated_product(x), expected, atol=1e-5)
        assert layer.tuned_gated_product(torch.randn(5, 64)) is None
        # The tuner's fused choice for an exact row count wins over the rule; a product it
        # chose does not (the rule's kernel beat products plus the activation).
        fixed = torch.full((2, 128), 7.0)
        layer.tuned_gated_rows = {2: FixedChoice(fixed)}
        assert torch.equal(layer.tuned_gated_product(torch.randn(2, 64)), fixed)
        layer.tuned_rows = {3: FixedChoice(torch.zeros(3, 256))}
        x = torch.randn(3, 64)
        assert torch.allclose(layer.tuned_gated_product(x),
                              layer.gated_act(F.linear(x, layer.weight)), atol=1e-5)


def test_few_rows_gated_in_the_model_keeps_greedy_output(gqa_model, hf):
    """The rule's tile through give_few_rows_gated, up to 4 rows: the decode steps' three rows
    run the fused kernel, the prompts' step (more rows) the product and activation, and the
    tokens are Hugging Face's greedy ones."""
    from zllm.worker.models.gemm_tuning import give_few_rows_gated

    params = SamplingParams(temperature=0, max_tokens=6)
    with LLM(gqa_model, device="cpu", engine_process=False, async_scheduling=False) as llm:
        model = llm.engine.engine_core.executor.worker.model_runner.model
        give_few_rows_gated(model, 4, sm_count=1)
        layers = [m for m in model.modules() if isinstance(m, TunedProduct) and m.few_rows_gated]
        choice = CountingGated(layers[0].few_rows_gated.tile)
        for layer in layers:
            layer.few_rows_gated = choice
        outputs = llm.generate(PROMPTS[:3], params, use_tqdm=False)
    for out in outputs:
        assert out.outputs[0].token_ids == hf.greedy(gqa_model, out.prompt_token_ids, 6)
    assert choice.calls == len(layers) * 5  # five decode steps of three rows


def test_batch_gated_runs_from_min_to_max_rows_where_they_fill_the_last_tile(gqa_model):
    """give_batch_gated (the model runner's call on Hopper, up to gated_mlp_tma_max_rows) hands
    every gate_up projection the fused kernel's descriptor form for inputs of min to max rows
    whose last row tile is empty for at most max_padding rows, where the few-rows kernel does
    not run them; a tuner's fused choice for an exact row count wins."""
    import torch

    from zllm.worker.models.gemm_tuning import give_batch_gated, give_few_rows_gated

    with LLM(gqa_model, device="cpu", engine_process=False) as llm:
        model = llm.engine.engine_core.executor.worker.model_runner.model
        layer = model.model.layers[0].mlp.gate_up_proj  # [2 x 128, 64]
        tile = TileConfig(16, 32, 16)  # 16-row tiles: at most 4 rows of padding by default
        assert give_batch_gated(model, 40, min_rows=3, tile=tile) == len(model.model.layers)
        given = [m for m in model.modules() if isinstance(m, TunedProduct) and m.batch_gated]
        assert given == [decoder.mlp.gate_up_proj for decoder in model.model.layers]
        assert all(m.batch_gated == GatedChoice(tile, tma=True) for m in given)

        def fused(rows):
            return layer.tuned_gated_product(torch.randn(rows, 64))
        # 3 to 11 and 17 to 27 rows leave 5 or more of 16 empty; 41 is past the maximum.
        assert [rows for rows in range(1, 42) if fused(rows) is not None] == [
            12, 13, 14, 15, 16, 28, 29, 30, 31, 32]
        for rows in (12, 30):
            x = torch.randn(rows, 64)
            expected = layer.gated_act(F.linear(x, layer.weight))
            assert torch.allclose(layer.tuned_gated_product(x), expected, atol=1e-5)
        give_few_rows_gated(model, 2, sm_count=1)  # 16 x 128 x 64 fits: 1 and 2 rows fused too
        assert fused(1) is not None and fused(2) is not None and fused(3) is None
        fixed = torch.full((20, 128), 7.0)
        layer.tuned_gated_rows = {20: FixedChoice(fixed)}
        assert torch.equal(fused(20), fixed)
        # Where the tuner chose a product, the layer runs it and the activation: the form was
        # timed against torch's product, not that one.
        layer.tuned_rows = {28: FixedChoice(torch.zeros(28, 256))}
        assert fused(28) is None and fused(29) is not None
        give_batch_gated(model, 40, min_rows=0, tile=tile)
        assert fused(0) is None  # no rows: no descriptor to build


def test_batch_gated_in_the_model_keeps_greedy_output(gqa_model, hf):
    """The descriptor form through give_batch_gated at every row count (no minimum, padding
    allowed): the prompts' step and the decode steps' three rows run it, and the tokens are
    Hugging Face's greedy ones."""
    from zllm.worker.models.gemm_tuning import give_batch_gated

    params = SamplingParams(temperature=0, max_tokens=6)
    choice = CountingGated(TileConfig(16, 32, 16), tma=True)
    with LLM(gqa_model, device="cpu", engine_process=False, async_scheduling=False) as llm:
        model = llm.engine.engine_core.executor.worker.model_runner.model
        give_batch_gated(model, 4096, min_rows=1, max_padding=16)
        layers = [m for m in model.modules() if isinstance(m, TunedProduct) and m.batch_gated]
        for layer in layers:
            layer.batch_gated = choice
        outputs = llm.generate(PROMPTS[:3], params, use_tqdm=False)
    for out in outputs:
        assert out.outputs[0].token_ids == hf.greedy(gqa_model, out.prompt_token_ids, 6)
    assert choice.calls == len(layers) * 6  # the prompts' step and five decode steps


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


def test_few_rows_tile_fills_one_wave_on_an_h100():
    """The rule's tiles at 132 SMs for the 8B and 1B shapes' products (those measured fastest,
    or within 0.3 us of it, at one row): the most programs no more than the SMs; torch's call
    under 0.7 x 132 programs (the 1B's o and down) and over one wave (the LM heads)."""
    from zllm.worker.models.gemm_tuning import few_rows_tile

    assert few_rows_tile(6144, 4096, 132) == TileConfig(16, 64, 256, 1, 4, 4)  # 8B qkv: 96
    assert few_rows_tile(4096, 4096, 132) == TileConfig(16, 32, 256, 1, 4, 4)  # 8B o: 128
    assert few_rows_tile(4096, 14336, 132) == TileConfig(16, 32, 256, 1, 4, 4)  # 8B down
    assert few_rows_tile(3072, 2048, 132) == TileConfig(16, 32, 256, 1, 4, 4)  # 1B qkv: 96
    assert few_rows_tile(2048, 2048, 132) is None  # 1B o: 64 programs at most
    assert few_rows_tile(2048, 8192, 132) is None  # 1B down
    assert few_rows_tile(128256, 4096, 132) is None  # LM head: 1002 programs of 128
    assert few_rows_tile(16384, 4096, 132) == TileConfig(16, 128, 128, 1, 4, 4)  # 128
    assert few_rows_tile(4096, 4000, 132) is None  # no block_k divides 4000
    assert few_rows_tile(64, 256, 2) == TileConfig(16, 32, 256, 1, 4, 4)  # not wider than 64


def test_few_rows_products_up_to_max_rows(gqa_model):
    """give_few_rows (the model runner's call, few_rows_matmul_max_rows) hands the rule's tile
    to the bias-free 16-bit column-major products that are not a gated MLP's gate_up; they then
    run the Triton matmul (the interpreter here) for 1 to max rows, not above, and not at a
    row count where the tuner chose something."""
    import torch
    from torch import nn

    from zllm.worker.models.gemm_tuning import give_few_rows
    from zllm.worker.models.linear import (ColumnParallelLinear, ParallelLMHead,
                                           RowParallelLinear, column_major_linears)

    with LLM(gqa_model, device="cpu", engine_process=False):  # model parallel initialised
        def column(k, n, **kwargs):
            return ColumnParallelLinear(k, [("q_proj", 0, n)], **kwargs)
        layers = nn.ModuleDict({"qkv": column(256, 64), "o": RowParallelLinear(512, 64),
                                "head": ParallelLMHead(256, 64),
                                "biased": column(256, 64, bias=True),
                                "row_major": column(256, 64), "float32": column(256, 64),
                                "gate_up": column(256, 64), "wide": column(256, 1024)})
        row_major = layers.pop("row_major")
        column_major_linears(layers)
        layers["row_major"] = row_major
        for name, layer in layers.items():
            layer.weight.data = layer.weight.data.to(
                torch.float32 if name == "float32" else torch.float16)
            layer.weight.data.copy_(torch.randn(layer.weight.shape) * 0.05)
            if getattr(layer, "bias", None) is not None:
                layer.bias.data = torch.zeros(layer.bias.shape, dtype=torch.float16)
        layers["gate_up"].gated_act = torch.nn.functional.silu
        assert layers["qkv"].weight.stride(0) == 1 and row_major.weight.stride(1) == 1

        tiles = give_few_rows(layers, 4, sm_count=2)
        two = TileConfig(16, 32, 256, 1, 4, 4)  # 64 columns: 2 programs of 32
        assert tiles == {(64, 256): two, (64, 512): two, (1024, 256): None}
        given = {name for name, layer in layers.items() if layer.few_rows is not None}
        assert given == {"qkv", "o", "head"}
        assert layers["head"].few_rows.out_dtype == torch.float32
        for name in ("qkv", "o", "head"):
            layer = layers[name]
            for rows in (1, 4):
                x = torch.randn(rows, layer.weight.shape[1], dtype=torch.float16)
                out = layer.tuned_product(x)
                expected = x.float() @ layer.weight.float().t()
                assert out is not None and out.dtype == layer.few_rows.out_dtype
                assert torch.allclose(out.float(), expected, atol=2e-2, rtol=2e-2), name
            assert layer.tuned_product(torch.randn(5, layer.weight.shape[1],
                                                   dtype=torch.float16)) is None
        # The tuner's choice for an exact row count wins over the rule.
        fixed = torch.full((2, 64), 7.0)
        layers["qkv"].tuned_rows = {2: FixedChoice(fixed)}
        assert torch.equal(layers["qkv"].tuned_product(torch.randn(2, 256).half()), fixed)
        with pytest.raises(ValueError, match="1 to 16 rows, not 17"):
            give_few_rows(layers, 17, sm_count=2)
