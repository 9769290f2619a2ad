"""Every shipped example config loads and validates."""

import glob
import os

import pytest

from zllm.config import EngineConfig

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.yaml")))


def test_there_are_example_configs():
    assert len(CONFIGS) >= 4


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_example_config_is_valid(path):
    EngineConfig.from_yaml(path)


def test_unknown_placement_strategy_is_rejected():
    with pytest.raises(ValueError, match="placement_strategy"):
        EngineConfig.from_dict({"parallel": {"placement_strategy": "RANDOM"}})
