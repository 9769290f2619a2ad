"""The worker's half of the model registry: the architecture's class, built as this rank's shard.

zllm/architecture.py names the class of each supported architecture (a dotted path, so the engine
can check a model without importing torch code); here that path is imported and the class built.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Optional

import torch
from fairscale.nn.model_parallel.initialize import get_model_parallel_world_size
from torch import nn

from zllm.architecture import MODEL_CLASSES, ModelArchitecture
from zllm.worker.models.layers import use_fused_kernels
from zllm.worker.models.linear import column_major_linears


def model_class(arch: ModelArchitecture) -> type[nn.Module]:
    module, _, name = MODEL_CLASSES[arch.architecture].rpartition(".")
    return getattr(importlib.import_module(module), name)


def build_model(arch: ModelArchitecture, dtype: torch.dtype, device: torch.device,
                fused: Optional[bool] = None) -> nn.Module:
    """This rank's shard with uninitialised weights (the loader fills them), allocated directly
    on `device` in `dtype`. `fused` (default: whenever the device and dtype allow it) picks
    flashinfer's kernels for norms, RoPE and activations. On CUDA the linear layers' weights
    are column-major (`column_major_linears`)."""
    arch.check_tensor_parallel(get_model_parallel_world_size())
    if fused is None:
        fused = use_fused_kernels(device, dtype)
    with torch.device(device), _default_dtype(dtype):
        model = model_class(arch)(arch, fused)
    if device.type == "cuda":
        column_major_linears(model)
    return model.eval().requires_grad_(False)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """Parameters are created in the model's dtype (buffers that need float32 say so)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)
