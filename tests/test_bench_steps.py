"""How `zllm bench throughput` sums the GPU's per-step times that the worker records, and how
the worker's host time leaves out its waits for the GPU."""

import pytest
import torch

from zllm.bench.throughput import gpu_summary, steady_host_ms
from zllm.worker.staging import PinnedStaging


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


def test_steady_host_ms_reports_own_time_wait_and_whole_launch_of_full_decode_steps():
    # The worker's (own seconds, requests, all decodes, seconds waiting for the GPU) per launch:
    # one of the three full decode steps waited.
    times = [(0.009, 16, False, 0.0), (0.001, 256, True, 0.0), (0.003, 256, True, 0.0),
             (0.0015, 256, True, 0.0024), (0.0005, 200, True, 0.0)]
    got = steady_host_ms(times, 256)
    assert got["host"] == pytest.approx(1.5)  # median of 1, 3 and 1.5
    assert got["wait"] == pytest.approx(0.8)  # mean: the median would hide the one wait
    assert got["launch"] == pytest.approx(3.0)  # median of 1, 3 and 3.9
    assert steady_host_ms(times, 255) == {"host": None, "wait": None, "launch": None}
    # The engine core's entries have no wait.
    core = steady_host_ms([(0.002, 256, True), (0.004, 256, True)], 256)
    assert core == {"host": pytest.approx(3.0), "wait": None, "launch": None}


class _Event:
    """A stand-in for a CUDA event: done or not; synchronizing does some host work."""

    def __init__(self, done: bool) -> None:
        self.done, self.synced = done, False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        sum(range(20000))
        self.synced = True


def test_staging_counts_only_the_waits_for_unfinished_events():
    staging = PinnedStaging(torch.device("cpu"))
    staging.wait(None)
    done = _Event(done=True)
    staging.wait(done)
    assert staging.waited_s == 0.0 and not done.synced
    pending = _Event(done=False)
    staging.wait(pending)
    assert pending.synced and staging.waited_s > 0.0


def test_profile_phases_split_kernels_at_the_last_prefill_kernel():
    from types import SimpleNamespace

    from zllm.bench.throughput import _phase_kinds

    def kernel(start, end, name):  # µs, as torch.profiler's events
        return SimpleNamespace(time_range=SimpleNamespace(start=start, end=end), name=name,
                               device_type="DeviceType.CUDA")
    host = SimpleNamespace(time_range=SimpleNamespace(start=0, end=900), name="aten::mm",
                           device_type="DeviceType.CPU")
    events = [kernel(0, 600, "nvjet_gemm"), kernel(600, 700, "BatchPrefillWithPagedKVCache"),
              kernel(700, 720, "FusedAddRMSNormKernel"), host,
              kernel(800, 1000, "nvjet_gemm"), kernel(1000, 1100, "_gqa_decode_kernel"),
              kernel(1200, 1400, "nvjet_gemm"), kernel(1400, 1500, "_gqa_decode_kernel")]
    res = {"gpu": {"prefill": {"steps": 1, "busy_s": 0.0008},
                   "decode": {"steps": 2, "busy_s": 0.0007}},
           "steps": {"prefill": {"floor_s": 0.0005}, "decode": {"floor_s": 0.0004}}}
    phases = _phase_kinds(SimpleNamespace(events=lambda: events), res)
    prompt, decode = phases["prompt"], phases["decode"]
    assert prompt["ms_by_kind_per_step"] == {"gemm": 0.6, "attention": 0.1}
    assert prompt["kernels_per_step"] == 2
    assert prompt["span_ms_per_step"] == pytest.approx(0.8)
    # The rest of the last prompt step's layer (the norm) counts as decode.
    assert decode["ms_by_kind_per_step"] == {"gemm": 0.2, "attention": 0.1, "norm": 0.01}
    assert decode["kernel_ms_per_step"] == pytest.approx(0.31)
    assert decode["floor_ms_per_step"] == pytest.approx(0.2)
    assert decode["top_kernels_ms_per_step"][0] == ("nvjet_gemm", 0.2)
    # No prefill kernel (a profile of decode steps only): no split.
    assert _phase_kinds(SimpleNamespace(events=lambda: events[4:]), res) == {}
