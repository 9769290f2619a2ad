"""The user-facing entry points: chat, YAML, the built-in models and the command line."""

from __future__ import annotations

import subprocess
import sys

from zllm import LLM, EngineConfig, SamplingParams
from zllm.config import OFFLINE_MAX_NUM_BATCHED_TOKENS


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
        # The file sets no token budget: the offline one applies.
        assert llm.engine.config.scheduler.max_num_batched_tokens == OFFLINE_MAX_NUM_BATCHED_TOKENS
        assert llm.generate("Hi", SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids


def test_the_offline_token_budget_is_a_default_that_any_setting_overrides(tmp_path):
    """LLM and zllm generate take OFFLINE_MAX_NUM_BATCHED_TOKENS where nothing sets the budget;
    a config file, a flag or a keyword that sets it wins; the server keeps 8192."""
    from zllm.cli import build_parser, config_from_args, serve_config
    from zllm.llm import OFFLINE_DEFAULTS

    assert OFFLINE_MAX_NUM_BATCHED_TOKENS != 8192
    assert EngineConfig.from_dict({}).scheduler.max_num_batched_tokens == 8192
    offline = EngineConfig.from_dict({}, OFFLINE_DEFAULTS)
    assert offline.scheduler.max_num_batched_tokens == OFFLINE_MAX_NUM_BATCHED_TOKENS
    assert EngineConfig.from_dict({"scheduler": {"max_num_batched_tokens": 512}}, OFFLINE_DEFAULTS,
                                  ).scheduler.max_num_batched_tokens == 512
    assert EngineConfig.from_dict({}, OFFLINE_DEFAULTS, max_num_batched_tokens=1024,
                                  ).scheduler.max_num_batched_tokens == 1024
    path = tmp_path / "c.yaml"
    path.write_text("scheduler:\n  max_num_batched_tokens: 4096\n")
    assert EngineConfig.from_yaml(str(path), OFFLINE_DEFAULTS).scheduler.max_num_batched_tokens == 4096

    def budget(*argv: str, defaults=None) -> int:
        args = build_parser().parse_args(list(argv))
        config = serve_config(args) if argv[0] == "serve" else config_from_args(args, defaults)
        return config.scheduler.max_num_batched_tokens

    assert budget("generate", "Hi", defaults=OFFLINE_DEFAULTS) == OFFLINE_MAX_NUM_BATCHED_TOKENS
    assert budget("generate", "Hi", "--max-num-batched-tokens", "2048",
                  defaults=OFFLINE_DEFAULTS) == 2048
    assert budget("generate", "Hi", "--config", "configs/tp1-gpu.yaml",
                  defaults=OFFLINE_DEFAULTS) == OFFLINE_MAX_NUM_BATCHED_TOKENS
    assert budget("serve") == 8192
    assert budget("serve", "configs/serve-gpu-llama.yaml") == 8192


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
