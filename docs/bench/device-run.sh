#!/usr/bin/env bash
# The device runs behind docs/benchmarks.md's GPU sections, one stage per `device` call:
#   bash docs/bench/device-run.sh STAGE     (on the GPU machine, .device carried; results in $OUT)
# Stages: offline (issue 11: 1B and 8B throughput), serve (issue 11: zllm bench serve over
#         SERVES="MODEL:API_SERVERS ..."),
#         families (issue 12: Qwen3-8B, Mistral-7B; sliding-window check), structured (issue 14),
#         recovery (issue 13: a rank killed during W1 on the 1B shape),
#         serve-sweep (issue 11: zllm bench serve on 1B at api_server_count 2 and 4),
#         ready (issue 11: time to ready of zllm serve on the 8B shape, cold then warm),
#         profile-1b, profile-8b (issue 11: W1 in process, then decode and prefill steps profiled),
#         check-graphs (gpu_check on the small Llama: decode and piecewise CUDA graphs' greedy tokens
#         against eager, flashinfer (and XQA, and the Triton decode kernel) against torch;
#         CHECK_ARGS=--skip-kernels skips check 1; MODELS=llama,mistral,gemma2 adds the window and
#         soft-cap models),
#         piecewise-1b, piecewise-8b (issue 11: the same, piecewise CUDA graphs on (1024) and off (0)),
#         piecewise-serve (issue 11: zllm bench serve on 1B, Poisson arrivals, piecewise on and off),
#         decode-modes (issue 11: flashinfer decode alone, eager / CUDA graph / no split-KV, at two
#         contexts, NHD and HND),
#         piecewise-host (issue 11: the worker's host stages per decode step with piecewise graphs
#         captured and not, to find what makes decode steps slower once they exist),
#         graph-split (issue 11: the CUDA-graph decode wrapper with and without split-KV, by batch
#         size: where planning the engine's graph wrappers with disable_split_kv would pay).
#         decode-kernels (issue 11: graph-split's sweep plus flashinfer's Hopper (fa3) wrapper and
#         the XQA decode kernel, each checked against the plain wrapper's output).
#         xqa-w1 (issue 11: batch-1 latency on Ray (EXECUTOR=inproc: in process), xqa_decode_max_batch
#         8 against 0 (off)).
#         steps-ahead (issue 11: batch-1 latency and W1 on Ray, async_steps_ahead 1 against 2, alternating).
#         key (any config key KEY over RUNS="MODEL:VALUE ..." and WORKLOADS, one run per pair).
#         linear-shapes (issue 11: each linear layer's matmul alone at 1, 256 and 8192 rows, F.linear
#         against a transposed weight and split-K, against its floor; LT_ALGOS=N adds the first N
#         algorithms of cuBLASLt's heuristic; EXTRA=--triton adds zllm's Triton kernel's tiles, and
#         for gate_up the kernel fused with SiLU; "--layers gate_up" times only those;
#         EXTRA=--few-rows, with ROWS=1,4,16, the tile the engine's few-rows rule picks).
#         jit (flashinfer's norm, SiLU-and-mul, RoPE, page and head_dim 64 and 128 decode modules
#         in one parallel ninja run: 37 s on a fresh H100 that had the prefill modules, which
#         still compile on first use; with SAVE_FI_CACHE=1, the cache to carry).
#         ab (this checkout's zllm against BASE's, ABBA, over RUNS="MODEL:WORKLOADS ...").
#         worker-profile (issue 11: cProfile of the worker's host stages on the 1B shape at REQUESTS
#         (default 1): which part of "plan" and "logits" is Python and which CUDA API time).
#         prefill-attention (issue 11: W1's prompt step's attention alone: flashinfer's paged kernel at
#         page sizes 16 and 64, auto and FA2, against its ragged kernel and the FLOP floor).
#         profile-w1 (issue 11: W1 whole under torch.profiler, in process, on SHAPES: its kernel
#         time against the GPU's span of its steps, and the lone prefill steps beside it; EXTRA:
#         more flags for the bench, e.g. "--gemm-tuning-algos 16").
#         l2-prefetch (issue 11: batch-1 decode layers' matmuls with the next weight read into L2
#         during the small kernels before it, on a side stream; EXTRA: more flags).
#         decode-split (issue 11: the Triton decode kernel splitting each sequence of small decode
#         steps, alone against flashinfer's at 1-64 requests, gpu_check's check 1, and batch-1
#         latency with the split off and on).
# A flashinfer JIT cache saved by an earlier run ($OUT/fi-cache.tar.xz, copied to
# .device/fi-cache.tar.xz here) is unpacked first: a fresh machine then skips most compiling.
# structured wants SmolLM2's tokenizer in .device/smollm2-tokenizer (the GGUF is too large to
# travel; its tokenizer is not): python -c "from zllm.tokenizer import load_tokenizer;
#   load_tokenizer('PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf').save_pretrained('.device/smollm2-tokenizer')"
set -uo pipefail
bash .device/install.sh || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export PATH=/tmp/site/bin:$PATH
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
# pip gives every installed file the install time, and flashinfer's JIT runs ninja on each load,
# which rebuilds an output its build log records as older than an input. Dating the carried
# packages' files back makes the unpacked cache current instead of stale on every fresh machine.
find /tmp/site/flashinfer /tmp/site/tvm_ffi -newermt 2001-01-01 -exec touch -h -d 2000-01-01 {} + 2>/dev/null
[ -f .device/fi-cache.tar.xz ] && mkdir -p ~/.cache && tar xJf .device/fi-cache.tar.xz -C ~/.cache
echo "stage $1 starts $(date -u +%T)" | tee -a "$OUT/log.txt"
z() { python3 -m zllm "$@"; }
# key_runs KEY "MODEL:VALUE ..." WORKLOADS: one `zllm bench throughput` per pair (RUNS, WORKLOADS,
# EXECUTOR and RUN_TIMEOUT override), with --KEY VALUE. SIGABRT at the limit: faulthandler then
# prints where every thread of a stalled run is.
key_runs() {
  for run in ${RUNS:-$2}; do
    m=${run%%:*} k=${run##*:}
    PYTHONFAULTHANDLER=1 timeout -s ABRT ${RUN_TIMEOUT:-200} python3 -m zllm bench throughput --model $m \
      --executors ${EXECUTOR:-ray} --workload ${WORKLOADS:-$3} --$1 $k --max-model-len 2304 \
      --out "$OUT/$m-$1-$k-$RANDOM.json" --markdown '' 2>&1 | grep -v "USDT" | tail -60 | tee -a "$OUT/log.txt"
  done
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/log.txt"
case "$1" in
  offline)
    for m in ${MODELS:-llama-3.2-1b llama-3.1-8b}; do
      timeout ${RUN_TIMEOUT:-330} python3 -m zllm bench throughput --model $m --executors ray --workload W1,W2,latency \
        --max-model-len 2304 --out "$OUT/$m.json" --markdown "$OUT/$m.md" 2>&1 | tee -a "$OUT/log.txt"
    done ;;
  serve)
    # SERVES="MODEL:API_SERVERS ...": one `zllm bench serve` each (W1, offline in the same run).
    for spec in ${SERVES:-llama-3.1-8b:4 llama-3.2-1b:8}; do
      m=${spec%%:*} n=${spec##*:}
      timeout ${RUN_TIMEOUT:-330} python3 -m zllm bench serve --model $m --workload W1 --client-procs ${CLIENT_PROCS:-4} \
        --ready-runs 1 --api-server-count $n --max-model-len 2304 --log "$OUT/serve-$m-api$n.log" \
        --out "$OUT/serve-$m-api$n.json" --markdown '' 2>&1 | grep -v "USDT" | tail -20 | tee -a "$OUT/log.txt"
    done ;;
  families)
    for m in qwen3-8b mistral-7b; do
      timeout 200 python3 -m zllm bench throughput --model $m --executors ray --workload W1,latency \
        --max-model-len 2304 --out "$OUT/$m.json" --markdown "$OUT/$m.md" 2>&1 | tee -a "$OUT/log.txt"
    done
    timeout 150 python3 -m zllm.bench.gpu_check --models mistral,gemma2 --out "$OUT/gpu-check.json" 2>&1 | tail -60 | tee -a "$OUT/log.txt" ;;
  structured)
    timeout 560 python3 -m zllm bench structured --w1 --model llama-3.1-8b --tokenizer $PWD/.device/smollm2-tokenizer \
      --max-model-len 2304 --out "$OUT/structured.json" --markdown "$OUT/structured.md" 2>&1 | tee -a "$OUT/log.txt" ;;
  recovery)
    timeout 330 python3 -m zllm bench recovery --model llama-3.2-1b --device cuda --tensor-parallel-size 1 \
      --workload W1 --trials 1 --kill-after-tokens 64 --max-model-len 2304 \
      --out "$OUT/recovery.json" --markdown "$OUT/recovery.md" 2>&1 | tee -a "$OUT/log.txt" ;;
  serve-sweep)
    for n in 2 4; do
      timeout 130 python3 -m zllm bench serve --model llama-3.2-1b --workload W1 --client-procs 4 --ready-runs 1 \
        --api-server-count $n $([ $n = 4 ] && echo --no-offline) --max-model-len 2304 --log "$OUT/serve-1b-$n.log" \
        --out "$OUT/serve-1b-api$n.json" --markdown "$OUT/serve-1b-api$n.md" 2>&1 | tee -a "$OUT/log.txt"
    done ;;
  ready)
    timeout 400 python3 -m zllm bench serve --model llama-3.1-8b --workload W1 --num-requests 8 --no-offline \
      --ready-runs ${READY_RUNS:-2} --log "$OUT/ready-8b.log" --out "$OUT/ready-8b.json" --markdown "$OUT/ready-8b.md" 2>&1 | tee -a "$OUT/log.txt"
    grep -E "ray executor started|engine core ready|serving" "$OUT/ready-8b.log" | tee -a "$OUT/log.txt" ;;
  profile-1b|profile-8b)
    m=$([ "$1" = profile-1b ] && echo llama-3.2-1b || echo llama-3.1-8b)
    timeout 300 python3 -m zllm bench throughput --model $m --executors inproc --workload W1 --profile 256,1 \
      --max-model-len 2304 --out "$OUT/profile-$m.json" --markdown "$OUT/profile-$m.md" 2>&1 | tee -a "$OUT/log.txt" ;;
  check-graphs)
    timeout ${CHECK_TIMEOUT:-400} python3 -m zllm.bench.gpu_check --models ${MODELS:-llama} --host-model '' ${CHECK_ARGS:-} \
      --out "$OUT/gpu-check.json" 2>&1 | grep -v "Warn\|warn(" | tee -a "$OUT/log.txt" | tail -30 ;;
  piecewise-1b|piecewise-8b)
    m=$([ "$1" = piecewise-1b ] && echo llama-3.2-1b || echo llama-3.1-8b)
    for t in 1024 0; do
      timeout ${RUN_TIMEOUT:-200} python3 -m zllm bench throughput --model $m --executors inproc --workload W1,latency \
        --profile 256,1,64+512,0+512 --piecewise-cuda-graph-tokens $t --max-model-len 2304 \
        --out "$OUT/piecewise-$m-$t.json" --markdown "$OUT/piecewise-$m-$t.md" 2>&1 | grep -v "^profile\|USDT" | tee -a "$OUT/log.txt"
    done ;;
  piecewise-serve)
    for t in 1024 0; do
      timeout 200 python3 -m zllm bench serve --model llama-3.2-1b --workload W1 --rates ${RATES:-16,64} --client-procs 4 \
        --api-server-count 4 --ready-runs 1 --no-offline --piecewise-cuda-graph-tokens $t --max-model-len 2304 \
        --log "$OUT/serve-$t.log" --out "$OUT/serve-1b-piecewise-$t.json" --markdown "$OUT/serve-1b-piecewise-$t.md" 2>&1 | tee -a "$OUT/log.txt"
    done ;;
  decode-modes)
    timeout 200 python3 -m zllm.bench.decode_attention --contexts 640,2048 --layouts ${LAYOUTS:-NHD,HND} \
      --block-sizes 16 --modes ${MODES:-eager,graph,nosplit,graph-nosplit} --out "$OUT/decode-modes.json" 2>&1 \
      | grep '^{' | tee -a "$OUT/log.txt" ;;
  piecewise-host)
    timeout 300 python3 -m zllm bench control-path --worker only --worker-model llama-3.2-1b \
      --requests 256 --worker-context 512 --worker-steps 300 --worker-piecewise-tokens 0,1024,0,1024 \
      --out "$OUT/piecewise-host.json" --markdown "$OUT/piecewise-host.md" 2>&1 | grep "^worker" | tee -a "$OUT/log.txt" ;;
  decode-kernels)
    # One process per mode: a kernel that faults poisons its CUDA context, not the others'.
    for mode in ${MODES:-xqa graph-xqa eager graph graph-nosplit fa3}; do
      timeout ${RUN_TIMEOUT:-100} python3 -m zllm.bench.decode_attention --batches ${BATCHES:-1,8,32,64,128,256} \
        --contexts 640,2048 --layouts NHD --block-sizes 16 --modes $mode \
        --out "$OUT/decode-kernels-$mode.json" 2>&1 | grep '^{' | cut -c1-400 | tee -a "$OUT/log.txt"
    done ;;
  xqa-w1)
    key_runs xqa-decode-max-batch "llama-3.2-1b:8 llama-3.2-1b:0 llama-3.1-8b:8 llama-3.1-8b:0" latency ;;
  key)
    key_runs $KEY "$RUNS" ${WORKLOADS:-latency} ;;
  steps-ahead)
    key_runs async-steps-ahead "llama-3.2-1b:1 llama-3.2-1b:2 llama-3.2-1b:1 llama-3.2-1b:2 llama-3.1-8b:1 llama-3.1-8b:2" \
      latency,W1 ;;
  worker-profile)
    timeout ${RUN_TIMEOUT:-200} python3 -m cProfile -o "$OUT/worker.prof" -m zllm bench control-path --worker only \
      --worker-model llama-3.2-1b --requests ${REQUESTS:-1} --worker-context 512 --worker-steps 400 \
      --out "$OUT/worker-profile.json" --markdown '' 2>&1 | grep "^worker" | tee -a "$OUT/log.txt"
    python3 -c "import pstats, sys; s = pstats.Stats(sys.argv[1], stream=sys.stdout)
s.sort_stats('tottime').print_stats(40)
s.sort_stats('cumulative').print_callees(r'\((plan|_plan_graph|compute_logits|_sample|_device_inputs)\)')" \
      "$OUT/worker.prof" > "$OUT/worker-profile.txt" 2>&1; head -80 "$OUT/worker-profile.txt" ;;
  linear-shapes)
    timeout ${RUN_TIMEOUT:-200} python3 -m zllm.bench.linear_shapes --rows ${ROWS:-1,256,8192} \
      --shapes ${SHAPES:-llama-3.2-1b,llama-3.1-8b} --lt-algos ${LT_ALGOS:-0} ${EXTRA:-} --out "$OUT/linear-shapes.json" 2>&1 | grep '^{\|^best' | cut -c1-300 | tee -a "$OUT/log.txt" ;;
  ab)
    # This checkout against another's zllm (BASE: a folder holding a zllm package, e.g. main's
    # unpacked with `git archive main zllm | tar -x -C .ab-base`), run after run: each of RUNS
    # (MODEL:WORKLOADS) runs with BASE's code, then this one's, then this one's, then BASE's
    # (ABBA, so that a drift over the call favours neither). One JSON of all runs: $OUT/ab.json.
    mkdir -p /tmp/ab
    for run in $RUNS; do
      m=${run%%:*} w=${run##*:}
      for side in base new new base; do
        code=$([ $side = base ] && echo "$BASE" || echo "$PWD")
        echo "== $m $w $side" | tee -a "$OUT/log.txt"
        # From the code's own folder: `python -m` puts the working directory first on the path.
        (cd $code && PYTHONPATH=$code:/tmp/site timeout ${RUN_TIMEOUT:-200} python3 -m zllm bench \
          throughput --model $m --executors ${EXECUTOR:-ray} --workload $w --max-model-len 2304 \
          --out "/tmp/ab/$m-$side-$RANDOM.json" --markdown '') 2>&1 | grep "^| [a-z]" | tee -a "$OUT/log.txt"
      done
    done
    python3 -c "import glob, json, sys; json.dump({f: json.load(open(f)) for f in sorted(glob.glob('/tmp/ab/*.json'))},
      open(sys.argv[1], 'w'), indent=1)" "$OUT/ab.json" ;;
  profile-w1)
    for m in ${SHAPES:-llama-3.2-1b llama-3.1-8b}; do
      timeout ${RUN_TIMEOUT:-240} python3 -m zllm bench throughput --model $m --executors inproc --workload W1 \
        --profile W1 --max-model-len 2304 ${EXTRA:-} --out "$OUT/profile-w1-$m-$RANDOM.json" --markdown '' 2>&1 | grep -v "USDT" \
        | tail -40 | tee -a "$OUT/log.txt"
    done ;;
  l2-prefetch)
    timeout ${RUN_TIMEOUT:-200} python3 -m zllm.bench.l2_prefetch ${EXTRA:-} --out "$OUT/l2-prefetch.json" \
      2>&1 | grep '^{' | tee -a "$OUT/log.txt" ;;
  prefill-attention)
    timeout ${RUN_TIMEOUT:-300} python3 -m zllm.bench.prefill_attention --out "$OUT/prefill-attention.json" \
      2>&1 | grep '^{' | tee -a "$OUT/log.txt" ;;
  decode-split)
    # The Triton decode kernel with each sequence split (small decode steps) against flashinfer's
    # captured decode and one program per pair, 16 calls per graph; then check 1 of gpu_check and
    # batch-1 latency with triton_decode_split_max_batch 0 and 64 (the default), in that order.
    timeout 150 python3 -m zllm.bench.decode_attention --batches ${BATCHES:-1,4,16,32,64} --contexts 640,2048 \
      --block-sizes 16 --graph-calls 16 --modes graph,graph-triton,graph-triton-split \
      --out "$OUT/decode-split.json" 2>&1 | grep '^{' | cut -c1-300 | tee -a "$OUT/log.txt"
    timeout 150 python3 -m zllm.bench.gpu_check --models '' --host-model '' --out "$OUT/gpu-check-kernels.json" \
      2>&1 | grep "gpu_check" | tee -a "$OUT/log.txt"
    key_runs triton-decode-split-max-batch "llama-3.2-1b:0 llama-3.2-1b:64 llama-3.1-8b:0 llama-3.1-8b:64" latency ;;
  jit)
    timeout 300 python3 - <<'PY' 2>&1 | tail -3 | tee -a "$OUT/log.txt"
import time, torch
from flashinfer.jit.activation import gen_act_and_mul_module
from flashinfer.jit.attention.modules import gen_batch_decode_module
from flashinfer.jit.core import build_jit_specs
from flashinfer.jit.norm import gen_norm_module
from flashinfer.jit.page import gen_page_module
from flashinfer.jit.rope import gen_rope_module
bf16 = torch.bfloat16
specs = [gen_norm_module(), gen_act_and_mul_module("silu"), gen_rope_module(), gen_page_module()]
specs += [gen_batch_decode_module(bf16, bf16, bf16, torch.int32, d, d, 0, False, False)
          for d in (64, 128)]
t = time.time()
build_jit_specs(specs)
print(f"jit: {len(specs)} modules built or found in {time.time() - t:.1f} s")
PY
    ;;
  graph-split)
    timeout 200 python3 -m zllm.bench.decode_attention --batches 1,8,32,64,128,256 --contexts 640,2048 \
      --layouts NHD --block-sizes 16 --modes graph,graph-nosplit --out "$OUT/graph-split.json" 2>&1 \
      | grep '^{' | tee -a "$OUT/log.txt" ;;
esac
# Save the JIT cache for the next fresh machine (about 10 MB packed).
if [ -n "${SAVE_FI_CACHE:-}" ]; then
  tar cf - -C ~/.cache flashinfer | xz -T0 -6 > "$OUT/fi-cache.tar.xz"
fi
