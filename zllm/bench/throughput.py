"""`zllm bench`: throughput and latency against the hardware roofline and a peer.

Workloads (random prompt token ids, greedy, ignore_eos):
  W1       256 requests x 512 prompt tokens, 256 output tokens
  W2       256 requests, prompt and output lengths uniform in 100..1024 (seed 0)
  latency  1 request, 512 prompt tokens, 256 output tokens: TTFT and TPOT

At start it measures the device's copy bandwidth and bf16 matmul rate; every executed step gets a
floor max(bytes / bandwidth, FLOPs / rate) (zllm/bench/roofline.py), and the report gives
measured / floor overall and split into prefill-carrying and pure-decode steps, plus how much of
the wall time the engine (scheduler, output processing) spends outside the worker.
`--peer hf` runs Hugging Face transformers' continuous batching (`generate_batch`) on the same
model shape and workload and reports the ratio. `--executors uni,ray` runs every workload with
the worker in the engine core's process and again on the Ray executor (one actor, the engine
core on the other end of the ZeroMQ data plane). Async scheduling is on unless
`--async-scheduling false`. Each row also reports the host time of a decode step with every
request running, in the engine core and in the worker (medians; the core's step log and host
timings are read over its control channel).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import gc
import json
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from zllm.bench.roofline import Hardware, ModelCost, measure_hardware
from zllm.architecture import ModelArchitecture, llama3_rope_scaling

# Real hyperparameters of the models whose shapes we benchmark (weights are random: dummy), as
# in their config.json (meta-llama/Llama-3.2-1B, meta-llama/Llama-3.1-8B, Qwen/Qwen3-8B,
# mistralai/Mistral-7B-v0.1, whose 4096-token sliding window is kept).
_LLAMA3 = dict(model_type="llama", architectures=["LlamaForCausalLM"], max_position_embeddings=131072,
               rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001)
MODEL_SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": dict(_LLAMA3, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, intermediate_size=8192, vocab_size=128256,
                         tie_word_embeddings=True, head_dim=64,
                         rope_scaling=llama3_rope_scaling(32.0)),
    "llama-3.1-8b": dict(_LLAMA3, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                         tie_word_embeddings=False, head_dim=128,
                         rope_scaling=llama3_rope_scaling(8.0)),
    "qwen3-8b": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=4096,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, intermediate_size=12288, vocab_size=151936,
                     max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
                     tie_word_embeddings=False, use_sliding_window=False, max_window_layers=36,
                     bos_token_id=151643, eos_token_id=151645),
    "mistral-7b": dict(model_type="mistral", architectures=["MistralForCausalLM"], hidden_size=4096,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       intermediate_size=14336, vocab_size=32000, max_position_embeddings=32768,
                       rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
}


def model_dir_for(name: str) -> str:
    """A directory for `name`: itself if it is one, else a config.json of a known shape (written
    by its family's transformers config class) plus the demo tokenizer (random token id prompts
    need no real vocabulary); run with load_format dummy."""
    if os.path.isdir(name):
        return name
    if name not in MODEL_SHAPES:
        raise ValueError(f"model {name!r} is neither a directory nor one of {sorted(MODEL_SHAPES)}")
    from transformers import AutoConfig

    from zllm.demo import build_tokenizer, cache_dir

    path = os.path.join(cache_dir(), "shapes", name)
    if not os.path.exists(os.path.join(path, "config.json")):
        shape = dict(MODEL_SHAPES[name])
        AutoConfig.for_model(shape.pop("model_type"), torch_dtype="bfloat16",
                             **shape).save_pretrained(path)
        build_tokenizer(path)
    return path


# -- workloads -----------------------------------------------------------------------------------

@dataclass
class Workload:
    name: str
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


def make_workload(name: str, vocab_size: int, num_requests: Optional[int] = None,
                  draw: str = "prompts") -> Workload:
    """The workload's lengths; its prompts' ids are drawn afresh for each `draw`."""
    rng = random.Random(0)
    if name == "W1":
        n = num_requests or 256
        lens = [(512, 256)] * n
    elif name == "W2":
        n = num_requests or 256
        lens = [(rng.randint(100, 1024), rng.randint(100, 1024)) for _ in range(n)]
    elif name == "latency":
        lens = [(512, 256)]
    else:
        raise ValueError(f"workload {name!r}: expected W1, W2 or latency")
    # Ids above the special tokens, inside every tokenizer's range we use; each workload draws
    # its own, so no workload finds another's prompts in the prefix cache.
    ids = random.Random(f"{name}/{len(lens)}/{draw}")
    prompts = [[ids.randint(10, vocab_size - 1) for _ in range(p)] for p, _ in lens]
    return Workload(name, prompts, [o for _, o in lens])


def gpu_scheduling(config: dict[str, Any]) -> dict[str, Any]:
    """`config` with the GPU configs' scheduling (configs/tp1-gpu.yaml) where it does not say
    otherwise: async scheduling, two steps ahead (one when async scheduling is turned off)."""
    config = {"async_scheduling": True, **config}
    if config["async_scheduling"]:
        config.setdefault("async_steps_ahead", 2)
    return config


# -- step recording ------------------------------------------------------------------------------

# Which steps a summary line counts, by whether the step is all decodes.
_STEP_KINDS = (("all", lambda d: True), ("prefill", lambda d: not d), ("decode", lambda d: d))


@dataclass
class StepLog:
    """Per executed step: wall time in the worker and its roofline floor."""
    times: list[float] = field(default_factory=list)
    floors: list[float] = field(default_factory=list)
    op_floors: list[float] = field(default_factory=list)  # ModelCost.op_floor_s
    decode_only: list[bool] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        out = {}
        for label, pick in _STEP_KINDS:
            idx = [i for i, d in enumerate(self.decode_only) if pick(d)]
            t = sum(self.times[i] for i in idx)
            f = sum(self.floors[i] for i in idx)
            op = sum(self.op_floors[i] for i in idx)
            out[label] = {"steps": len(idx), "worker_s": t, "floor_s": f,
                          "worker_over_floor": t / f if f else None, "op_floor_s": op,
                          "worker_over_op_floor": t / op if op else None,
                          "tokens": sum(self.num_tokens[i] for i in idx)}
        return out


def step_log(entries: list[list], cost: ModelCost, hw: Hardware, since: float = 0.0) -> StepLog:
    """The engine core's step log (zllm.engine.core.StepLog) as times and floors, for the steps
    submitted after `since` (time.perf_counter(), one clock for every process on the host): an
    earlier run's last step, scheduled ahead with async scheduling, completes in the next one's
    log. A step's time runs from when the workers could start it (its submission, or the
    previous step's completion if that came later, as with async scheduling) to its
    completion."""
    log, last_done = StepLog(), 0.0
    for submit, done, contexts, new, num_sampled in entries:
        if not new or submit < since:
            continue
        log.times.append(done - max(submit, last_done))
        log.floors.append(cost.floor_s(hw, list(zip(contexts, new)), num_sampled))
        log.op_floors.append(cost.op_floor_s(hw, list(zip(contexts, new)), num_sampled))
        log.decode_only.append(all(n == 1 for n in new))
        log.num_tokens.append(sum(new))
        last_done = done
    return log


def gpu_summary(gpu: list[list]) -> dict[str, Any]:
    """The GPU's time over a run's steps (the worker's (idle before, busy, requests, all
    decodes) per step): busy, and idle between steps, which is the host making it wait."""
    out = {}
    for label, pick in _STEP_KINDS:
        picked = [(idle, busy) for idle, busy, _, decodes in gpu if pick(decodes)]
        out[label] = {"steps": len(picked), "busy_s": sum(b for _, b in picked),
                      "idle_before_s": sum(i for i, _ in picked)}
    return out


def steady_host_ms(times: list[list], num_running: int) -> dict[str, Optional[float]]:
    """Host time (ms) of the decode-only steps at `num_running` requests (None if none), from
    entries (seconds, requests, all decodes) or the worker's (own seconds, requests, all
    decodes, seconds waiting for the GPU): the median own time; for the worker also the mean
    wait (a median would read 0 whenever fewer than half the steps wait) and the median of own
    time plus wait (the whole launch, which the worker's figure was before 2026-12-05)."""
    picked = [t for t in times if t[2] and t[1] == num_running]
    if not picked:
        return {"host": None, "wait": None, "launch": None}
    out = {"host": 1e3 * statistics.median(t[0] for t in picked), "wait": None, "launch": None}
    if len(picked[0]) > 3:
        out["wait"] = 1e3 * statistics.fmean(t[3] for t in picked)
        out["launch"] = 1e3 * statistics.median(t[0] + t[3] for t in picked)
    return out


# -- runs ------------------------------------------------------------------------------------------

def run_zllm(llm, cost: ModelCost, hw: Hardware, wl: Workload, structured=None) -> dict[str, Any]:
    """The workload's figures; `structured` (a StructuredOutputs) constrains every request."""
    return _measure(llm, cost, hw, wl, structured)[0]


def _measure(llm, cost: ModelCost, hw: Hardware, wl: Workload,
             structured=None) -> tuple[dict[str, Any], StepLog]:
    from zllm.sampling_params import SamplingParams

    params = [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True,
                             structured_outputs=structured) for o in wl.output_lens]
    llm.engine.call("step_log"), llm.engine.call("host_times")  # start both afresh
    t0 = time.perf_counter()
    outs = llm.generate(wl.prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    log = step_log(llm.engine.call("step_log"), cost, hw, since=t0)
    host = llm.engine.call("host_times")
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    steps = log.summary()
    floor = steps["all"]["floor_s"]
    busiest = max((n for _, n, d in host["engine_core"] if d), default=0)
    worker = steady_host_ms(host["worker"], busiest)
    grammar = {"grammar_times": host["grammar"]} if host["grammar"] else {}
    gpu = {"gpu": gpu_summary(host["gpu"])} if host["gpu"] else {}
    return {**grammar, **gpu,
        "elapsed_s": elapsed, "output_tokens": generated,
        "output_tok_per_s": generated / elapsed,
        "total_tok_per_s": (generated + wl.num_prompt_tokens) / elapsed,
        "floor_s": floor, "measured_over_floor": elapsed / floor,
        "floor_output_tok_per_s": generated / floor,
        "engine_overhead_s": elapsed - steps["all"]["worker_s"],
        # Host time per decode step with every request running (e.g. 256 in W1).
        "decode_batch": busiest,
        "engine_core_host_ms": steady_host_ms(host["engine_core"], busiest)["host"],
        # The worker's own work; apart, its waits inside the launch for a GPU that is behind.
        "worker_host_ms": worker["host"], "worker_gpu_wait_ms": worker["wait"],
        "worker_launch_ms": worker["launch"],
        "steps": steps,
    }, log


def run_latency_steps(llm, cost: ModelCost, hw: Hardware, wl: Workload) -> dict[str, Any]:
    """TTFT = prefill step(s) up to the first token; TPOT = mean of the later decode steps."""
    res, log = _measure(llm, cost, hw, wl)
    first_decode = log.decode_only.index(True) if True in log.decode_only else len(log.times)
    decode = log.times[first_decode:]
    res.update({"ttft_ms": 1e3 * sum(log.times[:first_decode]),
                "tpot_ms": 1e3 * sum(decode) / max(1, len(decode)),
                "ttft_floor_ms": 1e3 * sum(log.floors[:first_decode]),
                "tpot_floor_ms": 1e3 * sum(log.floors[first_decode:]) / max(1, len(decode))})
    return res


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# Kernel name fragments -> what a kernel does, for the profile's split of a step's GPU time.
_KERNEL_KINDS = (("attention", ("BatchDecode", "BatchPrefill", "SinglePrefill", "PersistentKernel",
                                "MergeStates", "gqa_decode")),
                 ("kv store", ("AppendPagedKV",)),
                 ("gemm", ("gemm", "Gemm", "GEMM", "nvjet", "cutlass", "xmma", "splitK",
                           "_matmul_kernel", "_gated_tma_kernel")),  # zllm's Triton matmuls
                 ("norm", ("Norm", "norm")), ("rope", ("Rope", "rope", "RoPE")),
                 ("activation", ("silu", "gelu", "Act")),
                 ("sampling", ("sort", "Sort", "softmax", "argmax", "topk", "TopK", "exponential",
                               "Reduce", "reduce")))


def _kernel_summary(prof, steps: int) -> dict[str, Any]:
    """GPU busy time per step, kernels per step, the top kernels and the time by kind."""
    kernels = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0
               and str(getattr(e, "device_type", "")).endswith("CUDA")]
    kinds: dict[str, float] = {}
    for e in kernels:
        kind = _kind(e.key)
        kinds[kind] = kinds.get(kind, 0.0) + e.self_device_time_total / steps / 1e3
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:8]
    return {"gpu_busy_ms_per_step": sum(e.self_device_time_total for e in kernels) / steps / 1e3,
            "kernels_per_step": sum(e.count for e in kernels) / steps, **_gaps(prof, steps),
            "ms_by_kind": {k: round(v, 3) for k, v in sorted(kinds.items(), key=lambda x: -x[1])},
            "top_kernels": [(e.key[:80], round(e.self_device_time_total / steps / 1e3, 3)) for e in top]}


def _gaps(prof, steps: int, short_us: float = 10.0) -> dict[str, float]:
    """The GPU's idle time between kernels, per step: gaps under `short_us` (the launch of a
    kernel that was queued behind its predecessor: a CUDA graph's node to node) apart from
    longer ones (the GPU waiting for the host)."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if str(getattr(e, "device_type", "")).endswith("CUDA"))
    short = long = 0.0
    end = spans[0][1] if spans else 0.0
    for start, stop in spans[1:]:
        gap = start - end
        if gap > 0:
            short, long = (short + gap, long) if gap < short_us else (short, long + gap)
        end = max(end, stop)
    return {"short_gaps_ms_per_step": round(short / steps / 1e3, 4),
            "long_gaps_ms_per_step": round(long / steps / 1e3, 4)}


def profile_decode(llm, arch: ModelArchitecture, hw: Hardware, batch: int, steps: int = 32,
                   prompt_tokens: int = 0) -> dict[str, Any]:
    """Where a decode step's time goes, at a batch of `batch` requests 512 tokens in: wall time
    per step (unprofiled), GPU busy time per step and the top kernels (torch.profiler), and the
    roofline floor of the same step. With `prompt_tokens`, each step also carries a fresh
    prompt of that many tokens (asking for one token): the mixed step that an arrival makes."""
    from torch.profiler import ProfilerActivity, profile

    from zllm.sampling_params import SamplingParams

    engine = llm.engine
    core = engine.engine_core  # (the engine core runs in this process)
    wl = make_workload("W1", arch.vocab_size, batch)
    # As many tokens as the context allows: the requests are aborted after the profile.
    params = SamplingParams(max_tokens=core.max_model_len - len(wl.prompts[0]), temperature=0.0,
                            ignore_eos=True)
    for i, prompt in enumerate(wl.prompts[:batch]):
        engine.add_request(f"profile-{i}", prompt, params)
    scheduler = core.scheduler
    while not all(r.num_computed_tokens >= r.num_prompt_tokens for r in scheduler.running):
        engine.step()
    rng = random.Random("arrivals")  # prompts that no cache holds
    one_token = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)

    def step() -> None:
        if prompt_tokens:
            prompt = [rng.randint(10, arch.vocab_size - 1) for _ in range(prompt_tokens)]
            engine.add_request(f"arrival-{time.perf_counter_ns()}", prompt, one_token)
        engine.step()

    for _ in range(4):
        step()
    _sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync()
    wall = (time.perf_counter() - t0) / steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        _sync()
    context = scheduler.running[0].num_computed_tokens if batch else 0
    contexts = [(context, 1)] * batch + ([(0, prompt_tokens)] if prompt_tokens else [])
    sampled = batch + (1 if prompt_tokens else 0)
    for i in range(batch):
        engine.abort_request(f"profile-{i}")
    while engine.has_unfinished_requests():
        engine.step()
    return {"batch": batch, "prompt_tokens": prompt_tokens, "wall_ms_per_step": 1e3 * wall,
            "floor_ms_per_step": 1e3 * ModelCost(arch).floor_s(hw, contexts, sampled),
            "op_floor_ms_per_step": 1e3 * ModelCost(arch).op_floor_s(hw, contexts, sampled),
            **_kernel_summary(prof, steps)}


def profile_prefill(llm, arch: ModelArchitecture, hw: Hardware, num_prompts: int = 16,
                    steps: int = 4) -> dict[str, Any]:
    """Where a prefill step's time goes: `num_prompts` of W1's 512-token prompts in one step
    (16 fill the server's default 8192-token budget), nothing else running. Each step takes prompts no
    earlier step saw, so the prefix cache holds none of them."""
    from torch.profiler import ProfilerActivity, profile

    from zllm.sampling_params import SamplingParams

    engine = llm.engine
    groups = make_workload("W1", arch.vocab_size, num_prompts * (2 * steps + 1)).prompts
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)

    def one_step(k: int) -> None:
        for i, prompt in enumerate(groups[k * num_prompts:(k + 1) * num_prompts]):
            engine.add_request(f"prefill-{k}-{i}", prompt, params)
        while engine.has_unfinished_requests():
            engine.step()

    one_step(0)  # warm-up
    _sync()
    t0 = time.perf_counter()
    for k in range(1, steps + 1):
        one_step(k)
    _sync()
    wall = (time.perf_counter() - t0) / steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for k in range(steps + 1, 2 * steps + 1):
            one_step(k)
        _sync()
    contexts = [(0, len(groups[0]))] * num_prompts
    return {"prompts": num_prompts, "tokens": num_prompts * len(groups[0]),
            "wall_ms_per_step": 1e3 * wall,
            "floor_ms_per_step": 1e3 * ModelCost(arch).floor_s(hw, contexts, num_prompts),
            "op_floor_ms_per_step": 1e3 * ModelCost(arch).op_floor_s(hw, contexts, num_prompts),
            **_kernel_summary(prof, steps)}


def profile_workload(llm, cost: ModelCost, hw: Hardware, wl: Workload) -> dict[str, Any]:
    """Where a whole workload's GPU time goes: the run again under torch.profiler (kernels
    only), per step: kernel time by kind against the GPU's span of the steps (the worker's CUDA
    events). Span beyond kernel time is the GPU idle inside steps, waiting for the host to queue
    their kernels."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        res = run_zllm(llm, cost, hw, wl)
        _sync()
    steps = res["steps"]["all"]
    # Per step of the GPU's: with async scheduling the workers also ran the steps that were
    # submitted ahead when the last request finished, which the engine's step log leaves out.
    num_steps = res["gpu"]["all"]["steps"] if "gpu" in res else steps["steps"]
    per_step = lambda seconds: 1e3 * seconds / num_steps  # noqa: E731
    return {"workload": wl.name, "steps": num_steps, "wall_ms_per_step": per_step(res["elapsed_s"]),
            "span_ms_per_step": per_step(res["gpu"]["all"]["busy_s"]) if "gpu" in res else None,
            "gpu": res.get("gpu"), "floor_ms_per_step": per_step(steps["floor_s"]),
            "op_floor_ms_per_step": per_step(steps["op_floor_s"]), **_kernel_summary(prof, num_steps),
            "phases": _phase_kinds(prof, res)}


def _kind(name: str) -> str:
    return next((k for k, marks in _KERNEL_KINDS if any(m in name for m in marks)), "other")


def _phase_kinds(prof, res: dict[str, Any]) -> dict[str, Any]:
    """Kernel time by kind in the workload's prompt phase and in its decode phase, per step of
    each, beside the phase's GPU span and floor. All prompts arrive at once, so the steps that
    carry prompt tokens come first; the phase ends with the last prefill attention kernel (the
    rest of that step's last layer, a thirty-second of a step or less, counts as decode)."""
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                     if str(getattr(e, "device_type", "")).endswith("CUDA"))
    end = max((stop for _, stop, name in kernels if "Prefill" in name), default=None)
    if end is None or "gpu" not in res:
        return {}
    out = {}
    for phase, label in (("prompt", "prefill"), ("decode", "decode")):
        steps = max(1, res["gpu"][label]["steps"])
        kinds: dict[str, float] = {}
        names: dict[str, float] = {}
        picked = [k for k in kernels if (k[1] <= end) == (phase == "prompt")]
        for start, stop, name in picked:
            ms = (stop - start) / 1e3 / steps  # µs -> ms per step
            kind = _kind(name)
            kinds[kind] = kinds.get(kind, 0.0) + ms
            names[name[:80]] = names.get(name[:80], 0.0) + ms
        by_time = lambda d: sorted(((k, round(v, 3)) for k, v in d.items()),  # noqa: E731
                                   key=lambda kv: -kv[1])
        out[phase] = {"steps": res["gpu"][label]["steps"],
                      "kernels_per_step": len(picked) / steps,
                      "span_ms_per_step": 1e3 * res["gpu"][label]["busy_s"] / steps,
                      "floor_ms_per_step": 1e3 * res["steps"][label]["floor_s"] / steps,
                      "kernel_ms_per_step": sum(kinds.values()),
                      "ms_by_kind_per_step": dict(by_time(kinds)),
                      "top_kernels_ms_per_step": by_time(names)[:12]}
    return out


def run_hf_peer(model_dir: str, wl: Workload, dtype: torch.dtype) -> dict[str, Any]:
    """transformers continuous batching on the same shape, random weights, same workload."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    gen = GenerationConfig(max_new_tokens=max(wl.output_lens), do_sample=False,
                           eos_token_id=-1, pad_token_id=0)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    # Not under inference_mode: generate_batch runs its loop in a thread of its own, and
    # tensors made there would mix with inference tensors made here.
    outs = model.generate_batch(inputs=wl.prompts, generation_config=gen)
    elapsed = time.perf_counter() - t0
    generated = sum(len(o.generated_tokens) for o in outs.values())
    del model
    torch.cuda.empty_cache()
    return {"transformers": transformers.__version__, "elapsed_s": elapsed,
            "output_tokens": generated, "output_tok_per_s": generated / elapsed}


# -- reporting -------------------------------------------------------------------------------------

def result_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (executor, workload), with the peer's figure beside zllm's."""
    rows = []
    fmt = lambda x: round(x, 2) if x else "-"  # noqa: E731
    fmt0 = lambda x: "-" if x is None else round(x, 2)  # noqa: E731 (0 is a figure here)
    for key, r in report["workloads"].items():
        executor, name = key.split("/")
        peer = report.get("peer", {}).get(name)
        s = r["steps"]
        rows.append({
            "executor": executor, "workload": name,
            "out_tok_per_s": round(r["output_tok_per_s"]),
            "elapsed_s": r["elapsed_s"], "floor_s": r["floor_s"],
            "x_floor": r["measured_over_floor"],
            "x_op_floor": fmt(r["elapsed_s"] / s["all"]["op_floor_s"]),
            "prefill_x_floor": fmt(s["prefill"]["worker_over_floor"]),
            "decode_x_floor": fmt(s["decode"]["worker_over_floor"]),
            "ttft_ms": fmt(r.get("ttft_ms")), "tpot_ms": fmt(r.get("tpot_ms")),
            "tpot_floor_ms": fmt(r.get("tpot_floor_ms")),
            "core_host_ms": fmt(r.get("engine_core_host_ms")),
            "worker_host_ms": fmt(r.get("worker_host_ms")),
            "worker_wait_ms": fmt0(r.get("worker_gpu_wait_ms")),
            "gpu_idle_s": fmt(r["gpu"]["all"]["idle_before_s"]) if "gpu" in r else "-",
            "hf_tok_per_s": round(peer["output_tok_per_s"]) if peer else "-",
            "x_hf": round(r["output_tok_per_s"] / peer["output_tok_per_s"], 1) if peer else "-",
        })
    return rows


def print_details(report: dict[str, Any]) -> None:
    print(f"\n{report['model']} on {report['device']}  ({report['hardware']})")
    for key, r in report["workloads"].items():
        print(f"{key}: engine outside the workers' steps {r['engine_overhead_s']:.2f} s of "
              f"{r['elapsed_s']:.2f} s; host per decode step at {r['decode_batch']} requests: "
              f"engine core {r['engine_core_host_ms']} ms, worker {r['worker_host_ms']} ms "
              f"(and {r.get('worker_gpu_wait_ms')} ms per step, mean, waiting for the GPU)")
        if "gpu" in r:
            print(f"{key}: GPU busy / idle before, s: " + "; ".join(
                f"{kind} steps {g['busy_s']:.3f} / {g['idle_before_s']:.3f}"
                for kind, g in r["gpu"].items() if kind != "all"))


def run_executor(model_dir: str, arch: ModelArchitecture, hw: Hardware, config: dict[str, Any],
                 workloads: list[str], num_requests: Optional[int],
                 profile_steps: tuple[str, ...] = ()) -> tuple[dict[str, Any], int]:
    """All workloads on one engine; (results by workload, KV blocks)."""
    from zllm.llm import LLM

    t0 = time.perf_counter()
    llm = LLM(model=model_dir, **config, record_steps=True)
    ready_s = time.perf_counter() - t0
    cost = ModelCost(arch)
    # Warm-up (kernel JIT / autotuning happen here, not in the timings).
    warm = make_workload("W1", arch.vocab_size, 8)
    run_zllm(llm, cost, hw, Workload("warmup", warm.prompts, [16] * 8))
    results: dict[str, Any] = {"ready_s": ready_s}
    report_budget = llm.engine.config.scheduler.max_num_batched_tokens
    for name in workloads:
        wl = make_workload(name, arch.vocab_size, num_requests)
        run = run_latency_steps if name == "latency" else run_zllm
        results[name] = dict(run(llm, cost, hw, wl), max_num_batched_tokens=report_budget)
        print(config.get("distributed_executor_backend"), name,
              json.dumps({k: v for k, v in results[name].items() if k != "steps"}), flush=True)
    for spec in profile_steps:  # "B" (B decodes), "B+N" (and an N-token prompt per step), "W1"
        if spec.startswith("W"):
            # Prompts of its own: the run before left its prompts in the prefix cache.
            wl = make_workload(spec, arch.vocab_size, num_requests, draw="profile")
            results[f"profile-{spec}"] = profile_workload(llm, cost, hw, wl)
            print("profile", json.dumps(results[f"profile-{spec}"]), flush=True)
            continue
        batch, _, prompt_tokens = spec.partition("+")
        results[f"profile-{spec}"] = profile_decode(llm, arch, hw, int(batch),
                                                    prompt_tokens=int(prompt_tokens or 0))
        print("profile", json.dumps(results[f"profile-{spec}"]), flush=True)
    if profile_steps:
        results["profile-prefill"] = profile_prefill(llm, arch, hw)
        # One lone prompt at a time: its wall time is the time to first token in process.
        results["profile-prefill-1"] = profile_prefill(llm, arch, hw, num_prompts=1, steps=8)
        for key in ("profile-prefill", "profile-prefill-1"):
            print("profile", json.dumps(results[key]), flush=True)
    num_blocks = llm.stats().num_blocks
    llm.shutdown()
    del llm
    gc.collect()  # the model, its cache and graphs sit in reference cycles: free them now
    torch.cuda.empty_cache()
    return results, num_blocks


# --executors: where the worker runs. uni: in the engine core's process; ray: a Ray actor;
# inproc: the engine core and the worker in this process (the only one --profile can look into).
EXECUTORS = {"uni": {"distributed_executor_backend": "uni"},
             "ray": {"distributed_executor_backend": "ray"},
             "inproc": {"distributed_executor_backend": "uni", "engine_process": False}}


def run_bench(args: argparse.Namespace, overrides: dict[str, Any]) -> dict[str, Any]:
    from zllm.bench.report import write_results

    overrides = dict(overrides)
    args.model = overrides.pop("model", None) or "llama-3.2-1b"  # --model: a directory or a shape
    model_dir = model_dir_for(args.model)
    arch = ModelArchitecture.from_model_dir(model_dir)
    hw = measure_hardware(torch.device("cuda"))
    config = gpu_scheduling({"dtype": "bfloat16",
                             "load_format": "dummy" if args.model in MODEL_SHAPES else "auto",
                             **overrides})
    workloads = args.workload.split(",")
    report: dict[str, Any] = {
        "date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(),
        "model": args.model, "hardware": hw.as_dict(),
        "config": ", ".join(f"{k}={v}" for k, v in sorted(config.items())), "workloads": {},
    }
    for executor in args.executors.split(","):
        profile = tuple(args.profile.split(",")) if args.profile and executor == "inproc" else ()
        results, report["num_kv_blocks"] = run_executor(
            model_dir, arch, hw, dict(config, **EXECUTORS[executor]), workloads,
            args.num_requests, profile)
        report.setdefault("ready_s", {})[executor] = results.pop("ready_s")
        for name, r in results.items():
            (report.setdefault("profile", {}) if name.startswith("profile") else report["workloads"])[
                f"{executor}/{name}"] = r
    if args.peer == "hf":
        report["peer"] = {}
        for name in workloads:
            if name not in args.peer_workloads.split(","):
                continue
            wl = make_workload(name, arch.vocab_size, args.num_requests)
            report["peer"][name] = run_hf_peer(model_dir, wl, torch.bfloat16)
            print("peer", name, report["peer"][name], flush=True)
    print_details(report)
    profiles = report.get("profile", {})
    for key, prof in profiles.items():
        print(key, json.dumps(prof))
    hw_note = (f"Measured at start: copy {hw.copy_bytes_per_s / 1e9:,.0f} GB/s, bf16 matmul "
               f"{hw.matmul_flops_per_s / 1e12:,.0f} TFLOP/s. x_floor = measured time / roofline "
               f"floor (per step max(bytes / bandwidth, FLOPs / matmul rate)); x_op_floor = "
               f"measured time / the floor of linear layers and attention run one after the other "
               f"(per step, max of each one's bytes and FLOPs, summed); hf = transformers "
               f"generate_batch on the same shape and workload. {report['num_kv_blocks']} KV blocks.")
    write_results(f"Throughput and latency: {args.model} (zllm bench throughput)",
                  {"model": args.model, **config, "workloads": args.workload},
                  result_rows(report), args.out, args.markdown or None,
                  notes=hw_note + "".join(
                      f"\n\n{_profile_title(p)} ({key.split('/')[0]}): wall "
                      f"{p['wall_ms_per_step']:.2f} ms, GPU busy {p['gpu_busy_ms_per_step']:.2f} ms, "
                      f"floor {p['floor_ms_per_step']:.2f} ms (op floor {p['op_floor_ms_per_step']:.2f}), "
                      f"{p['kernels_per_step']:.0f} kernels; by kind: "
                      + ", ".join(f"{k} {t} ms" for k, t in p["ms_by_kind"].items())
                      + "; top: " + ", ".join(f"{k} {t} ms" for k, t in p["top_kernels"][:4])
                      for key, p in profiles.items()),
                  extra=report)
    return report


def _profile_title(p: dict[str, Any]) -> str:
    if "workload" in p:
        return (f"{p['workload']} whole, per step (GPU span of the steps "
                f"{p['span_ms_per_step']:.2f} ms)")
    if p.get("prompt_tokens"):
        return f"Step of {p['batch']} decodes and a {p['prompt_tokens']}-token prompt"
    if "batch" in p:
        return f"Decode step at batch {p['batch']}"
    if p["prompts"] == 1:
        return f"One lone {p['tokens']}-token prompt, added to finished (time to first token)"
    return f"Prefill step of {p['prompts']} prompts ({p['tokens']} tokens)"


def main(argv: Optional[list[str]] = None) -> int:
    from zllm.cli import add_config_flags, config_overrides

    parser = argparse.ArgumentParser(prog="zllm bench throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_args(parser)
    add_config_flags(parser, offline=True)
    args = parser.parse_args(argv)
    overrides = config_overrides(args)
    run_bench(args, overrides)
    return 0


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    from zllm.bench.report import add_report_args

    parser.add_argument("--workload", default="W1,W2,latency", help="comma-separated: W1, W2, latency")
    parser.add_argument("--num-requests", type=int, default=None, help="override W1/W2's 256")
    parser.add_argument("--peer", choices=["none", "hf"], default="none")
    parser.add_argument("--profile", default="",
                        help="comma-separated steps to profile (inproc executor): B, a decode "
                             "step at batch B; B+N, B decodes and a fresh N-token prompt; W1 or "
                             "W2, that workload's run, kernel time against the GPU's span")
    parser.add_argument("--peer-workloads", default="W1",
                        help="comma-separated workloads the peer runs (it is slow)")
    parser.add_argument("--executors", default="ray",
                        help="comma-separated: uni (worker in the engine core's process), ray, "
                             "inproc (engine core and worker in this process); each runs every "
                             "workload")
    add_report_args(parser)
