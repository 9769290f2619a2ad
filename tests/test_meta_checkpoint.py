"""Meta's original checkpoint layout, as each Llama generation splits it (Llama 3: tok_embeddings
over the vocabulary; Llama 2: over the model dimension), in 1, 2 and 8 parts, loads at TP=1 and
TP=2 with Hugging Face's greedy tokens. The checkpoints come from tests/meta_writer.py, written
from the conversion script's conventions, not from zllm's reader."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import PROMPTS
from tests.meta_writer import write_meta_checkpoint
from zllm import LLM, SamplingParams
from zllm.architecture import ModelArchitecture
from zllm.demo import build_tiny_llama
from zllm.worker.models.checkpoint import MetaReader, Piece

MAX_TOKENS = 16
SMALL_CACHE = dict(device="cpu", num_kv_blocks=64)  # 8 prompts need ~24 blocks of 16 tokens
# Meta's use_scaled_rope means these llama3 constants.
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# 16 query heads and a 352-wide MLP split into 8 parts; Llama 3 with 8 KV heads (GQA), Llama 2
# multi-head with RoPE base 10000, as their releases are.
MODELS = {
    3: dict(num_kv_heads=8, rope_scaling=LLAMA3_SCALING, rope_theta=500000.0,
            max_position_embeddings=4096, seed=5),
    2: dict(num_kv_heads=16, rope_scaling={"rope_type": "default"}, rope_theta=10000.0, seed=6),
}
CHECKPOINTS = [(version, parts) for version in (3, 2) for parts in (1, 2, 8)]


@pytest.fixture(scope="module")
def hf_llamas(tmp_path_factory) -> dict[int, str]:
    dirs = {}
    for version, kwargs in MODELS.items():
        dirs[version] = str(tmp_path_factory.mktemp(f"llama{version}-hf"))
        build_tiny_llama(dirs[version], hidden_size=128, num_heads=16, intermediate_size=352,
                         **kwargs)
    return dirs


@pytest.fixture(scope="module")
def meta_checkpoints(hf_llamas, tmp_path_factory) -> dict[tuple[int, int], str]:
    dirs = {}
    for version, parts in CHECKPOINTS:
        dirs[version, parts] = str(tmp_path_factory.mktemp(f"llama{version}-meta{parts}"))
        write_meta_checkpoint(hf_llamas[version], dirs[version, parts], parts, version)
    return dirs


@pytest.mark.parametrize("version, parts", CHECKPOINTS)
def test_meta_reader_gives_every_slice_of_every_tensor(version, parts, hf_llamas,
                                                       meta_checkpoints):
    """Rows and columns cut for TP sizes 1 to 8, across and along every part boundary."""
    hf_state = load_file(f"{hf_llamas[version]}/model.safetensors")
    meta_dir = meta_checkpoints[version, parts]
    reader = MetaReader(meta_dir, ModelArchitecture.from_model_dir(meta_dir))
    for name, full in hf_state.items():
        assert torch.equal(reader.read(Piece(name)), full), name
        for dim in range(full.dim()):
            for tp in (2, 4, 8):
                size = full.shape[dim] // tp
                for rank in range(tp):
                    got = reader.read(Piece(name, dim, rank * size, (rank + 1) * size))
                    assert torch.equal(got, full.narrow(dim, rank * size, size)), (name, dim, tp)


def _greedy_matches_hf(llm: LLM, hf_dir: str, hf) -> None:
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    for out in llm.generate(PROMPTS, params, use_tqdm=False):
        assert out.outputs[0].token_ids == hf.greedy(hf_dir, out.prompt_token_ids, MAX_TOKENS)


@pytest.mark.parametrize("version, parts", CHECKPOINTS)
def test_meta_checkpoint_at_tp1_matches_hf(version, parts, hf_llamas, meta_checkpoints, hf):
    with LLM(meta_checkpoints[version, parts], tokenizer=hf_llamas[version], **SMALL_CACHE) as llm:
        assert llm.engine.config.model.load_format == "meta"
        assert llm.engine.arch.vocab_size == 384  # Llama 2's params.json says -1
        _greedy_matches_hf(llm, hf_llamas[version], hf)


@pytest.mark.parametrize("version, parts", CHECKPOINTS)
def test_meta_checkpoint_at_tp2_matches_hf(version, parts, hf_llamas, meta_checkpoints, hf,
                                           ray_session):
    with LLM(meta_checkpoints[version, parts], tokenizer=hf_llamas[version], **SMALL_CACHE,
             tensor_parallel_size=2, execute_timeout_s=60, engine_process=False) as llm:
        _greedy_matches_hf(llm, hf_llamas[version], hf)
