"""The user-facing entry points: chat, YAML, the built-in models and the command line."""

from __future__ import annotations

import subprocess
import sys

from zllm import LLM, SamplingParams


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
        assert llm.generate("Hi", SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids


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
