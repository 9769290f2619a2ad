"""Where a model's weights are, in the layouts zllm reads. Used by the engine to fail early and by
the workers to load."""

from __future__ import annotations

import glob
import json
import os


def resolve_model_dir(model: str) -> str:
    """The directory to load: the demo model (built on first use) or a local path."""
    if model == "demo":
        from zllm.demo import ensure_demo_model

        return ensure_demo_model()
    if not os.path.isdir(model):
        raise ValueError(f"model directory {model!r} does not exist (give a local Hugging Face or "
                         f"Meta Llama directory, or 'demo')")
    return model


def detect_load_format(model_dir: str, load_format: str) -> str:
    """safetensors, meta or dummy; raises if the directory holds no weights of that format."""
    if load_format == "dummy":
        return "dummy"
    has_safetensors = bool(safetensors_files(model_dir))
    has_meta = bool(meta_files(model_dir))
    if load_format == "auto":
        if has_safetensors:
            return "safetensors"
        if has_meta:
            return "meta"
        raise ValueError(f"model directory {model_dir!r} has no weights: expected *.safetensors "
                         f"(or model.safetensors.index.json) or consolidated.*.pth")
    if load_format == "safetensors" and not has_safetensors:
        raise ValueError(f"model directory {model_dir!r} has no *.safetensors weights")
    if load_format == "meta" and not has_meta:
        raise ValueError(f"model directory {model_dir!r} has no consolidated.*.pth weights")
    return load_format


def safetensors_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(model_dir, n) for n in names]
    return sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))


def meta_files(model_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(model_dir, "consolidated.*.pth")))
