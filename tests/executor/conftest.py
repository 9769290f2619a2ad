"""Greedy-parity and data-plane helpers shared by the executor tests."""

from typing import Any

import pytest
import zmq

from zllm import LLM, SamplingParams

# Eight prompts of different lengths (BOS, then ordinary token ids).
PROMPTS = [[0] + [(7 * i + 13 * j) % 380 + 4 for j in range(n)]
           for i, n in enumerate((3, 17, 6, 11, 1, 20, 9, 14))]
MAX_TOKENS = 16

# Tiny cache (24 blocks of 4 tokens) and token budget (16): forces preemption and split prefills.
PRESSURE = dict(block_size=4, num_kv_blocks=24, max_num_batched_tokens=16, max_num_seqs=8,
                device="cpu", dtype="float32")


def greedy_tokens(llm: LLM) -> list[list[int]]:
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    return [out.outputs[0].token_ids for out in llm.generate(PROMPTS, params, use_tqdm=False)]


@pytest.fixture(scope="session")
def reference_tokens(gqa_model: str, hf) -> list[list[int]]:
    """Hugging Face transformers' greedy tokens for PROMPTS (float32, one prompt at a time)."""
    return [hf.greedy(gqa_model, prompt, MAX_TOKENS) for prompt in PROMPTS]


def make_llm(model: str, **overrides: Any) -> LLM:
    return LLM(model=model, **{**PRESSURE, **overrides})


def stranger_socket(context: zmq.Context, kind: int, address: str,
                    server_key: bytes = b"") -> zmq.Socket:
    """A socket of someone with no rank's key: NULL security, or (given the driver's public key,
    as if it had leaked) CURVE with a key pair of its own."""
    sock = context.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if server_key:
        sock.curve_serverkey = server_key
        sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
    sock.connect(address)
    return sock
