"""flashinfer's decode attention alone, against the bandwidth floor of its KV read.

    python -m zllm.bench.decode_attention [--shapes llama-3.2-1b,llama-3.1-8b] [--out r.json]

For each model shape, a batch of W1's decode steps (256 requests, 640 tokens of context) runs
flashinfer's batch-decode kernel once per layer, with the tensor-core kernel (flashinfer's
prefill kernel, which FlashInferBackend picks for GQA groups of 4 and up) and with the CUDA-core
decode kernel, at block sizes 16 and 32. Each variant is timed with CUDA events over repeated
calls after a warm-up; the floor is the KV bytes read divided by the copy bandwidth measured in
the same run. `--layouts NHD,HND` adds flashinfer's head-major page layout, `--contexts` other
context lengths (a fixed cost per call shows as a share of the floor that grows with them), and
`--modes graph,nosplit,graph-nosplit` the CUDA-graph wrapper replayed from a captured graph (as
the engine's decode steps run it), the split-KV schedule turned off, and both; `fa3`, `xqa`,
`graph-xqa`, `triton-NxWxS`, `graph-triton-NxWxS`, `triton-split` and `graph-triton-split`
(each sequence split as the engine splits small decode steps) other kernels for the same call, each
checked against the plain wrapper's output (max_abs_err). A Triton mode with `+rope` adds
zllm's RoPE + K/V store kernel before each call, with `+newkv` the kernel doing both itself (as
the engine runs pure-decode steps on it); neither is checked here (gpu_check checks them). On a
GPU only: this is the measurement behind FlashInferBackend's kernel choice.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Optional

import torch

from zllm.architecture import ModelArchitecture
from zllm.bench.roofline import measure_hardware
from zllm.bench.throughput import model_dir_for


def time_decode(arch: ModelArchitecture, batch: int, context: int, block_size: int,
                tensor_cores: bool, layout: str = "NHD", mode: str = "eager",
                reps: int = 50, graph_calls: int = 1) -> tuple[float, float]:
    """Seconds per call of one layer's decode attention, and the largest absolute difference of
    its output from the plain tensor-core wrapper's. mode: "eager" (a plain wrapper, run from
    Python), "graph" (a CUDA-graph wrapper, its run captured once and replayed, as the engine's
    decode steps do), "nosplit" (eager, flashinfer's split-KV schedule turned off),
    "graph-nosplit" (both: flashinfer always splits in CUDA-graph mode unless told not to),
    "fa3" (the wrapper on flashinfer's Hopper prefill kernel), "xqa" (TensorRT-LLM's XQA GQA
    decode kernel as flashinfer ships it: no plan, a padded page table), "graph-xqa" (XQA
    captured and replayed), "triton[-NxWxS]" and "graph-triton[-NxWxS]" (zllm's Triton kernel,
    zllm/worker/attention/triton_decode.py, with tiles of N tokens, W warps, S stages),
    "triton-split[-NxWxS]" and "graph-triton-split[-NxWxS]" (the same, each sequence split among
    programs as FlashInferBackend splits small decode steps for 512 programs). A graph holds
    `graph_calls` calls back to back (as a decode step's layers follow each other), and the time
    is per call."""
    import flashinfer

    device = torch.device("cuda")
    pages_per_req = -(-context // block_size)
    num_pages = batch * pages_per_req
    heads, kv_heads, dim = arch.num_heads, arch.num_kv_heads, arch.head_dim
    shape = ((num_pages, 2, block_size, kv_heads, dim) if layout == "NHD"
             else (num_pages, 2, kv_heads, block_size, dim))
    cache = torch.randn(shape, dtype=torch.bfloat16, device=device)
    q = torch.randn(batch, heads, dim, dtype=torch.bfloat16, device=device)
    out = torch.empty_like(q)
    indptr = (torch.arange(batch + 1, dtype=torch.int32) * pages_per_req).to(device)
    indices = torch.randperm(num_pages, dtype=torch.int32).to(device)  # scattered, as in a cache
    last = torch.full((batch,), context - (pages_per_req - 1) * block_size, dtype=torch.int32,
                      device=device)
    workspace = torch.zeros(256 * 2**20, dtype=torch.uint8, device=device)

    def wrapper_for(graph: bool, backend: str = "auto", **plan_extra):
        buffers = (dict(use_cuda_graph=True, paged_kv_indptr_buffer=indptr.clone(),
                        paged_kv_indices_buffer=indices.clone(),
                        paged_kv_last_page_len_buffer=last.clone()) if graph else {})
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            workspace, layout, use_tensor_cores=tensor_cores, backend=backend, **buffers)
        wrapper.plan(indptr, indices, last, num_qo_heads=heads, num_kv_heads=kv_heads,
                     head_dim=dim, page_size=block_size, q_data_type=torch.bfloat16,
                     kv_data_type=torch.bfloat16, **plan_extra)
        return lambda: wrapper.run(q, cache, out=out)

    reference = wrapper_for(False)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)  # planless kernels
    rope = ""
    if "triton" in mode:
        from zllm.worker.attention.flashinfer_backend import split_count
        from zllm.worker.attention.triton_decode import SplitWorkspace, gqa_decode

        mode, _, rope = mode.partition("+")
        split = "triton-split" in mode  # each sequence split as the engine splits small steps
        prefix = "triton-split-" if split else "triton-"
        kernel_args = dict(zip(("block_n", "num_warps", "num_stages"),
                               (int(x) for x in mode.split(prefix)[1].split("x")))
                           ) if prefix in mode else {}  # no tiles given: the kernel's defaults
        if split:
            splits = split_count(batch, kv_heads, 512)
            kernel_args.update(splits=splits, workspace=SplitWorkspace(
                device, batch * kv_heads * splits, batch * kv_heads, heads, kv_heads, dim))
        call = lambda: gqa_decode(q, cache, indptr, indices, seq_lens, dim ** -0.5,  # noqa: E731
                                  out=out, **kernel_args)
        if rope:  # RoPE and the new token's K/V store too, as a decode step's layer runs them
            call = _with_new_kv(rope, q, out, cache, indptr, indices, seq_lens, kernel_args)
    elif mode.endswith("xqa"):
        table = indices.view(batch, pages_per_req)
        xqa_workspace = torch.zeros(256 * 2**20, dtype=torch.uint8, device=device)
        call = lambda: flashinfer.decode.xqa_batch_decode_with_kv_cache(  # noqa: E731
            q, cache, xqa_workspace, table, seq_lens, context, bmm1_scale=dim ** -0.5,
            out=out, kv_layout=layout)
    else:
        call = wrapper_for(mode.startswith("graph"), "fa3" if mode == "fa3" else "auto",
                           **(dict(disable_split_kv=True) if mode.endswith("nosplit") else {}))
    for _ in range(5):
        call()
    captured = call  # keeps the wrapper, whose buffers a replay reads, alive until the end
    per_call = 1
    if mode.startswith("graph"):  # graph_calls calls in one graph, as a step's layers replay
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(graph_calls):
                captured()
        call, per_call = graph.replay, graph_calls
    call()
    result = out.clone()
    reference()
    # With RoPE the call's q is rotated and the cache holds the new keys: no reference to match.
    err = float("nan") if rope else (result.float() - out.float()).abs().max().item()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        call()
    end.record()
    end.synchronize()
    del captured
    return start.elapsed_time(end) / 1e3 / reps / per_call, err


def _with_new_kv(rope: str, q, out, cache, indptr, indices, seq_lens, kernel_args):
    """The call with RoPE and the store of each request's new K and V (q, k and v views of one
    qkv output, as a layer's): "rope", zllm's rope_and_store kernel then the attention kernel
    (two launches); "newkv", the attention kernel doing both (`new_kv`, one launch)."""
    from zllm.worker.attention.rope_store import rope_and_store
    from zllm.worker.attention.triton_decode import NewKV, gqa_decode
    from zllm.worker.models.layers import FusedRotaryEmbedding
    from zllm.worker.models.linear import split_qkv

    batch, heads, dim = q.shape
    kv_heads = cache.shape[3]
    table = FusedRotaryEmbedding(dim, int(seq_lens.max()), 500000.0, None).to(q.device).cos_sin
    qkv = torch.randn(batch, (heads + 2 * kv_heads) * dim, dtype=q.dtype, device=q.device)
    q_new, k, v = split_qkv(qkv, heads, kv_heads, dim)
    positions = (seq_lens - 1).long()
    new_kv = NewKV(k, v, positions, table) if rope == "newkv" else None
    rows = torch.arange(batch, dtype=torch.int32, device=q.device)

    def call():
        if new_kv is None:
            rope_and_store(q_new, k, v, positions, table, cache, rows, seq_lens - 1, indptr,
                           indices)
        return gqa_decode(q_new, cache, indptr, indices, seq_lens, dim ** -0.5, out=out,
                          new_kv=new_kv, **kernel_args)
    return call


def run(shapes: list[str], batches: list[int], contexts: list[int], layouts: list[str],
        block_sizes: list[int], modes: list[str], graph_calls: int = 1) -> dict[str, Any]:
    hw = measure_hardware(torch.device("cuda"))
    rows = []
    for shape in shapes:
        arch = ModelArchitecture.from_model_dir(model_dir_for(shape))
        for batch, context in ((b, c) for b in batches for c in contexts):
            kv_bytes = batch * context * 2 * arch.num_kv_heads * arch.head_dim * 2  # a layer, bf16
            floor = kv_bytes / hw.copy_bytes_per_s
            variants = [(layout, block_size, mode, tensor_cores)
                        for layout in layouts for block_size in block_sizes for mode in modes
                        for tensor_cores in (True, False)
                        if (tensor_cores or mode in ("eager", "graph"))  # tensor cores only
                        and ("triton" not in mode or layout == "NHD")]  # zllm's cache layout
            for layout, block_size, mode, tensor_cores in variants:
                try:
                    t, err = time_decode(arch, batch, context, block_size, tensor_cores, layout,
                                         mode, graph_calls=graph_calls)
                except Exception as e:  # a kernel this flashinfer or GPU lacks: say so, go on
                    print(json.dumps({"shape": shape, "batch": batch, "context": context,
                                      "mode": mode, "error": repr(e)[:300]}), flush=True)
                    continue
                rows.append({"shape": shape, "batch": batch, "head_dim": arch.head_dim,
                             "group": arch.num_heads // arch.num_kv_heads,
                             "context": context, "layout": layout, "mode": mode,
                             "block_size": block_size, "tensor_cores": tensor_cores,
                             "graph_calls": graph_calls if mode.startswith("graph") else 0,
                             "us_per_layer": round(1e6 * t, 1),
                             "floor_us_per_layer": round(1e6 * floor, 1),
                             "ms_per_step": round(1e3 * t * arch.num_layers, 3),
                             "of_floor": round(floor / t, 3), "max_abs_err": round(err, 4)})
                print(json.dumps(rows[-1]), flush=True)
    return {"device": torch.cuda.get_device_name(), "hardware": hw.as_dict(), "rows": rows}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="llama-3.2-1b,llama-3.1-8b")
    parser.add_argument("--batches", default="256", help="requests per step, comma-separated")
    parser.add_argument("--contexts", default="640",
                        help="tokens per request, comma-separated (W1: 512-768)")
    parser.add_argument("--layouts", default="NHD", help="NHD, HND or both, comma-separated")
    parser.add_argument("--block-sizes", default="16,32")
    parser.add_argument("--modes", default="eager",
                        help="eager, graph (captured and replayed, as the engine runs decode), "
                             "nosplit (split-KV off), graph-nosplit, fa3, xqa, graph-xqa, "
                             "triton[-NxWxS] and graph-triton[-NxWxS] (zllm's Triton kernel: "
                             "N tokens a tile, W warps, S stages), triton-split and "
                             "graph-triton-split (each sequence split), each with +rope "
                             "(and zllm's RoPE + K/V store kernel) or +newkv (the kernel "
                             "doing both); comma-separated")
    parser.add_argument("--graph-calls", type=int, default=1,
                        help="calls captured back to back in each graph (the time is per call)")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    ints = lambda arg: [int(x) for x in arg.split(",")]  # noqa: E731
    report = run(args.shapes.split(","), ints(args.batches), ints(args.contexts),
                 args.layouts.split(","), ints(args.block_sizes), args.modes.split(","),
                 args.graph_calls)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
