"""GGUF checkpoints (llama.cpp's format): tiny random Llamas written with the gguf package's
writer (tests/gguf_writer.py) load in zllm and, through transformers' own GGUF loading, in
Hugging Face, with equal dequantised weights and equal greedy tokens, at TP=1 and TP=2."""

from __future__ import annotations

import os

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from tests.conftest import PROMPTS
from tests.gguf_writer import write_llama_gguf
from zllm import LLM, SamplingParams
from zllm.architecture import ModelArchitecture
from zllm.demo import build_tiny_llama
from zllm.tokenizer import load_tokenizer
from zllm.worker.models.checkpoint import GGUFReader, Piece

MAX_TOKENS = 16
SMALL_CACHE = dict(device="cpu", num_kv_blocks=64)
# Each file: which type its 2-D weights get. "k-quants" mixes every other type zllm reads, on a
# model whose rows are multiples of the K formats' 256-element blocks.
K_QUANTS = {"attn_q": Q.Q4_K, "attn_k": Q.Q4_K, "attn_v": Q.Q5_K, "attn_output": Q.Q6_K,
            "ffn_gate": Q.Q5_K, "ffn_up": Q.Q4_K, "ffn_down": Q.Q6_K, "token_embd": Q.Q4_0,
            "output": Q.BF16}
FILES = {"F32": Q.F32, "F16": Q.F16, "Q8_0": Q.Q8_0, "Q4_1": Q.Q4_1, "k-quants": K_QUANTS}


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory) -> dict[str, str]:
    """Name -> path of a .gguf file, alone in its directory."""
    small = str(tmp_path_factory.mktemp("gguf-src"))
    build_tiny_llama(small, rope_scaling={"rope_type": "default"}, seed=7)
    wide = str(tmp_path_factory.mktemp("gguf-src-wide"))
    build_tiny_llama(wide, hidden_size=256, intermediate_size=512, num_heads=4, num_kv_heads=2,
                     rope_scaling={"rope_type": "default"}, seed=8, std=0.02)
    files = {}
    for name, qtype in FILES.items():
        path = os.path.join(str(tmp_path_factory.mktemp(f"gguf-{name}")), f"tiny-{name}.gguf")
        if isinstance(qtype, dict):
            write_llama_gguf(wide, path, lambda n, types=qtype: types[n.split(".")[-2]])
        else:
            write_llama_gguf(small, path, lambda n, qtype=qtype: qtype)
        files[name] = path
    return files


def hf_model(hf, path: str):
    return hf.model(os.path.dirname(path), os.path.basename(path))


@pytest.mark.parametrize("name", FILES)
def test_dequantized_weights_equal_transformers(name, gguf_files, hf):
    """Whole tensors, and the rows and columns each rank of TP 2 and 4 reads."""
    path = gguf_files[name]
    reader = GGUFReader(path, ModelArchitecture.from_model_dir(path))
    state = hf_model(hf, path).state_dict()
    assert "lm_head.weight" in state
    for tensor_name, full in state.items():
        assert torch.equal(reader.read(Piece(tensor_name)), full), tensor_name
        for dim in range(full.dim()):
            for tp in (2, 4):
                size = full.shape[dim] // tp
                for rank in range(tp):
                    got = reader.read(Piece(tensor_name, dim, rank * size, (rank + 1) * size))
                    assert torch.equal(got, full.narrow(dim, rank * size, size)), tensor_name


def _greedy_matches_hf(llm: LLM, path: str, hf) -> None:
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    model_dir, gguf_file = os.path.dirname(path), os.path.basename(path)
    for out in llm.generate(PROMPTS, params, use_tqdm=False):
        expected = hf.greedy(model_dir, out.prompt_token_ids, MAX_TOKENS, gguf_file)
        assert out.outputs[0].token_ids == expected, out.prompt


@pytest.mark.parametrize("name", FILES)
def test_gguf_greedy_matches_transformers(name, gguf_files, hf):
    with LLM(gguf_files[name], **SMALL_CACHE) as llm:
        assert llm.engine.config.model.load_format == "gguf"
        _greedy_matches_hf(llm, gguf_files[name], hf)


@pytest.mark.parametrize("name", ["Q4_1", "k-quants"])
def test_gguf_at_tp2_matches_transformers(name, gguf_files, hf, ray_session):
    with LLM(gguf_files[name], **SMALL_CACHE, tensor_parallel_size=2,
             execute_timeout_s=60) as llm:
        _greedy_matches_hf(llm, gguf_files[name], hf)


def test_config_and_tokenizer_come_from_the_metadata(gguf_files, gqa_model):
    path = gguf_files["Q8_0"]
    arch = ModelArchitecture.from_model_dir(path)
    assert (arch.hidden_size, arch.num_layers, arch.num_heads, arch.num_kv_heads, arch.head_dim,
            arch.intermediate_size, arch.vocab_size) == (64, 2, 4, 2, 16, 128, 384)
    assert (arch.rope_theta, arch.rope_scaling, arch.tie_word_embeddings) == (500000.0, None, False)
    assert arch.eos_token_ids == [1] and arch.max_position_embeddings == 2048
    source = load_tokenizer(gqa_model)  # the same trained tokenizer
    tokenizer = load_tokenizer(os.path.dirname(path))
    for text in PROMPTS:
        assert tokenizer(text)["input_ids"] == source(text)["input_ids"]
    assert tokenizer.eos_token == "<|end_of_text|>" and tokenizer.chat_template


def test_a_directory_with_one_gguf_file_loads_as_gguf(gguf_files):
    with LLM(os.path.dirname(gguf_files["F16"]), device="cpu", num_kv_blocks=8) as llm:
        assert llm.engine.config.model.load_format == "gguf"


def test_a_directory_with_two_gguf_files_asks_which(gguf_files, tmp_path):
    for name in ("F16", "Q8_0"):
        os.symlink(gguf_files[name], tmp_path / os.path.basename(gguf_files[name]))
    with pytest.raises(ValueError, match="holds 2 .gguf files .*tiny-F16.gguf, tiny-Q8_0.gguf"):
        LLM(str(tmp_path), device="cpu")
