"""The weight prefetch (zllm/worker/models/weight_prefetch.py): each linear layer, after its
product, reads the first bytes of the next linear layer's weight, in forward order, and nothing
it does changes a token.

The side stream and the L2 need CUDA (gpu_check compares graph tokens with and without it);
here the read kernel runs in Triton's interpreter, and a stand-in for the side stream records
which weights the layers read ahead, in which order."""

from __future__ import annotations

import pytest
import torch

from zllm import LLM, SamplingParams
from zllm.config import EngineConfig
from zllm.worker.models.gemm_tuning import TunedProduct
from zllm.worker.models.linear import QKVParallelLinear
from zllm.worker.models.weight_prefetch import (READ_WORDS, chain_linears, read_into_l2,
                                                weight_words)
from tests.conftest import PROMPTS

# tests/conftest.py sets TRITON_INTERPRET before triton is imported: the read kernel runs on CPU.


@pytest.mark.parametrize("n_bytes", [8, 16 * 1024, 100_000, 1 << 30])
def test_read_kernel_reads_exactly_the_first_bytes(n_bytes):
    weight = torch.randn(256, 384, dtype=torch.bfloat16)
    words = weight_words(weight)
    sink = torch.zeros(64, dtype=torch.int64)
    read_into_l2(words, n_bytes, sink)
    n_words = min(n_bytes // 8, words.numel())
    programs = -(-n_words // READ_WORDS)
    # Each program stores the sum of the words it loaded: together, the first n_words.
    assert sink[:programs].sum().item() == words[:n_words].sum().item()
    assert not sink[programs:].any()


def test_read_kernel_refuses_a_sink_too_small():
    words = weight_words(torch.zeros(1024, 1024, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="sink of 128 words, it has 4"):
        read_into_l2(words, 2 << 20, torch.zeros(4, dtype=torch.int64))


def test_weight_words_follow_memory_order():
    in_out = torch.randn(64, 96, dtype=torch.bfloat16)
    column_major = in_out.t()  # [out, in] in shape, [in, out] in memory
    assert torch.equal(weight_words(column_major), in_out.reshape(-1).view(torch.int64))
    row_major = in_out.t().contiguous()
    assert torch.equal(weight_words(row_major), row_major.reshape(-1).view(torch.int64))
    with pytest.raises(ValueError, match="not one dense block"):
        weight_words(row_major[:, ::2])


class RecordingPrefetch:
    """WeightPrefetch's interface without CUDA: every read is recorded, none is made."""

    def __init__(self) -> None:
        self.active = True
        self.reads: list[tuple[int, int]] = []  # (data_ptr of the words, bytes)

    def read(self, words: torch.Tensor, n_bytes: int) -> None:
        self.reads.append((words.data_ptr(), n_bytes))


def test_each_linear_reads_the_next_weight_ahead_and_tokens_stay(gqa_model, hf):
    params = SamplingParams(temperature=0, max_tokens=6)
    prompt = PROMPTS[0]
    with LLM(gqa_model, device="cpu", engine_process=False, async_scheduling=False) as llm:
        model = llm.engine.engine_core.executor.worker.model_runner.model
        linears = [m for m in model.modules() if isinstance(m, TunedProduct)]
        prefetch = RecordingPrefetch()
        chain_linears(linears, prefetch, n_bytes=1000, after_attention_bytes=3000)
        out = llm.generate([prompt], params, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == hf.greedy(gqa_model, out.prompt_token_ids, 6)
    # Forward order: each layer's qkv, o, gate_up, down, then the LM head; each reads the next
    # one's weight, qkv the larger amount (attention runs before o).
    layers = model.model.layers
    order = [m for layer in layers for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                             layer.mlp.gate_up_proj, layer.mlp.down_proj)]
    assert linears == order + [model.lm_head]
    expected = [(weight_words(b.weight).data_ptr(), 3000 if isinstance(a, QKVParallelLinear) else 1000)
                for a, b in zip(linears, linears[1:])]
    steps = 6  # the prompt's step and five decodes, each a whole forward
    assert prefetch.reads == expected * steps
    assert model.lm_head.next_weight is None
    # Without a prefetch nothing reads ahead.
    chain_linears(linears, None, 1000, 3000)
    assert all(m.next_weight is None for m in linears)


@pytest.mark.parametrize("key,value", [("weight_prefetch_max_rows", -1),
                                       ("weight_prefetch_mb", 257),
                                       ("weight_prefetch_attention_mb", -2)])
def test_weight_prefetch_keys_are_checked(key, value):
    with pytest.raises(ValueError, match=f"'{key}' = {value}"):
        EngineConfig.from_dict({"model": {"model": "m"}, "device": {key: value}})
