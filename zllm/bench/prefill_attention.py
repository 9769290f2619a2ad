"""flashinfer's prefill attention alone, as W1's prompt steps call it, against its FLOP floor.

    python -m zllm.bench.prefill_attention [--shapes llama-3.2-1b,llama-3.1-8b] [--out r.json]

W1's prompt steps run 16 new prompts of 512 tokens each, causal, with nothing cached before
them. FlashInferBackend hands them to flashinfer's paged prefill kernel, which reads K and V
back from the paged cache (block size 16). The profile of the 8B shape's prompt step put that
kernel at 5.5 ms of 184 (H100, 2026-12-05), several times its FLOP floor. For each shape this
times, per layer call: the paged kernel at page sizes 16 and 64, with flashinfer's automatic
backend choice (the engine's) and with its FA2 kernels; and the ragged kernel, which reads K
and V from the step's own tensors (what a step whose prompts have nothing cached could use).
Each is checked against the first that runs, the engine's call (max_abs_err; `against` names
it); each is timed eagerly, host launch included; the floor is the causal attention's
FLOPs over the matmul rate measured in the same run. On a GPU only.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Optional

import torch

from zllm.architecture import ModelArchitecture
from zllm.bench.report import add_report_args, write_results
from zllm.bench.roofline import measure_hardware
from zllm.bench.throughput import model_dir_for


def _time(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def run(shapes: list[str], prompts: int, length: int) -> dict[str, Any]:
    import flashinfer

    device = torch.device("cuda")
    hw = measure_hardware(device)
    workspace = torch.zeros(256 * 2**20, dtype=torch.uint8, device=device)
    rows = []
    for shape in shapes:
        arch = ModelArchitecture.from_model_dir(model_dir_for(shape))
        h, kvh, d = arch.num_heads, arch.num_kv_heads, arch.head_dim
        tokens = prompts * length
        qkv = torch.randn(tokens, (h + 2 * kvh) * d, dtype=torch.bfloat16, device=device)
        q, k, v = qkv.split([h * d, kvh * d, kvh * d], dim=-1)  # strided views, as the engine's
        q, k, v = q.view(tokens, h, d), k.view(tokens, kvh, d), v.view(tokens, kvh, d)
        qo_indptr = torch.arange(prompts + 1, dtype=torch.int32) * length
        flops = 4 * prompts * h * d * length * (length + 1) / 2
        floor = flops / hw.matmul_flops_per_s
        reference = None
        variants: list[tuple[str, Optional[int], str]] = [
            ("paged", 16, "auto"), ("paged", 16, "fa2"), ("paged", 64, "auto"),
            ("paged", 64, "fa2"), ("ragged", None, "auto"), ("ragged", None, "fa2")]
        for kind, page, backend in variants:
            name = f"{kind}{page or ''}-{backend}"
            try:
                if kind == "paged":
                    pages = length // page
                    cache = torch.empty(prompts * pages, 2, page, kvh, d, dtype=torch.bfloat16,
                                        device=device)
                    cache[:, 0] = k.reshape(prompts * pages, page, kvh, d)
                    cache[:, 1] = v.reshape(prompts * pages, page, kvh, d)
                    wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
                        workspace, "NHD", backend=backend)
                    wrapper.plan(qo_indptr, torch.arange(prompts + 1, dtype=torch.int32) * pages,
                                 torch.arange(prompts * pages, dtype=torch.int32),
                                 torch.full((prompts,), page, dtype=torch.int32), h, kvh, d, page,
                                 causal=True, q_data_type=torch.bfloat16)
                    call = lambda: wrapper.run(q, cache)  # noqa: E731
                else:
                    wrapper = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(
                        workspace, "NHD", backend=backend)
                    wrapper.plan(qo_indptr, qo_indptr, h, kvh, d, causal=True,
                                 q_data_type=torch.bfloat16)
                    call = lambda: wrapper.run(q, k, v)  # noqa: E731
                out = call()
                t = _time(call)
            except Exception as e:  # a backend this flashinfer or GPU lacks: say so, go on
                print(json.dumps({"shape": shape, "variant": name, "error": repr(e)[:300]}))
                continue
            if reference is None:
                reference, reference_name = out.float(), name
            rows.append({"shape": shape, "variant": name, "prompts": prompts, "length": length,
                         "us": round(1e6 * t, 1), "floor_us": round(1e6 * floor, 1),
                         "of_floor": round(floor / t, 3),
                         "max_abs_err": round((out.float() - reference).abs().max().item(), 4),
                         "against": reference_name})
            print(json.dumps(rows[-1]), flush=True)
    return {"hardware": hw.as_dict(), "rows": rows}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="llama-3.2-1b,llama-3.1-8b")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--length", type=int, default=512, help="tokens per prompt")
    add_report_args(parser, markdown="")
    args = parser.parse_args(argv)
    report = run(args.shapes.split(","), args.prompts, args.length)
    write_results("Prefill attention alone (python -m zllm.bench.prefill_attention)",
                  {"shapes": args.shapes, "prompts": args.prompts, "length": args.length},
                  report.pop("rows"), args.out, args.markdown, extra=report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
