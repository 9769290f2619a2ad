"""Every supported family gives Hugging Face transformers' greedy tokens, token for token (float32,
CPU): in one step per prompt, with prompts split over several steps, and over two Ray ranks."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import PROMPTS
from tests.models.conftest import FAMILIES
from zllm import LLM, SamplingParams

MAX_TOKENS = 16


def check_matches_hf(llm: LLM, model_dir: str, hf) -> list:
    """Greedy outputs of PROMPTS, each checked against transformers' generate."""
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    for out in outputs:
        assert out.outputs[0].token_ids == hf.greedy(model_dir, out.prompt_token_ids, MAX_TOKENS), \
            out.prompt
    return outputs


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_hf(family, family_checkpoint, hf):
    path = family_checkpoint(family)
    with LLM(path, device="cpu") as llm:
        check_matches_hf(llm, path, hf)


@pytest.mark.parametrize("family", FAMILIES)
def test_split_token_budget_matches_hf(family, family_checkpoint, hf):
    # A 7-token budget splits prompts across steps (chunked prefill) and mixes them with decodes;
    # 4-token blocks put window edges and block edges in different places.
    path = family_checkpoint(family)
    with LLM(path, device="cpu", max_num_batched_tokens=7, max_num_seqs=3, block_size=4) as llm:
        check_matches_hf(llm, path, hf)


def test_mistral_window_shorter_than_prompt_changes_tokens(family_checkpoint, hf):
    """The 8-token window matters: without it transformers picks other tokens, and zllm follows
    the windowed model (decoding far past the window)."""
    from transformers import AutoModelForCausalLM

    path = family_checkpoint("mistral")
    full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, sliding_window=None).eval()
    assert full.config.sliding_window is None
    with LLM(path, device="cpu") as llm:
        outputs = check_matches_hf(llm, path, hf)
    assert sum(len(o.prompt_token_ids) > 8 for o in outputs) >= 5
    differ = 0
    with torch.no_grad():
        for o in outputs:
            x = torch.tensor([o.prompt_token_ids])
            out = full.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                max_new_tokens=MAX_TOKENS)
            differ += out[0, x.shape[1]:].tolist() != o.outputs[0].token_ids
    assert differ >= 2


@pytest.mark.parametrize("family", ["qwen3", "mistral"])
def test_tp2_on_ray_matches_hf(family, family_checkpoint, hf, ray_session):
    # Each rank holds 2 query heads and 1 KV head; prompts still split over steps.
    path = family_checkpoint(family)
    with LLM(path, device="cpu", tensor_parallel_size=2, distributed_executor_backend="ray",
             max_num_batched_tokens=7) as llm:
        check_matches_hf(llm, path, hf)


def test_dummy_weights_are_seeded_and_read_no_checkpoint(family_checkpoint, hf, tmp_path):
    """load_format dummy (benchmarks of real shapes) fills every parameter from the seed: it runs
    from a directory that holds no weights at all, and its tokens are not the checkpoint's."""
    import shutil

    path = family_checkpoint("gemma2")
    shapes_only = tmp_path / "gemma2-no-weights"
    shutil.copytree(path, shapes_only, ignore=shutil.ignore_patterns("*.safetensors*"))
    assert not list(shapes_only.glob("*.safetensors"))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    runs = []
    for seed in (0, 0, 1):
        with LLM(str(shapes_only), device="cpu", load_format="dummy", seed=seed,
                 engine_process=False) as llm:
            outputs = llm.generate(PROMPTS[:3], params, use_tqdm=False)
            runs.append([o.outputs[0].token_ids for o in outputs])
    assert runs[0] == runs[1] != runs[2]
    real = [hf.greedy(path, o.prompt_token_ids, 8) for o in outputs]
    assert runs[2] != real
