"""Shared fixtures: tiny random Llama checkpoints and Hugging Face reference outputs."""

from __future__ import annotations

import logging
import os
from typing import Optional

# Tests run Triton kernels (zllm/worker/attention/triton_decode.py) on Triton's CPU interpreter.
# Triton reads this when it is first imported, which torch or transformers may do, so it is set
# before anything else is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from zllm.demo import build_tiny_llama  # noqa: E402

# Prompts of different lengths (in tokens of the demo tokenizer), some sharing prefixes.
PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog.",
    "A paged KV cache stores keys and values in fixed-size blocks, and the scheduler",
    "Once upon a time",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.",
    "Tensor parallelism splits every layer",
    "Café, naïve, über, 東京",
    "How are you today? The scheduler picks running and waiting requests under a token budget.",
]


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    os.environ.setdefault("ZLLM_CACHE_DIR", str(tmp_path_factory.mktemp("zllm-cache")))


def _build(tmp_path_factory, name: str, **kwargs) -> str:
    path = str(tmp_path_factory.mktemp(name))
    build_tiny_llama(path, **kwargs)
    return path


@pytest.fixture(scope="session")
def gqa_model(tmp_path_factory) -> str:
    """4 query heads sharing 2 KV heads, untied embeddings."""
    return _build(tmp_path_factory, "gqa", num_heads=4, num_kv_heads=2, tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tied_model(tmp_path_factory) -> str:
    """Tied embeddings, no GQA, a different seed."""
    return _build(tmp_path_factory, "tied", num_heads=4, num_kv_heads=4, tie_word_embeddings=True,
                  seed=1)


class HFReference:
    """Greedy generations of Hugging Face transformers, cached per (model, prompt, length). A
    GGUF model is `model_dir` with its `gguf_file` name (transformers' own GGUF loading)."""

    def __init__(self) -> None:
        self.models = {}
        self.cache = {}

    def model(self, model_dir: str, gguf_file: Optional[str] = None):
        from transformers import AutoModelForCausalLM

        if (model_dir, gguf_file) not in self.models:
            extra = {"gguf_file": gguf_file} if gguf_file else {}
            self.models[model_dir, gguf_file] = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=torch.float32, **extra).eval()
        return self.models[model_dir, gguf_file]

    def greedy(self, model_dir: str, prompt_ids: list[int], max_new_tokens: int,
               gguf_file: Optional[str] = None) -> list[int]:
        key = (model_dir, gguf_file, tuple(prompt_ids), max_new_tokens)
        if key not in self.cache:
            ids = torch.tensor([prompt_ids])
            # One thread: a batch-1 decode's small matmuls gain little from two, and each op's
            # thread handoff stalls for many milliseconds when other processes share the cores.
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                with torch.no_grad():
                    out = self.model(model_dir, gguf_file).generate(
                        ids, attention_mask=torch.ones_like(ids), do_sample=False,
                        max_new_tokens=max_new_tokens)
            finally:
                torch.set_num_threads(threads)
            self.cache[key] = out[0, len(prompt_ids):].tolist()
        return self.cache[key]


@pytest.fixture(scope="session")
def hf() -> HFReference:
    return HFReference()


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray instance for the module: executors find it running and leave it up."""
    import ray

    # 6 logical CPUs: a module-scoped TP=2 engine and one more TP=4 executor fit side by side.
    context = ray.init(address="local", num_cpus=6, include_dashboard=False,
                       object_store_memory=128 * 2**20, logging_level=logging.WARNING)
    yield context.address_info["gcs_address"]  # for engine core processes to join
    ray.shutdown()
