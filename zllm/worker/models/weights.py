"""Fill one rank's model shard from a checkpoint, reading only that rank's slice of each tensor.

Every parameter is described in Hugging Face terms: which checkpoint tensors, along which dim,
which range. Model modules are named as the checkpoint's, so a parameter is by default the whole
tensor of its own name; a layer that shards or fuses says which pieces make its parameters
(`shard_pieces`, zllm/worker/models/linear.py). A reader (zllm/worker/models/checkpoint.py) turns
pieces into I/O for the format: safetensors, Meta's consolidated.NN.pth or GGUF. `dummy` fills
random weights of the right shapes.
"""

from __future__ import annotations

import torch
from torch import nn

from zllm.worker.models.checkpoint import Piece, make_reader


def shard_plan(model: nn.Module) -> dict[str, list[Piece]]:
    """For each parameter of this rank, the checkpoint pieces it is the concatenation of (dim 0).
    A parameter shared by two modules (tied embeddings) is loaded once, under its first name."""
    plan = {}
    for name, param in model.named_parameters():
        owner, _, param_name = name.rpartition(".")
        pieces = getattr(model.get_submodule(owner), "shard_pieces", None)
        plan[name] = pieces(owner, param_name) if pieces else [Piece(name)]
    return plan


def load_weights(model: nn.Module, model_dir: str, load_format: str, rank: int,
                 seed: int) -> None:
    params = dict(model.named_parameters())
    if load_format == "dummy":
        _fill_dummy(params, seed + rank)
        return
    reader = make_reader(model_dir, load_format, model.arch)
    with torch.no_grad():
        for name, pieces in shard_plan(model).items():
            tensor = torch.cat([reader.read(piece) for piece in pieces], dim=0)
            param = params[name]
            if tensor.shape != param.shape:
                raise ValueError(f"checkpoint gives {name} shape {tuple(tensor.shape)}, this rank "
                                 f"expects {tuple(param.shape)}")
            param.copy_(tensor)


def _fill_dummy(params: dict[str, nn.Parameter], seed: int) -> None:
    generator = None
    for name, param in params.items():
        if generator is None or generator.device != param.device:
            generator = torch.Generator(device=param.device).manual_seed(seed)
        with torch.no_grad():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
