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
model shape and workload and reports the ratio.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from zllm.bench.roofline import Hardware, ModelCost, measure_hardware
from zllm.config import LlamaArchitecture

# Real hyperparameters of the models whose shapes we benchmark (weights are random: dummy).
MODEL_SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, intermediate_size=8192, vocab_size=128256,
                         tie_word_embeddings=True, head_dim=64,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192}),
    "llama-3.1-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                         tie_word_embeddings=False, head_dim=128,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192}),
}


def model_dir_for(name: str) -> str:
    """A directory for `name`: itself if it is one, else a config.json of a known shape plus the
    demo tokenizer (random token id prompts need no real vocabulary); run with load_format dummy."""
    if os.path.isdir(name):
        return name
    if name not in MODEL_SHAPES:
        raise ValueError(f"model {name!r} is neither a directory nor one of {sorted(MODEL_SHAPES)}")
    from transformers import LlamaConfig

    from zllm.demo import build_tokenizer, cache_dir

    path = os.path.join(cache_dir(), "shapes", name)
    if not os.path.exists(os.path.join(path, "config.json")):
        LlamaConfig(max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                    bos_token_id=128000, eos_token_id=128001, torch_dtype="bfloat16",
                    **MODEL_SHAPES[name]).save_pretrained(path)
        build_tokenizer(path)
    return path


# -- workloads -----------------------------------------------------------------------------------

@dataclass
class Workload:
    name: str
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


def make_workload(name: str, vocab_size: int, num_requests: Optional[int] = None) -> Workload:
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
    # Ids above the special tokens, inside every tokenizer's range we use.
    prompts = [[rng.randint(10, vocab_size - 1) for _ in range(p)] for p, _ in lens]
    return Workload(name, prompts, [o for _, o in lens])


# -- step recording ------------------------------------------------------------------------------

@dataclass
class StepLog:
    """Per executed step: wall time in the worker and its roofline floor."""
    times: list[float] = field(default_factory=list)
    floors: list[float] = field(default_factory=list)
    decode_only: list[bool] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        out = {}
        for label, pick in (("all", lambda d: True), ("prefill", lambda d: not d),
                            ("decode", lambda d: d)):
            idx = [i for i, d in enumerate(self.decode_only) if pick(d)]
            t = sum(self.times[i] for i in idx)
            f = sum(self.floors[i] for i in idx)
            out[label] = {"steps": len(idx), "worker_s": t, "floor_s": f,
                          "worker_over_floor": t / f if f else None,
                          "tokens": sum(self.num_tokens[i] for i in idx)}
        return out


class StepRecorder:
    """Wraps the executor's execute_model to time each step and compute its floor."""

    def __init__(self, engine, cost: ModelCost, hw: Hardware) -> None:
        self.executor = engine.executor
        self.inner = self.executor.execute_model
        self.cost, self.hw = cost, hw
        self.computed: dict[str, int] = {}
        self.log = StepLog()
        self.executor.execute_model = self._execute

    def _execute(self, sched):
        for req_id in sched.finished_req_ids:
            self.computed.pop(req_id, None)
        for new in sched.new_requests:
            self.computed[new.req_id] = new.num_computed_tokens
        t0 = time.perf_counter()
        out = self.inner(sched)  # returns host token ids, so the step is complete
        dt = time.perf_counter() - t0
        contexts = [(self.computed[r], n) for r, n in sched.num_scheduled_tokens.items()]
        for r, n in sched.num_scheduled_tokens.items():
            self.computed[r] += n
        if contexts:
            self.log.times.append(dt)
            self.log.floors.append(self.cost.floor_s(self.hw, contexts, len(out.req_ids)))
            self.log.decode_only.append(all(n == 1 for _, n in contexts))
            self.log.num_tokens.append(sched.total_num_scheduled_tokens)
        return out

    def reset(self) -> None:
        self.log = StepLog()


# -- runs ------------------------------------------------------------------------------------------

def run_zllm(llm, recorder: StepRecorder, wl: Workload) -> dict[str, Any]:
    from zllm.sampling_params import SamplingParams

    params = [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True) for o in wl.output_lens]
    recorder.reset()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = llm.generate(wl.prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    steps = recorder.log.summary()
    floor = steps["all"]["floor_s"]
    return {
        "elapsed_s": elapsed, "output_tokens": generated,
        "output_tok_per_s": generated / elapsed,
        "total_tok_per_s": (generated + wl.num_prompt_tokens) / elapsed,
        "floor_s": floor, "measured_over_floor": elapsed / floor,
        "floor_output_tok_per_s": generated / floor,
        "engine_overhead_s": elapsed - steps["all"]["worker_s"],
        "steps": steps,
    }


def run_latency_steps(llm, recorder: StepRecorder, wl: Workload) -> dict[str, Any]:
    """TTFT = prefill step(s) up to the first token; TPOT = mean of the later decode steps."""
    res = run_zllm(llm, recorder, wl)
    log = recorder.log
    first_decode = log.decode_only.index(True) if True in log.decode_only else len(log.times)
    ttft = sum(log.times[:first_decode])
    decode = log.times[first_decode:]
    res.update({"ttft_ms": 1e3 * ttft, "tpot_ms": 1e3 * sum(decode) / max(1, len(decode)),
                "ttft_floor_ms": 1e3 * sum(log.floors[:first_decode]),
                "tpot_floor_ms": 1e3 * sum(log.floors[first_decode:]) / max(1, len(decode))})
    return res


def run_hf_peer(model_dir: str, wl: Workload, dtype: torch.dtype) -> dict[str, Any]:
    """transformers continuous batching on the same shape, random weights, same workload."""
    import transformers
    from transformers import AutoConfig, GenerationConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(config, torch_dtype=dtype,
                                              attn_implementation="sdpa")
    model.eval()
    gen = GenerationConfig(max_new_tokens=max(wl.output_lens), do_sample=False,
                           eos_token_id=-1, pad_token_id=0)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode():
        outs = model.generate_batch(inputs=wl.prompts, generation_config=gen)
    elapsed = time.perf_counter() - t0
    generated = sum(len(o.generated_tokens) for o in outs.values())
    del model
    torch.cuda.empty_cache()
    return {"transformers": transformers.__version__, "elapsed_s": elapsed,
            "output_tokens": generated, "output_tok_per_s": generated / elapsed}


# -- reporting -------------------------------------------------------------------------------------

def versions() -> dict[str, str]:
    v = {"python": platform.python_version(), "torch": torch.__version__,
         "cuda": torch.version.cuda or "-"}
    try:
        import flashinfer
        v["flashinfer"] = flashinfer.__version__
    except ImportError:
        pass
    return v


def append_markdown(path: str, report: dict[str, Any]) -> None:
    new = not os.path.exists(path)
    with open(path, "a") as f:
        if new:
            f.write("# zllm benchmarks\n\nRows appended by `zllm bench` (random weights, random "
                    "prompt ids, greedy, ignore_eos). floor = roofline from measured copy "
                    "bandwidth and bf16 matmul rate.\n\n"
                    "| date | device | versions | model | config | workload | out tok/s | "
                    "measured/floor | peer | notes |\n|---|---|---|---|---|---|---|---|---|---|\n")
        v = report["versions"]
        ver = ", ".join(f"{k} {v[k]}" for k in ("torch", "flashinfer") if k in v)
        for name, r in report["workloads"].items():
            peer = report.get("peer", {}).get(name)
            peer_s = f"HF {peer['output_tok_per_s']:.0f} tok/s (x{r['output_tok_per_s'] / peer['output_tok_per_s']:.1f})" if peer else "-"
            notes = (f"TTFT {r['ttft_ms']:.1f} ms, TPOT {r['tpot_ms']:.2f} ms (floor {r['tpot_floor_ms']:.2f})"
                     if "ttft_ms" in r else f"{r['elapsed_s']:.1f} s, floor {r['floor_s']:.1f} s")
            f.write(f"| {report['date']} | {report['device']} | {ver} | {report['model']} | "
                    f"{report['config']} | {name} | {r['output_tok_per_s']:.0f} | "
                    f"{r['measured_over_floor']:.2f} | {peer_s} | {notes} |\n")


def print_table(report: dict[str, Any]) -> None:
    print(f"\n{report['model']} on {report['device']}  ({report['hardware']})")
    print(f"{'workload':9} {'out tok/s':>10} {'elapsed s':>10} {'floor s':>8} {'x floor':>8} "
          f"{'prefill x':>9} {'decode x':>9} {'engine s':>9}")
    for name, r in report["workloads"].items():
        s = r["steps"]
        fmt = lambda x: f"{x:.2f}" if x else "-"
        print(f"{name:9} {r['output_tok_per_s']:10.0f} {r['elapsed_s']:10.2f} {r['floor_s']:8.2f} "
              f"{r['measured_over_floor']:8.2f} {fmt(s['prefill']['worker_over_floor']):>9} "
              f"{fmt(s['decode']['worker_over_floor']):>9} {r['engine_overhead_s']:9.2f}")
        if "ttft_ms" in r:
            print(f"          TTFT {r['ttft_ms']:.1f} ms (floor {r['ttft_floor_ms']:.1f}), "
                  f"TPOT {r['tpot_ms']:.2f} ms (floor {r['tpot_floor_ms']:.2f})")
        peer = report.get("peer", {}).get(name)
        if peer:
            print(f"          HF generate_batch {peer['output_tok_per_s']:.0f} tok/s: zllm is "
                  f"x{r['output_tok_per_s'] / peer['output_tok_per_s']:.1f}")


def run_bench(args: argparse.Namespace, overrides: dict[str, Any]) -> dict[str, Any]:
    from zllm.llm import LLM

    overrides = dict(overrides)
    args.model = overrides.pop("model", None) or "llama-3.2-1b"  # --model: a directory or a shape
    model_dir = model_dir_for(args.model)
    arch = LlamaArchitecture.from_model_dir(model_dir)
    device = torch.device("cuda")
    hw = measure_hardware(device)
    config = {"dtype": "bfloat16", "load_format": "dummy" if args.model in MODEL_SHAPES else "auto"}
    config.update(overrides)
    llm = LLM(model=model_dir, **config)
    recorder = StepRecorder(llm.engine, ModelCost(arch), hw)
    workloads = args.workload.split(",")
    # Warm-up (kernel JIT / autotuning / graph capture happen here, not in the timings).
    warm = make_workload("W1", arch.vocab_size, 8)
    run_zllm(llm, recorder, Workload("warmup", warm.prompts, [16] * 8))
    report: dict[str, Any] = {
        "date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(),
        "versions": versions(), "model": args.model, "hardware": hw.as_dict(),
        "config": ", ".join(f"{k}={v}" for k, v in sorted(config.items())),
        "num_kv_blocks": llm.engine.block_manager.num_blocks if hasattr(llm.engine.block_manager, "num_blocks") else None,
        "workloads": {},
    }
    for name in workloads:
        wl = make_workload(name, arch.vocab_size, args.num_requests)
        if name == "latency":
            report["workloads"][name] = run_latency_steps(llm, recorder, wl)
        else:
            report["workloads"][name] = run_zllm(llm, recorder, wl)
        print(name, json.dumps({k: v for k, v in report["workloads"][name].items() if k != "steps"}),
              flush=True)
    llm.shutdown()
    del llm, recorder
    torch.cuda.empty_cache()
    if args.peer == "hf":
        report["peer"] = {}
        for name in workloads:
            if name == "latency" and not args.peer_latency:
                continue
            wl = make_workload(name, arch.vocab_size, args.num_requests)
            report["peer"][name] = run_hf_peer(model_dir, wl, torch.bfloat16)
            print("peer", name, report["peer"][name], flush=True)
    print_table(report)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    if args.markdown:
        append_markdown(args.markdown, report)
    return report


def main(argv: Optional[list[str]] = None) -> int:
    from zllm.cli import add_config_flags, config_keys

    parser = argparse.ArgumentParser(prog="zllm bench throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_args(parser)
    add_config_flags(parser)
    args = parser.parse_args(argv)
    overrides = {k: getattr(args, k) for k in config_keys() if getattr(args, k, None) is not None}
    run_bench(args, overrides)
    return 0


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", default="W1,W2,latency", help="comma-separated: W1, W2, latency")
    parser.add_argument("--num-requests", type=int, default=None, help="override W1/W2's 256")
    parser.add_argument("--peer", choices=["none", "hf"], default="none")
    parser.add_argument("--peer-latency", action="store_true", help="also run the peer on latency")
    parser.add_argument("--out", help="write the report as JSON here")
    parser.add_argument("--markdown", default="docs/benchmarks.md",
                        help="append a row per workload to this file ('' to skip)")
