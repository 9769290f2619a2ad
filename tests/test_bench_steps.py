"""How `zllm bench throughput` sums the GPU's per-step times that the worker records."""

import pytest

from zllm.bench.throughput import gpu_summary


def test_gpu_summary_splits_busy_and_idle_by_step_kind():
    # (idle before, busy, requests, all decodes) per step, as the worker's GpuTimer reports them.
    steps = [(0.0, 0.030, 16, False), (0.002, 0.004, 256, True), (0.005, 0.028, 32, False),
             (0.001, 0.004, 256, True)]
    summary = gpu_summary(steps)
    assert summary["prefill"] == {"steps": 2, "busy_s": pytest.approx(0.058),
                                  "idle_before_s": pytest.approx(0.005)}
    assert summary["decode"] == {"steps": 2, "busy_s": pytest.approx(0.008),
                                 "idle_before_s": pytest.approx(0.003)}
    assert summary["all"]["steps"] == 4
    assert summary["all"]["busy_s"] == pytest.approx(0.066)
    assert summary["all"]["idle_before_s"] == pytest.approx(0.008)
