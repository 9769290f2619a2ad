"""Shared fixtures: tiny random Llama checkpoints built once per test session."""

import pytest

from zllm.demo import build_tiny_llama


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """A 2-layer Llama with 4 query heads and 2 KV heads: splits evenly across 2 ranks."""
    path = str(tmp_path_factory.mktemp("tiny-llama"))
    build_tiny_llama(path)
    return path
