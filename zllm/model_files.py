"""Where a model's weights are, in the layouts zllm reads. Used by the engine to fail early and by
the workers to load."""

from __future__ import annotations

import collections
import glob
import json
import os
import pickle
import zipfile

from zllm.gguf_file import find_gguf_file

def resolve_model_path(model: str) -> str:
    """What to load: the demo model (built on first use), or a local directory or .gguf file."""
    if model == "demo":
        from zllm.demo import ensure_demo_model

        return ensure_demo_model()
    if not os.path.exists(model):
        raise ValueError(f"model path {model!r} does not exist (give a local Hugging Face or Meta "
                         f"Llama directory, a .gguf file, or 'demo')")
    return model


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
