"""The Triton kernel for matmuls of few rows (zllm/worker/models/skinny_matmul.py), run by Triton's
interpreter on CPU: its products against float32 ones, in both weight layouts, with and without
the inner dimension split; and a model whose decode steps go through it giving Hugging Face's
greedy tokens. The interpreter must be chosen before Triton is imported, so these run in a
subprocess. (It mishandles bfloat16 in tl.dot, so the half-precision case is float16; bfloat16
runs on the GPU in zllm.bench.gpu_check and zllm.bench.linear_shapes.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from zllm.demo import build_tiny_llama
from tests.conftest import PROMPTS

pytest.importorskip("triton")  # a dependency of xgrammar, so CI has it

KERNEL_CHECK = r"""
import json, torch
from zllm.worker.models import skinny_matmul as sm
torch.manual_seed(0)
cases = []
for dtype in (torch.float32, torch.float16):
    for m, n, k, column_major, tile in [
            (1, 48, 256, False, (16, 64, 2)), (3, 40, 256, True, (16, 32, 4)),
            (16, 64, 128, False, (16, 64, 1)), (5, 33, 128, False, None),
            (2, 100, 512, True, None), (7, 96, 512, False, (32, 64, 8))]:
        x = torch.randn(m, k).to(dtype)
        w = torch.randn(n, k).to(dtype)
        if column_major:
            w = w.t().contiguous().t()
        bias = torch.randn(n).to(dtype) if m % 2 else None
        ref = x.double() @ w.double().t() + (bias.double() if bias is not None else 0)
        config = sm.SkinnyConfig(*tile) if tile else sm.pick_config(n, k, column_major)
        outs = [sm.skinny_matmul(x, w, bias, config) for _ in range(2)]  # the 2nd reuses tickets
        ws = sm._workspaces.get(x.device)
        cases.append({"case": [str(dtype), m, n, k, column_major, config.split_k],
                      "dtype": str(outs[0].dtype), "shape": list(outs[0].shape),
                      "err": [((o.double() - ref).norm() / ref.norm()).item() for o in outs],
                      "tickets_zero": ws is None or int(ws.tickets.abs().sum()) == 0})
try:
    sm.skinny_matmul(torch.randn(17, 64), torch.randn(32, 64))
except ValueError as e:
    cases.append({"error": str(e)})
print(json.dumps(cases))
"""


def _interpret(script: str, *args: str) -> object:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_kernel_matches_float64_in_both_layouts_split_or_not():
    cases = _interpret(KERNEL_CHECK)
    *products, error = cases
    assert len(products) == 12
    assert {c["case"][5] for c in products} >= {1, 2, 4, 8}  # every split the cases ask for
    for c in products:
        limit = 1e-6 if "float32" in c["case"][0] else 2e-3
        assert max(c["err"]) < limit, c
        assert c["dtype"] == c["case"][0] and c["shape"] == c["case"][1:3], c
        assert c["tickets_zero"], c  # the last program of each tile put its counter back
    assert "at most 16 rows" in error["error"] and "(17, 64)" in error["error"]


MODEL_RUN = r"""
import json, sys
from zllm import LLM, SamplingParams
from zllm.worker.models.linear import column_major_linears, skinny_matmul_linears
from zllm.worker.models import skinny_matmul

model_dir, prompts = sys.argv[1], json.loads(sys.argv[2])
results = {}
for layout in ("row-major", "column-major"):
    with LLM(model_dir, device="cpu", engine_process=False) as llm:
        runner = llm.engine.engine_core.executor.worker.model_runner
        if layout == "column-major":
            column_major_linears(runner.model)
            runner.load_weights()
        shapes = skinny_matmul_linears(runner.model, 16)
        skinny_matmul.reserve(runner.device, shapes)
        calls = {"rows": []}
        for module in runner.model.modules():
            if getattr(module, "skinny_rows", 0):
                kernel = module.skinny
                def counted(x, w, b, kernel=kernel):  # the layer's own hook, wrapped to count
                    calls["rows"].append(x.shape[0])
                    return kernel(x, w, b)
                module.skinny = counted
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
        splits = sorted({skinny_matmul.pick_config(n, k, layout == "column-major").split_k
                         for n, k in shapes})
        results[layout] = {"tokens": [[o.prompt_token_ids, o.outputs[0].token_ids] for o in outs],
                           "layers": len(shapes), "splits": splits,
                           "max_rows": max(calls["rows"]), "calls": len(calls["rows"])}
print(json.dumps(results))
"""


def test_decode_through_the_kernel_gives_hf_greedy_tokens(tmp_path, hf):
    # Wide enough that the picked tiles split the inner dimension.
    model_dir = str(tmp_path / "llama256")
    build_tiny_llama(model_dir, hidden_size=256, intermediate_size=512, num_heads=4,
                     num_kv_heads=2, tie_word_embeddings=False, seed=3)
    prompts = PROMPTS[:5]
    results = _interpret(MODEL_RUN, model_dir, json.dumps(prompts))
    for layout, r in results.items():
        assert r["layers"] == 2 * 4, layout  # qkv, o, gate_up and down of both layers
        assert max(r["splits"]) > 1, (layout, r["splits"])
        # Steps of at most 16 tokens (the decodes) went through it, and only those.
        assert r["calls"] > 0 and r["max_rows"] <= 16, (layout, r)
        for prompt_ids, tokens in r["tokens"]:
            assert tokens == hf.greedy(model_dir, prompt_ids, 6), layout
