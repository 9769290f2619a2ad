"""The user-facing entry points: chat, YAML, the built-in models and the command line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from zllm import LLM, EngineConfig, SamplingParams
from zllm.config import (OFFLINE_BUDGET_MIN_GPU_GIB, OFFLINE_MAX_NUM_BATCHED_TOKENS, gpu_memory_gib,
                         offline_config)


def test_chat_uses_the_chat_template(gqa_model, hf):
    """chat() sends the ids that the Hugging Face tokenizer's apply_chat_template gives (with the
    generation prompt), and answers them with HF's greedy tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gqa_model)
    conversations = [[{"role": "user", "content": "Hello there"}],
                     [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": "What is a KV cache?"}]]
    with LLM(gqa_model, device="cpu", engine_process=False) as llm:
        outputs = llm.chat(conversations, SamplingParams(temperature=0, max_tokens=6),
                           use_tqdm=False)
    for messages, out in zip(conversations, outputs):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        assert out.prompt_token_ids == ids
        assert out.outputs[0].token_ids == hf.greedy(gqa_model, ids, 6)


def test_from_config_reads_yaml_with_overrides(gqa_model, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"model:\n  model: {gqa_model}\ncache:\n  block_size: 8\ndevice:\n  device: cpu\n")
    with LLM.from_config(str(path), max_num_seqs=3) as llm:
        assert llm.engine.config.cache.block_size == 8
        assert llm.engine.config.scheduler.max_num_seqs == 3
        # The file sets no token budget, but the device is the CPU: the server's default.
        assert llm.engine.config.scheduler.max_num_batched_tokens == 8192
        assert llm.generate("Hi", SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids


def _fake_nvidia_smi(directory, mib: str) -> str:
    """A PATH whose nvidia-smi reports GPUs of `mib` MiB each ("" for a failing one)."""
    tool = directory / "nvidia-smi"
    tool.write_text(f"#!/bin/sh\nprintf '{mib}'\n" if mib else "#!/bin/sh\nexit 9\n")
    tool.chmod(0o755)
    return f"{directory}{os.pathsep}{os.environ.get('PATH', '')}"


@pytest.mark.parametrize("gpus, gib", [("81559\n81559\n", 81559 / 1024),
                                       ("81559\n24564\n", 24564 / 1024), ("", 0.0)],
                         ids=["two-80GB", "one-24GB", "no-gpu"])
def test_the_offline_token_budget_needs_a_large_gpu_and_yields_to_any_setting(
        tmp_path, monkeypatch, gpus, gib):
    """LLM and zllm generate take OFFLINE_MAX_NUM_BATCHED_TOKENS where nothing sets the budget,
    the device may be a GPU and every GPU has at least OFFLINE_BUDGET_MIN_GPU_GIB; a file, a
    flag or a keyword that sets it wins; device cpu and the server keep 8192."""
    from zllm.cli import build_parser, generate_config, serve_config

    monkeypatch.setenv("PATH", _fake_nvidia_smi(tmp_path, gpus))
    assert gpu_memory_gib() == gib
    big = OFFLINE_MAX_NUM_BATCHED_TOKENS if gib >= OFFLINE_BUDGET_MIN_GPU_GIB else 8192
    assert OFFLINE_MAX_NUM_BATCHED_TOKENS != 8192

    def kwargs(**kw) -> int:
        return offline_config(lambda d: EngineConfig.from_dict({}, d, **kw)).scheduler.max_num_batched_tokens

    assert kwargs() == big and kwargs(device="cuda") == big
    assert kwargs(device="cpu") == 8192 and kwargs(max_num_batched_tokens=1024) == 1024
    path = tmp_path / "c.yaml"
    path.write_text("scheduler:\n  max_num_batched_tokens: 4096\n")
    assert offline_config(lambda d: EngineConfig.from_yaml(str(path), d)
                          ).scheduler.max_num_batched_tokens == 4096

    def budget(*argv: str) -> int:
        args = build_parser().parse_args(list(argv))
        config = serve_config(args) if argv[0] == "serve" else generate_config(args)
        return config.scheduler.max_num_batched_tokens

    assert budget("generate", "Hi") == big
    assert budget("generate", "Hi", "--max-num-batched-tokens", "2048") == 2048
    assert budget("generate", "Hi", "--device", "cpu") == 8192
    assert budget("generate", "Hi", "--config", "configs/tp1-gpu.yaml") == big  # sets no budget
    assert budget("serve") == 8192
    assert budget("serve", "configs/tp1-gpu.yaml") == 8192


def test_llm_and_from_config_take_the_offline_budget_on_a_large_gpu(gqa_model, tmp_path,
                                                                    monkeypatch):
    """LLM's own construction, from keywords and from a file (no device set: auto), on a
    machine whose nvidia-smi reports an 80 GB GPU (the engine itself runs on this CPU)."""
    monkeypatch.setenv("PATH", _fake_nvidia_smi(tmp_path, "81559\n"))
    path = tmp_path / "c.yaml"
    path.write_text(f"model:\n  model: {gqa_model}\n")
    for make in (lambda: LLM(gqa_model, num_kv_blocks=64, engine_process=False),
                 lambda: LLM.from_config(str(path), num_kv_blocks=64, engine_process=False)):
        with make() as llm:
            budget = llm.engine.config.scheduler.max_num_batched_tokens
            assert budget == OFFLINE_MAX_NUM_BATCHED_TOKENS
            out = llm.generate("Hi", SamplingParams(max_tokens=2), use_tqdm=False)
            assert len(out[0].outputs[0].token_ids) == 2


def test_generate_help_names_the_offline_budget_and_serve_help_does_not():
    def help_text(command: str) -> str:
        result = subprocess.run([sys.executable, "-m", "zllm", command, "--help"],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0
        return " ".join(result.stdout.split())

    note = f"offline {OFFLINE_MAX_NUM_BATCHED_TOKENS} on GPUs of at least 70 GiB"
    assert note in help_text("generate") and note not in help_text("serve")


def test_tiny_random_model_runs_from_the_command_line_with_and_without_chat():
    for flags, label in (([], "--- user: 'Hello'"), (["--raw"], "--- prompt: 'Hello'")):
        result = subprocess.run([sys.executable, "-m", "zllm", "generate", "Hello", "--max-tokens",
                                 "5", "--device", "cpu", "--model", "tiny-random", *flags],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert label in result.stdout and "5 tokens, finish_reason=length" in result.stdout


def test_command_line_reports_bad_config_values():
    result = subprocess.run([sys.executable, "-m", "zllm", "generate", "Hi", "--block-size", "3"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "'block_size' = 3 is not allowed" in result.stderr


def test_serve_help_lists_every_config_key():
    from zllm.config import all_keys

    result = subprocess.run([sys.executable, "-m", "zllm", "serve", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0
    for key in all_keys():
        assert "--" + key.replace("_", "-") in result.stdout


def test_serve_stops_on_unknown_keys_and_bad_values(tmp_path):
    bad_key = tmp_path / "bad-key.yaml"
    bad_key.write_text("server:\n  prot: 8000\n")
    result = subprocess.run([sys.executable, "-m", "zllm", "serve", str(bad_key)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "unknown config key 'prot'" in result.stderr
    result = subprocess.run([sys.executable, "-m", "zllm", "serve", "configs/serve-cpu-demo.yaml",
                             "--port", "70000"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "'port' = 70000 is not allowed" in result.stderr


def test_serve_configs_load():
    from zllm import EngineConfig

    demo = EngineConfig.from_yaml("configs/serve-cpu-demo.yaml", port=9000)
    assert demo.server.port == 9000 and demo.model.model == "smollm2"
    gpu = EngineConfig.from_yaml("configs/serve-gpu-llama.yaml")
    assert gpu.parallel.tensor_parallel_size == 2 and gpu.server.host == "0.0.0.0"


def test_served_model_name_follows_a_model_flag_unless_named_too():
    from zllm.cli import build_parser, serve_config

    def served_name(*flags: str) -> str:
        config = serve_config(build_parser().parse_args(["serve", *flags]))
        return config.server.served_model_name or config.model.model

    gpu = "configs/serve-gpu-llama.yaml"
    assert served_name(gpu) == "llama-3.1-8b-instruct"
    assert served_name(gpu, "--model", "/models/other") == "/models/other"
    assert served_name(gpu, "--model", "/models/other", "--served-model-name", "x") == "x"
    assert served_name("configs/serve-cpu-demo.yaml") == "smollm2"
