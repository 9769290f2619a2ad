"""One step on one rank: update the persistent batch, flatten it, run the model, sample.

The scheduler output only says what changed; the input batch (zllm/worker/input_batch.py) holds
the rest (each request's tokens, progress, block table and sampling settings) in preallocated
arrays. A step flattens every scheduled request's new tokens into one sequence (mixed prefill
chunks and decodes) with vectorized numpy, writes their K/V into the paged cache inside the
attention backend, and computes logits only for the last token of requests that reach their end.
On CUDA with flashinfer, pure-decode steps replay a captured CUDA graph unless enforce_eager is
set; with piecewise_cuda_graph_tokens set (off by default), steps with prompt tokens replay
graphs captured in pieces around attention (zllm/worker/cuda_graphs.py).

Host work per step is a few array operations, whatever the batch size, and index arrays travel
to the device from pinned memory: the token ids, positions and sampled rows in one copy here,
the attention layout in one copy in the backend's plan, the sampling settings in at most two.

A step is launched (`launch`) and its sampled tokens are read back later (`collect`). In between,
the next step may be launched: its decodes read the tokens they continue from the previous
step's device tensor, so the host prepares step N+1 while the GPU still runs step N. Only
requests with penalties, whose statistics come from their token history on the host, wait for
the previous step first (seeded sampling and min_tokens need only the count of tokens, which the
host knows). Constrained requests (structured outputs, zllm/worker/grammar.py) wait for it too,
but only once the forward is queued: their grammar, not their input, needs the previous token.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from zllm.architecture import ModelArchitecture
from zllm.config import EngineConfig
from zllm.protocol import ModelRunnerOutput, SchedulerOutput
from zllm.worker.attention.base import AttentionBatch, make_attention_backend
from zllm.worker.cuda_graphs import DecodeGraphs, PiecewiseGraphs, graph_batch_sizes, piecewise_sizes
from zllm.worker.grammar import GrammarMatchers
from zllm.worker.input_batch import InputBatch, StepInputs
from zllm.worker.models.gemm_tuning import (BATCH_GATED_MIN_ROWS, TMA_CAPABILITY, TunedProduct,
                                            give_batch_gated, give_few_rows, give_few_rows_gated,
                                            tune_model)
from zllm.worker.models.registry import build_model
from zllm.worker.models.weight_prefetch import WeightPrefetch, chain_linears
from zllm.worker.models.weights import load_weights
from zllm.worker.sampler import (GREEDY, DevicePromptLogprobs, SampledLogprobs,
                                 make_sampling_metadata, pinned_copy, prompt_logprobs, sample)
from zllm.worker.staging import PinnedStaging

logger = logging.getLogger(__name__)


@dataclass
class LaunchedStep:
    """A step whose tokens may still be on the device."""
    req_ids: list[str]  # of the requests it samples
    slots: np.ndarray  # their input-batch slots
    tokens: Optional[torch.Tensor]  # [len(req_ids)] on the device
    logprobs: Optional[SampledLogprobs] = None
    host_tokens: Optional[torch.Tensor] = None  # pinned copy of tokens, in flight (CUDA)
    output: Optional[ModelRunnerOutput] = None  # once read back
    done_event: Optional[torch.cuda.Event] = None  # recorded after the step's last kernel
    constrained: bool = False  # some rows sampled under a grammar: their tokens advance it
    prompt_logprobs: Optional[DevicePromptLogprobs] = None

    def done(self) -> bool:
        return self.done_event is None or self.done_event.query()

    def read_tokens(self) -> np.ndarray:
        """The sampled tokens on the host (waits for the GPU)."""
        if self.tokens is None:
            return np.zeros(0, np.int64)
        if self.host_tokens is not None:
            self.done_event.synchronize()
            return self.host_tokens.numpy()
        return self.tokens.numpy()


class HostTimer:
    """Host time of each stage of `launch`, for benchmarks (`zllm bench control-path
    --worker`): the runner marks the end of each stage, a benchmark switches the timer on and
    reads the laps. Off (the default), a mark costs one attribute check, so the marks stay in
    the hot path instead of a benchmark wrapping the runner's methods from outside."""

    def __init__(self) -> None:
        self.enabled = False
        self.laps: dict[str, list[float]] = {}  # stage -> seconds, one entry per step
        self._last = 0.0

    def start(self) -> None:
        if self.enabled:
            self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        """The stage that ends now took the time since the previous mark."""
        if self.enabled:
            now = time.perf_counter()
            self.laps.setdefault(stage, []).append(now - self._last)
            self._last = now


class GpuTimer:
    """The GPU's time on each step and how long it sat idle before it, from CUDA events, for
    benchmarks (on with the scheduler's record_steps): idle time between steps is time the host
    made the GPU wait for a step's preparation. Waits inside a step (a kernel queued late) count
    in its span; `zllm bench throughput --profile W1` sets the span against kernel time. Off
    (the default, and on CPU), a mark costs one attribute check."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.marks: collections.deque = collections.deque(maxlen=8192)

    def begin(self) -> Optional[torch.cuda.Event]:
        """An event queued before the step's first GPU work (None when off)."""
        if not self.enabled:
            return None
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        return start

    def end(self, start: Optional[torch.cuda.Event], done: torch.cuda.Event, num_reqs: int,
            decode_only: bool) -> None:
        if start is not None:
            self.marks.append((start, done, num_reqs, decode_only))

    def take(self) -> list[tuple[float, float, int, bool]]:
        """Per step since the last call, oldest first: (seconds the GPU was idle between the
        step before and this one (0 for the first), seconds from the host having prepared it to
        its last GPU work, requests, all decodes). Waits for steps still running. (Called from
        a control thread while the step loop appends: popleft takes each mark exactly once.)"""
        out, previous = [], None
        while self.marks:
            start, done, num_reqs, decode_only = self.marks.popleft()
            done.synchronize()
            idle = 0.0 if previous is None else max(0.0, previous.elapsed_time(start) / 1e3)
            out.append((idle, start.elapsed_time(done) / 1e3, num_reqs, decode_only))
            previous = done
        return out


class ModelRunner:
    def __init__(self, config: EngineConfig, arch: ModelArchitecture, rank: int, tp_size: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.config = config
        self.arch = arch
        self.rank = rank
        self.device = device
        self.dtype = dtype
        self.block_size = config.cache.block_size
        self.model = build_model(arch, dtype, device)
        self._few_rows_kernels()  # before any step or capture, so that both run them
        sched = config.scheduler
        max_num_tokens = max(sched.max_num_batched_tokens, graph_batch_sizes(sched.max_num_seqs)[-1])
        self.staging = PinnedStaging(device)
        self.attn = make_attention_backend(
            config.device.attention_backend, device, dtype, max_num_tokens,
            self.model.attention_spec, self.block_size, self.staging,
            config.device.xqa_decode_max_batch, config.device.triton_decode_min_programs,
            config.device.triton_decode_split_max_batch)
        self.kv_caches: list[torch.Tensor] = []
        self.swap_caches: list[torch.Tensor] = []
        self.input_batch: InputBatch | None = None  # made with the cache, which sizes it
        self.scratch_block = 0  # padding rows of a CUDA-graph step write here (set with the cache)
        self.graphs: DecodeGraphs | None = None
        self.gemm_tuning: list[dict] = []  # tune_model's report (gemm_tuning_algos)
        self.piecewise: PiecewiseGraphs | None = None
        self.launched: collections.deque[LaunchedStep] = collections.deque()  # not collected yet
        self.timer = HostTimer()
        self.gpu_timer = GpuTimer(config.scheduler.record_steps and device.type == "cuda")
        # Structured outputs: made with the first constrained request, so that an engine serving
        # only plain requests runs no grammar code.
        self.grammar: GrammarMatchers | None = None

    def load_weights(self) -> None:
        m = self.config.model
        load_weights(self.model, m.model, m.load_format, self.rank, m.seed)

    # -- KV cache --------------------------------------------------------------------------------

    def kv_block_bytes(self) -> int:
        d = self.model.attention_spec
        return (2 * self.arch.num_layers * self.block_size * d.num_kv_heads * d.head_dim
                * self.dtype.itemsize)

    def _allocate_kv(self, num_blocks: int, device: torch.device, pin: bool = False) -> list[torch.Tensor]:
        d = self.model.attention_spec
        shape = (num_blocks, 2, self.block_size, d.num_kv_heads, d.head_dim)
        return [torch.zeros(shape, dtype=self.dtype, device=device, pin_memory=pin)
                for _ in range(self.arch.num_layers)]

    def init_kv_cache(self, num_blocks: int, num_swap_blocks: int = 0) -> None:
        """Blocks 0..num_blocks-1 for the block manager, plus one scratch block at the end."""
        self.kv_caches = self._allocate_kv(num_blocks + 1, self.device)
        self.scratch_block = num_blocks
        max_len = min(self.config.model.max_model_len or self.arch.max_position_embeddings,
                      num_blocks * self.block_size)
        self.input_batch = InputBatch(self.config.scheduler.max_num_seqs, max_len, self.block_size,
                                      self.arch.vocab_size, self.scratch_block)
        # Host copies of swapped-out blocks; pinned so device copies can run asynchronously.
        self.swap_caches = (self._allocate_kv(num_swap_blocks, torch.device("cpu"),
                                              pin=self.device.type == "cuda")
                            if num_swap_blocks else [])
        if (self.device.type == "cuda" and self.attn.supports_cuda_graphs
                and not self.config.device.enforce_eager):
            self._capture_graphs()

    def _capture_graphs(self) -> None:
        sizes = graph_batch_sizes(self.config.scheduler.max_num_seqs)
        max_len = self.config.model.max_model_len or self.arch.max_position_embeddings
        self.attn.enable_cuda_graphs(sizes, max_blocks_per_req=-(-max_len // self.block_size))
        if self.config.device.gemm_tuning_algos:
            self._tune_gemms(sizes)
        self.graphs = DecodeGraphs(self.model, self.kv_caches, self.attn, sizes, self.device,
                                   self._weight_prefetch())
        self.graphs.capture(lambda bs: self.attn.plan(self._padding_batch(bs)))
        tokens = min(self.config.device.piecewise_cuda_graph_tokens,
                     self.config.scheduler.max_num_batched_tokens)
        if piecewise_sizes(tokens):
            self.piecewise = PiecewiseGraphs(self.model, self.kv_caches, self.model.attention_spec,
                                             piecewise_sizes(tokens), self.dtype, self.device)
            self.piecewise.capture()

    def _weight_prefetch(self) -> Optional[WeightPrefetch]:
        """The side stream on which the linear layers of decode graphs of few rows read the next
        layer's weight into L2 (weight_prefetch_max_rows), or None."""
        d = self.config.device
        if not d.weight_prefetch_max_rows or not (d.weight_prefetch_mb
                                                  or d.weight_prefetch_attention_mb):
            return None
        prefetch = WeightPrefetch(self.device, d.weight_prefetch_max_rows,
                                  max(d.weight_prefetch_mb, d.weight_prefetch_attention_mb) << 20)
        linears = [m for m in self.model.modules() if isinstance(m, TunedProduct)]
        chain_linears(linears, prefetch, d.weight_prefetch_mb << 20,
                      d.weight_prefetch_attention_mb << 20)
        return prefetch

    def _few_rows_kernels(self) -> None:
        """On CUDA, inputs of few rows run zllm's Triton kernels, each with a tile that a rule
        picks from the shape and the SM count (zllm/worker/models/gemm_tuning.py): SiLU gated
        MLPs' gate_up and activation as one kernel up to gated_mlp_max_rows rows
        (few_rows_gated_tile) and, on Hopper and later, from BATCH_GATED_MIN_ROWS rows up to
        gated_mlp_tma_max_rows where they fill the last row tile (BATCH_GATED_TILE, operands
        through TMA), the other products up to few_rows_matmul_max_rows (few_rows_tile).
        16-bit weights only: in float32 the kernels' dots round their inputs to TF32, where
        torch's product does not."""
        d = self.config.device
        if self.device.type != "cuda" or self.dtype not in (torch.float16, torch.bfloat16):
            return
        sm_count = torch.cuda.get_device_properties(self.device).multi_processor_count
        if d.gated_mlp_max_rows:
            for (i, k), tile in give_few_rows_gated(self.model, d.gated_mlp_max_rows,
                                                    sm_count).items():
                logger.info("gate_up [%d, %d] and SiLU in one Triton kernel up to %d rows (%d "
                            "SMs): %s", 2 * i, k, d.gated_mlp_max_rows, sm_count,
                            tile.config if tile else f"none ({k} is no multiple of block_k)")
        tma = torch.cuda.get_device_capability(self.device) >= TMA_CAPABILITY
        if d.gated_mlp_tma_max_rows >= BATCH_GATED_MIN_ROWS and tma:
            given = give_batch_gated(self.model, d.gated_mlp_tma_max_rows)
            logger.info("gate_up and SiLU in one Triton kernel (TMA) from %d to %d rows, last "
                        "row tile three quarters full: %d projections", BATCH_GATED_MIN_ROWS,
                        d.gated_mlp_tma_max_rows, given)
        if d.few_rows_matmul_max_rows:  # not the gate_up projections: gated_matmul's at few rows
            for (n, k), tile in give_few_rows(self.model, d.few_rows_matmul_max_rows,
                                              sm_count).items():
                logger.info("[%d, %d] products up to %d rows (%d SMs): %s", n, k,
                            d.few_rows_matmul_max_rows, sm_count,
                            tile.config if tile else "torch's call")

    def _tune_gemms(self, sizes: list[int]) -> None:
        t0 = time.perf_counter()
        self.gemm_tuning = tune_model(self.model, sizes, self.config.device.gemm_tuning_algos)
        logger.info("cuBLASLt algorithms or Triton tiles chosen for %d of %d products x batch "
                    "sizes in %.1f s",
                    sum(r["chosen"] for r in self.gemm_tuning), len(self.gemm_tuning),
                    time.perf_counter() - t0)

    def _padding_batch(self, num_rows: int) -> AttentionBatch:
        """A decode batch of padding rows only (for capturing graphs)."""
        ones = np.ones(num_rows, np.int32)
        return AttentionBatch.from_lists(
            ones, ones, np.full((num_rows, 1), self.scratch_block, dtype=np.int32),
            np.full(num_rows, self.scratch_block * self.block_size, dtype=np.int64),
            self.block_size, cuda_graph=True)

    def _swap(self, pairs: np.ndarray, out: bool) -> None:
        """Copy blocks device -> host (out) or host -> device, in every layer; `pairs` is flat
        (source, destination) pairs."""
        if not len(pairs):
            return
        src_ids = torch.from_numpy(pairs[0::2].astype(np.int64))
        dst_ids = torch.from_numpy(pairs[1::2].astype(np.int64))
        for kv, host in zip(self.kv_caches, self.swap_caches):
            if out:
                host[dst_ids] = kv[src_ids.to(self.device)].to("cpu")
            else:
                kv[dst_ids.to(self.device)] = host[src_ids].to(self.device, non_blocking=True)

    @torch.inference_mode()
    def profile_run(self, num_tokens: int) -> None:
        """A forward at the largest token budget (prompts of at most max_position_embeddings
        tokens) with a throwaway cache, so the caller can read peak activation memory."""
        max_len = self.arch.max_position_embeddings
        lens = [max_len] * (num_tokens // max_len) + ([num_tokens % max_len] if num_tokens % max_len else [])
        bs = self.block_size
        blocks_per_req = [-(-n // bs) for n in lens]
        saved, self.kv_caches = self.kv_caches, self._allocate_kv(sum(blocks_per_req), self.device)
        block_table = np.zeros((len(lens), max(blocks_per_req)), dtype=np.int32)
        slots, first = [], 0
        for i, (n, nb) in enumerate(zip(lens, blocks_per_req)):
            block_table[i, :nb] = np.arange(first, first + nb)
            slots.append(np.arange(first * bs, first * bs + n))
            first += nb
        dev = self.device
        batch = AttentionBatch.from_lists(lens, lens, block_table, np.concatenate(slots), bs)
        input_ids = torch.zeros(num_tokens, dtype=torch.long, device=dev)
        positions = torch.cat([torch.arange(n) for n in lens]).to(dev)
        self.attn.plan(batch)
        hidden = self.model(input_ids, positions, self.kv_caches, self.attn)
        rows = min(num_tokens, self.config.scheduler.max_num_seqs)
        self.model.compute_logits(hidden[:rows]).softmax(dim=-1)
        self.kv_caches = saved

    # -- one step ----------------------------------------------------------------------------------

    def collect(self) -> ModelRunnerOutput:
        """The oldest launched step's sampled tokens."""
        self._read_back(self.launched[0])
        return self.launched.popleft().output

    def step_done(self) -> bool:
        return not self.launched or self.launched[0].done()

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput) -> None:
        """Queue one step's work on the device; `collect` returns its tokens."""
        self.timer.start()
        # Swaps first: blocks swapped out this step may be handed to other requests below.
        self._swap(sched.blocks_to_swap_out, out=True)
        self._swap(sched.blocks_to_swap_in, out=False)
        batch = self.input_batch
        slots = batch.update(sched)
        if self.grammar is not None or any(new.sampling_params.structured_outputs is not None
                                           for new in sched.new_requests):
            self._grammar().update(sched)
        self.timer.lap("update")
        if sched.total_num_scheduled_tokens == 0:
            batch.forget_previous()
            self.launched.append(LaunchedStep([], slots[:0], None))
            return
        self.staging.next_step()
        num_scheduled = sched.num_scheduled_tokens
        num_tokens = sched.total_num_scheduled_tokens
        if self.launched and batch.needs_sampled_tokens(slots, num_scheduled, num_tokens):
            self._read_back(self.launched[-1])
        previous = self.launched[-1] if self.launched else None
        graph_size = None if self.graphs is None else self.graphs.size_for(num_tokens, len(slots))
        step = batch.prepare(slots, num_scheduled, num_tokens, graph_size)
        self.timer.lap("prepare")
        # Queued once the host has prepared the step, ahead of its copies and kernels: a GPU that
        # finished the step before and waits here is waiting for the host.
        gpu_start = self.gpu_timer.begin()
        input_ids, positions, sample_rows = self._device_inputs(step, previous)
        self.timer.lap("stage")
        self.attn.plan(step.attention)
        self.timer.lap("plan")
        if step.attention.cuda_graph:  # the graph computes every row's logits as well
            hidden, logits = self.graphs.replay(input_ids, positions)
            logits = logits[sample_rows]
            self.timer.lap("forward")
        else:
            if self.piecewise is not None and self.piecewise.size_for(num_tokens):
                hidden = self.piecewise.replay(input_ids, positions, self.attn)
            else:
                hidden = self.model(input_ids, positions, self.kv_caches, self.attn)
            self.timer.lap("forward")
            logits = (self.model.compute_logits(hidden[sample_rows])
                      if len(step.sampled_slots) else None)
            self.timer.lap("logits")
        launched = self._sample(sched, step, logits, previous)
        if step.prompt_logprobs is not None:
            launched.prompt_logprobs = self._prompt_logprobs(sched, step, hidden)
        self._queue_results(launched)
        self.timer.lap("sample")
        self.gpu_timer.end(gpu_start, launched.done_event, len(slots), num_tokens == len(slots))
        self.launched.append(launched)

    def _prompt_logprobs(self, sched: SchedulerOutput, step: StepInputs,
                         hidden: torch.Tensor) -> DevicePromptLogprobs:
        plan = step.prompt_logprobs
        values = prompt_logprobs(self.model.compute_logits, hidden, plan.rows, plan.targets,
                                 int(plan.num_top.max()))
        ids = sched.scheduled_req_ids
        return DevicePromptLogprobs([ids[i] for i in plan.batch_index.tolist()],
                                    plan.first_indices, plan.counts, plan.num_top, *values)

    def _device_inputs(self, step: StepInputs, previous: Optional[LaunchedStep]):
        """Token ids, positions and sampled rows on the device, in one copy. Tokens that the
        previous step sampled are filled in from its device tensor: one copy when the whole
        batch continues in the same order (steady decoding), else a gather."""
        num_fill = len(step.fill_rows)
        # Steady decoding gives one array 0..n-1 for both. Else: fill_rows rises strictly, so
        # ending at num_fill - 1 means it is 0, 1, ..., num_fill - 1.
        in_order = num_fill > 0 and (step.fill_rows is step.fill_from
                                     or (step.fill_rows[-1] == num_fill - 1
                                         and np.array_equal(step.fill_rows, step.fill_from)))
        arrays = [step.input_ids, step.positions]
        if num_fill and not in_order:
            arrays += [step.fill_rows, step.fill_from]
        if step.sample_rows is not None:
            arrays.append(step.sample_rows)
        tensors = self.staging.to_device_all(arrays, np.int64)
        input_ids, positions = tensors[0], tensors[1]
        if in_order:
            input_ids[:num_fill].copy_(previous.tokens[:num_fill])
        elif num_fill:
            input_ids[tensors[2]] = previous.tokens[tensors[3]]
        rows = slice(0, len(step.sampled_slots)) if step.sample_rows is None else tensors[-1]
        return input_ids, positions, rows

    def _sample(self, sched: SchedulerOutput, step: StepInputs, logits: Optional[torch.Tensor],
                previous: Optional[LaunchedStep]) -> LaunchedStep:
        """Sample the requests that reached their end (`logits`: theirs, None if there are
        none)."""
        slots = step.sampled_slots
        launched = LaunchedStep([], slots, None)
        if len(slots):
            inputs = self.input_batch.sampling_inputs(step)
            meta = (GREEDY if inputs is None
                    else make_sampling_metadata(inputs, self.arch.vocab_size, self.staging))
            self.timer.lap("sampling_metadata")
            ids = sched.scheduled_req_ids
            launched.req_ids = (ids if step.sampled is None
                                else [ids[i] for i in step.sampled.tolist()])
            if self.grammar is not None and self.grammar.constrains(launched.req_ids):
                meta = self._constrain(meta, launched, previous)
            launched.tokens, launched.logprobs = sample(logits, meta)
        return launched

    def _queue_results(self, launched: LaunchedStep) -> None:
        """On CUDA, queue copies of the step's tokens and log-probabilities into pinned host
        memory behind its work, then the event that marks them done: reading them back waits
        for this step only, never for steps queued after it."""
        if self.device.type != "cuda":
            return
        if launched.tokens is not None:
            launched.host_tokens = pinned_copy(launched.tokens)
        if launched.logprobs is not None:
            launched.logprobs = launched.logprobs.pinned()
        if launched.prompt_logprobs is not None:
            launched.prompt_logprobs = launched.prompt_logprobs.pinned()
        launched.done_event = torch.cuda.Event(enable_timing=self.gpu_timer.enabled)
        launched.done_event.record()

    def _grammar(self) -> GrammarMatchers:
        if self.grammar is None:
            self.grammar = GrammarMatchers(self.config.model.tokenizer or self.config.model.model,
                                           self.arch.vocab_size, self.arch.eos_token_ids,
                                           self.device)
        return self.grammar

    def _constrain(self, meta, launched: LaunchedStep, previous: Optional[LaunchedStep]):
        """The grammar (not the queued forward) needs the previous step's tokens: wait for
        them, advance the matchers and fill the bitmask while the device runs the forward."""
        if previous is not None:
            self._read_back(previous)
        bitmask = self.grammar.bitmask(launched.req_ids, self.staging)
        self.timer.lap("grammar")
        if bitmask is None:  # every constrained row's grammar has ended
            return meta
        launched.constrained = True
        return dataclasses.replace(meta, token_bitmask=bitmask)  # (GREEDY is shared)

    def _read_back(self, last: LaunchedStep) -> None:
        """Read the tokens of launched steps, oldest first, up to `last`, into the batch."""
        for step in self.launched:
            if step.output is None:
                self.staging.wait(step.done_event)
                tokens = step.read_tokens()
                self.timer.start()  # the wait for the GPU is not host work
                self.input_batch.append_sampled(step.slots, tokens)
                if step.constrained:
                    self.grammar.accept(step.req_ids, tokens.tolist())
                logprobs = step.logprobs.to_host() if step.logprobs is not None else None
                prompt = (step.prompt_logprobs.to_host() if step.prompt_logprobs is not None
                          else None)
                step.output = ModelRunnerOutput(step.req_ids, tokens.astype(np.int32), logprobs,
                                                prompt)
                self.timer.lap("read_back")
            if step is last:
                return
