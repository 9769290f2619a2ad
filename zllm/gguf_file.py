"""GGUF files (llama.cpp's format) as the engine sees them: where the file is, and its metadata
as a Hugging Face-style config.

Read with the `gguf` package, llama.cpp's own reader and the reference implementation of the
format. Nothing here reads a weight: the engine needs only the architecture and the tokenizer
(`zllm.tokenizer`), and the workers' tensor reader lives in `zllm/worker/models/checkpoint.py`.
"""

from __future__ import annotations

import functools
import glob
import logging
import os
from typing import Any, Optional

logger = logging.getLogger(__name__)

GGUF_SUFFIX = ".gguf"

# general.architecture -> (Hugging Face architectures[0], model_type).
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}

# "<architecture>.<key>" in the file -> the Hugging Face config key.
CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.key_length": "head_dim",
    "rope.freq_base": "rope_theta",
    "vocab_size": "vocab_size",
}

# general.file_type (llama.cpp's LlamaFileType) of unquantised files -> their torch dtype.
FILE_DTYPES = {0: "float32", 1: "float16", 32: "bfloat16"}


def find_gguf_file(path: str) -> Optional[str]:
    """The .gguf file that `path` is, or the one inside directory `path`; None if there is none."""
    if os.path.isfile(path):
        return path if path.endswith(GGUF_SUFFIX) else None
    files = sorted(glob.glob(os.path.join(path, "*" + GGUF_SUFFIX)))
    if len(files) > 1:
        names = ", ".join(os.path.basename(f) for f in files)
        raise ValueError(f"model directory {path!r} holds {len(files)} .gguf files ({names}); "
                         f"give the path of the one to load")
    return files[0] if files else None


@functools.lru_cache(maxsize=4)
def open_gguf(path: str):
    """A memory-mapped GGUFReader, kept open: parsing a large vocabulary's metadata takes
    seconds, and the engine, the tokenizer and an in-process worker all read the same file."""
    from gguf import GGUFReader

    return GGUFReader(path)


def metadata_value(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_hf_config(path: str) -> dict[str, Any]:
    """The file's metadata as a Hugging Face config.json dict (architectures, model_type,
    hidden_size, ..., eos_token_id), so GGUF models plug into the same architecture code."""
    reader = open_gguf(path)
    arch = metadata_value(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"GGUF file {path!r} has general.architecture {arch!r}; zllm reads "
                         f"{', '.join(sorted(ARCHITECTURES))}")
    architecture, model_type = ARCHITECTURES[arch]
    config: dict[str, Any] = {"architectures": [architecture], "model_type": model_type}
    for key, hf_key in CONFIG_KEYS.items():
        value = metadata_value(reader, f"{arch}.{key}")
        if value is not None:
            config[hf_key] = value
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    if "head_dim" not in config and arch == "llama":  # llama.cpp's Llama rotates the whole head
        config["head_dim"] = metadata_value(reader, "llama.rope.dimension_count",
                                            config["hidden_size"] // config["num_attention_heads"])
    if "vocab_size" not in config:
        config["vocab_size"] = len(reader.fields["tokenizer.ggml.tokens"].data)
    tensor_names = {t.name for t in reader.tensors}
    config["tie_word_embeddings"] = "output.weight" not in tensor_names
    config["rope_scaling"] = _rope_scaling(reader, arch, path, tensor_names)
    config["bos_token_id"] = metadata_value(reader, "tokenizer.ggml.bos_token_id")
    config["eos_token_id"] = _eos_token_ids(reader)
    config["torch_dtype"] = FILE_DTYPES.get(metadata_value(reader, "general.file_type"))
    return config


def _rope_scaling(reader, arch: str, path: str, tensor_names: set[str]) -> Optional[dict[str, Any]]:
    if "rope_freqs.weight" in tensor_names:
        # llama.cpp stores Llama 3.1's frequency scaling as per-frequency factors, which
        # transformers' GGUF loader ignores too; zllm follows it, so say so.
        logger.warning("GGUF file %r has rope_freqs (Llama 3.1-style RoPE scaling), which zllm "
                       "does not apply yet, as transformers does not: expect drift on long "
                       "contexts", path)
    kind = metadata_value(reader, f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    scaling = {"rope_type": kind, "factor": metadata_value(reader, f"{arch}.rope.scaling.factor")}
    original = metadata_value(reader, f"{arch}.rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = original
    return scaling


def _eos_token_ids(reader) -> list[int]:
    """End of sequence, plus end of turn / end of message where the file names them: llama.cpp
    stops generating at any of them."""
    ids = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                "tokenizer.ggml.eom_token_id"):
        value = metadata_value(reader, key)
        if value is not None and value not in ids:
            ids.append(value)
    return ids
