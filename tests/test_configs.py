"""Every shipped example config loads and validates."""

import dataclasses
import glob
import os
import re

import pytest
import yaml

from zllm.config import EngineConfig

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.yaml")))


def test_there_are_example_configs():
    assert len(CONFIGS) >= 4


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_example_config_loads_every_key_it_sets(path):
    """Every key of the file, read by PyYAML, lands in its section with its value."""
    with open(path) as f:
        values = yaml.safe_load(f)
    config = EngineConfig.from_yaml(path)
    assert set(values) <= {f.name for f in dataclasses.fields(EngineConfig)}
    for section, keys in values.items():
        for key, value in keys.items():
            assert getattr(getattr(config, section), key) == value, (section, key)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_example_config_says_what_its_name_says(path):
    """tpN files run N ranks (Ray past one), two-node files join a cluster, serve files set the
    server, CPU files run the torch backend on CPU and GPU files flashinfer on CUDA."""
    name = os.path.basename(path)
    config = EngineConfig.from_yaml(path)
    tp = re.match(r"tp(\d+)-", name)
    if tp:
        assert config.parallel.tensor_parallel_size == int(tp.group(1))
    if config.parallel.tensor_parallel_size > 1:
        assert config.parallel.distributed_executor_backend == "ray"
    if "two-nodes" in name:
        assert config.parallel.ray_address == "auto" and config.parallel.tensor_parallel_size > 8
    if name.startswith("serve-"):
        with open(path) as f:
            assert "server" in yaml.safe_load(f)
    gpu = "gpu" in name or config.parallel.tensor_parallel_size > 1
    assert config.device.device == ("cuda" if gpu else "cpu")
    if gpu:
        assert config.device.attention_backend == "flashinfer"
    else:
        assert config.device.attention_backend in ("auto", "torch")
        assert config.model.model == "smollm2"  # the built-in default model runs anywhere


def test_unknown_placement_strategy_is_rejected():
    with pytest.raises(ValueError, match="placement_strategy"):
        EngineConfig.from_dict({"parallel": {"placement_strategy": "RANDOM"}})
