"""`zllm bench structured`: what structured outputs cost, on the host and in throughput.

Two parts:
  host  The grammar's host work per step, with no model: B requests under json_object
        (`--batches 64,256`) walk their grammar by tokens drawn at random among the allowed
        ones; per step, the median host time to fill the bitmask (xgrammar's batched fill over
        its threads, and one matcher after another for comparison), to advance the matchers,
        and to apply the mask to [B, vocab] logits on the device. Runs on a CPU.
  W1    (`--w1`, on a GPU) zllm bench throughput's W1 (256 requests, 512 prompt tokens, 256
        greedy output tokens, ignore_eos) on a model shape, unconstrained and then with every
        request under json_object, in the same run on one engine: output tokens/s of each and
        their ratio, the worker's host time per decode step at full batch in each, and the
        grammar's own host time per step. A grammar that ends (the object closed, the end
        token sampled) leaves its request unconstrained for the rest of its 256 tokens, so the
        report says what share of tokens were sampled under an active grammar, and W1 runs a
        third time under a grammar of the same kind that cannot end (an array of at least
        10,000 objects): every token is constrained.

The bitmask's cost grows with the vocabulary: give a real tokenizer (`--tokenizer DIR`, the config
key, e.g. SmolLM2's 49,152 tokens); W1 then runs the model shape with that vocabulary. Without
one, the demo tokenizer (384 tokens) makes the grammar look cheaper than it is.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any, Optional

import numpy as np
import torch

from zllm.structured_outputs import StructuredOutputs

JSON_OBJECT = StructuredOutputs(json_object=True)
# Objects with the same per-token grammar work as json_object, but 10,000 of them: a grammar
# that cannot end within W1's 256 tokens, so every token is sampled under it.
SUSTAINED = StructuredOutputs(json={"type": "array", "items": {"type": "object"}, "minItems": 10000})
_DEMO = "demo-llama-v1"


def _allowed_tokens(bitmask: np.ndarray, vocab: int, rng: np.random.Generator) -> list[int]:
    """One token per row, drawn among the row's allowed tokens."""
    bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :vocab]
    return [int(rng.choice(np.flatnonzero(row))) for row in bits]


def host_cost(tokenizer: str, vocab_size: int, eos: list[int], batch: int, steps: int,
              device: torch.device, threads: Optional[int] = None) -> dict[str, Any]:
    """Median per-step host time of the grammar at `batch` json_object requests."""
    from zllm.worker.grammar import GrammarMatchers
    from zllm.worker.sampler import apply_token_bitmask
    from zllm.worker.staging import PinnedStaging

    grammar = GrammarMatchers(tokenizer, vocab_size, eos, device, max_threads=threads)
    staging = PinnedStaging(device)
    ids = [f"r{i}" for i in range(batch)]
    for req_id in ids:
        grammar.add(req_id, JSON_OBJECT, [])
    rng = np.random.default_rng(0)
    grammar.bitmask(ids, staging)  # compiles, makes the matchers
    fills, accepts, serial, apply = [], [], [], []
    logits = torch.zeros(batch, vocab_size, device=device)
    for _ in range(steps):
        staging.next_step()
        t0 = time.perf_counter()
        bitmask = grammar.bitmask(ids, staging)
        t1 = time.perf_counter()
        if bitmask is None:
            break
        host = bitmask.cpu().numpy()
        apply.append(_timed(lambda: apply_token_bitmask(logits.clone(), bitmask), device))
        serial.append(_serial_fill(grammar, ids))
        tokens = _allowed_tokens(host, vocab_size, rng)
        t2 = time.perf_counter()
        grammar.accept(ids, tokens)
        accepts.append(time.perf_counter() - t2)
        fills.append(t1 - t0)
        for req_id in ids:  # a finished object starts again: the batch stays at `batch`
            matcher = grammar.requests[req_id].matcher
            if matcher.is_terminated():
                matcher.reset()
    grammar.shutdown()
    ms = lambda xs: round(1e3 * statistics.median(xs), 3) if xs else None  # noqa: E731
    return {"batch": batch, "vocab_size": vocab_size, "steps": len(fills),
            "threads": grammar.max_threads, "fill_ms": ms(fills), "serial_fill_ms": ms(serial),
            "accept_ms": ms(accepts), "apply_ms": ms(apply)}


def _serial_fill(grammar, ids: list[str]) -> float:
    """One matcher after another, into a scratch bitmask: the fill without xgrammar's threads."""
    import xgrammar as xgr

    scratch = xgr.allocate_token_bitmask(len(ids), grammar.vocab_size)
    t0 = time.perf_counter()
    for i, req_id in enumerate(ids):
        grammar.requests[req_id].matcher.fill_next_token_bitmask(scratch, i)
    return time.perf_counter() - t0


def _timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run_w1(model: str, tokenizer: Optional[str], num_requests: Optional[int],
           overrides: dict[str, Any]) -> dict[str, Any]:
    """W1 unconstrained, then under json_object, on one engine deployed as zllm serves: the
    engine core in its own process, the worker a Ray actor. (With the worker in a process that
    also runs the frontend, xgrammar's calls, which release the GIL, wait for the frontend's
    thread each time: on a CPU, a busy Python thread made the fill 40x slower.)"""
    from zllm.architecture import ModelArchitecture
    from zllm.bench.roofline import ModelCost, measure_hardware
    from zllm.bench.throughput import (MODEL_SHAPES, Workload, gpu_scheduling, make_workload,
                                       model_dir_for, run_zllm)
    from zllm.llm import LLM

    shape = model in MODEL_SHAPES
    if shape and tokenizer:
        model = _shape_with_vocabulary(model, tokenizer)
    model_dir = model_dir_for(model)
    arch = ModelArchitecture.from_model_dir(model_dir)
    # Prefix caching off: the three runs share W1's prompts, and the later ones must not find
    # them cached, or they would skip the prefill that the first one paid for.
    config = gpu_scheduling({"dtype": "bfloat16", "load_format": "dummy" if shape else "auto",
                             "distributed_executor_backend": "ray", "record_steps": True,
                             "enable_prefix_caching": False, **overrides})
    if tokenizer:
        config["tokenizer"] = tokenizer
    hw = measure_hardware(torch.device("cuda"))
    llm = LLM(model=model_dir, **config)
    cost = ModelCost(arch)
    warm = make_workload("W1", arch.vocab_size, 8)
    for structured in (None, JSON_OBJECT, SUSTAINED):  # kernels, graphs, grammars compiled
        run_zllm(llm, cost, hw, Workload("warmup", warm.prompts, [16] * 8), structured)
    wl = make_workload("W1", arch.vocab_size, num_requests)
    plain = run_zllm(llm, cost, hw, wl)
    report: dict[str, Any] = {"model": model, "tokenizer": tokenizer or "demo (384 tokens)",
                              "config": config, "plain": _figures(plain)}
    for name, structured in (("json_object", JSON_OBJECT), ("sustained", SUSTAINED)):
        run = run_zllm(llm, cost, hw, wl, structured)
        report[name] = {**_figures(run), **_grammar_figures(run.pop("grammar_times", []), run),
                        "throughput_ratio": run["output_tok_per_s"] / plain["output_tok_per_s"],
                        "worker_host_ms_added": _difference(run["worker_launch_ms"],
                                                            plain["worker_launch_ms"])}
    llm.shutdown()
    return report


def _shape_with_vocabulary(model: str, tokenizer: str) -> str:
    """A model shape with the tokenizer's vocabulary and end tokens. xgrammar handles the ids a
    tokenizer lacks one by one in every row it fills (SmolLM2's 49,152 tokens padded to Llama
    3's 128,256: the fill takes ~7x as long), which no real checkpoint pays, so the bench keeps
    vocabulary and tokenizer alike."""
    from zllm.bench.throughput import MODEL_SHAPES
    from zllm.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    name = f"{model}-vocab{len(tok)}"
    MODEL_SHAPES.setdefault(name, {**MODEL_SHAPES[model], "vocab_size": len(tok),
                                   "bos_token_id": tok.bos_token_id,
                                   "eos_token_id": tok.eos_token_id})
    return name


def _figures(run: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in run.items() if k not in ("steps", "grammar_times")}


def _grammar_figures(times: list[tuple[float, float, int]], run: dict[str, Any]) -> dict[str, Any]:
    """The grammar's host time per step at the largest constrained batch, and the share of
    tokens sampled under a grammar."""
    full = max((rows for _, _, rows in times), default=0)
    at_full = [(fill, accept) for fill, accept, rows in times if rows == full]
    return {"grammar_rows_at_full": full,
            "grammar_fill_ms_at_full": _median_ms([f for f, _ in at_full]),
            "grammar_accept_ms_at_full": _median_ms([a for _, a in at_full]),
            "constrained_token_share": sum(r for _, _, r in times) / run["output_tokens"]}


def _difference(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None else a - b


def _median_ms(xs: list[float]) -> Optional[float]:
    return 1e3 * statistics.median(xs) if xs else None


def main(argv: Optional[list[str]] = None) -> int:
    from zllm.bench.report import add_report_args
    from zllm.cli import add_config_flags, config_overrides

    parser = argparse.ArgumentParser(prog="zllm bench structured", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="64,256", help="host part: constrained requests")
    parser.add_argument("--steps", type=int, default=64, help="host part: steps per batch")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="host part: the model's vocabulary (default: the tokenizer's)")
    parser.add_argument("--w1", action="store_true", help="also run W1 plain vs json_object (GPU)")
    parser.add_argument("--num-requests", type=int, default=None, help="W1's 256")
    add_report_args(parser, markdown="")
    add_config_flags(parser, offline=True)
    args = parser.parse_args(argv)
    overrides = config_overrides(args)
    model = overrides.pop("model", None) or "llama-3.1-8b"
    report: dict[str, Any] = {"host": []}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer, vocab, eos = _tokenizer(overrides.pop("tokenizer", None))
    for batch in (int(b) for b in args.batches.split(",") if b):
        row = host_cost(tokenizer, args.vocab_size or vocab, eos, batch, args.steps, device)
        report["host"].append(row)
        print("host", json.dumps(row), flush=True)
    if args.w1:
        report["w1"] = run_w1(model, None if tokenizer.endswith(_DEMO) else tokenizer,
                              args.num_requests, overrides)
        print("w1", json.dumps(report["w1"]), flush=True)
    from zllm.bench.report import write_results

    write_results(f"Structured outputs: grammar host cost and W1 under json_object "
                  f"(zllm bench structured)", {"model": model, "tokenizer": tokenizer,
                                               "device": str(device)},
                  _rows(report), args.out, args.markdown or None, extra=report)
    return 0


_COLUMNS = ("part", "output tok/s", "x plain", "worker host ms/step", "fill ms",
            "serial fill ms", "accept ms", "apply ms", "constrained share")


def _rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per host batch and per W1 run, every row with every column ("" where none)."""
    rows = [{"part": f"host: {h['batch']} requests, vocab {h['vocab_size']}",
             "fill ms": h["fill_ms"], "serial fill ms": h["serial_fill_ms"],
             "accept ms": h["accept_ms"], "apply ms": h["apply_ms"]} for h in report["host"]]
    w1 = report.get("w1")
    for name in ("plain", "json_object", "sustained") if w1 else ():
        run = w1[name]
        rows.append({"part": f"W1 {name}", "output tok/s": run["output_tok_per_s"],
                     "x plain": run.get("throughput_ratio", 1.0),
                     "worker host ms/step": run["worker_launch_ms"],
                     "fill ms": run.get("grammar_fill_ms_at_full"),
                     "accept ms": run.get("grammar_accept_ms_at_full"),
                     "constrained share": run.get("constrained_token_share")})
    return [{k: "" if row.get(k) is None else row[k] for k in _COLUMNS} for row in rows]


def _tokenizer(path: Optional[str]) -> tuple[str, int, list[int]]:
    """(directory, vocabulary size, end token ids) of the tokenizer to measure with."""
    from zllm.demo import ensure_demo_model
    from zllm.tokenizer import load_tokenizer

    path = path or ensure_demo_model()
    tokenizer = load_tokenizer(path)
    return path, len(tokenizer), [tokenizer.eos_token_id]
