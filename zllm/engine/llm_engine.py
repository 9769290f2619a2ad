"""The engine on the driver: accepts requests, runs the step loop, returns outputs.

One step: scheduler.schedule() -> executor.submit() -> executor.collect() ->
output_processor.process() -> free what finished. With async scheduling the engine submits step
N+1 before it collects and processes step N, so that work overlaps the workers' step. The engine
never touches torch models; the workers behind the executor do.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import random
import time
from typing import Optional, Union

from zllm.config import EngineConfig, LlamaArchitecture
from zllm.engine.block_manager import BlockManager
from zllm.engine.output_processor import OutputProcessor
from zllm.engine.request import Request, RequestStatus
from zllm.engine.scheduler import Scheduler, StepStats
from zllm.executor import Executor, make_executor
from zllm.model_files import detect_load_format, resolve_model_path
from zllm.outputs import CompletionOutput, RequestOutput
from zllm.sampling_params import SamplingParams
from zllm.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

Prompt = Union[str, list[int]]


@dataclasses.dataclass
class EngineStats:
    """Totals over the engine's life, from the scheduler's per-step StepStats."""

    num_steps: int = 0
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    num_preemptions: int = 0
    num_cache_hit_tokens: int = 0

    def record(self, step: StepStats) -> None:
        self.num_steps += 1
        self.num_prefill_tokens += step.num_prefill_tokens
        self.num_decode_tokens += step.num_decode_tokens
        self.num_preemptions += step.num_preemptions
        self.num_cache_hit_tokens += step.num_cache_hit_tokens

    def summary(self) -> str:
        return (f"{self.num_steps} steps: {self.num_prefill_tokens} prefill tokens computed, "
                f"{self.num_cache_hit_tokens} prompt tokens from the prefix cache, "
                f"{self.num_decode_tokens} decode tokens, {self.num_preemptions} preemptions")


@dataclasses.dataclass
class _Group:
    """The n samples of one prompt."""

    prompt: Optional[str]
    prompt_token_ids: list[int]
    requests: list[Request]
    stream: bool


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        config = copy.deepcopy(config)
        config.model.model = resolve_model_path(config.model.model)
        config.model.load_format = detect_load_format(config.model.model, config.model.load_format)
        self.arch = LlamaArchitecture.from_model_dir(config.model.model)
        self.tokenizer = load_tokenizer(config.model.tokenizer or config.model.model)
        self.config = config

        requested = config.model.max_model_len
        if requested is not None and requested > self.arch.max_position_embeddings:
            raise ValueError(f"config key 'max_model_len' = {requested} is larger than the "
                             f"model's max_position_embeddings ({self.arch.max_position_embeddings})")

        t0 = time.perf_counter()
        self.executor: Executor = make_executor(config)
        try:
            num_blocks = self.executor.determine_num_available_blocks()
            num_swap_blocks = self.executor.determine_num_swap_blocks()
            self.executor.init_kv_cache(num_blocks, num_swap_blocks)
            block_size = config.cache.block_size
            self.max_model_len = self._resolve_max_model_len(num_blocks * block_size)
        except BaseException:
            self.executor.shutdown()
            raise
        logger.info("engine ready in %.1f s: %d KV blocks of %d tokens (%d tokens), "
                    "max_model_len %d", time.perf_counter() - t0, num_blocks, block_size,
                    num_blocks * block_size, self.max_model_len)

        self.block_manager = BlockManager(num_blocks, block_size, config.cache.watermark,
                                          config.cache.enable_prefix_caching, num_swap_blocks)
        self.scheduler = Scheduler(config.scheduler, self.block_manager, config.cache.preemption_mode)
        self.output_processor = OutputProcessor(self.tokenizer, self.max_model_len)
        self.requests: dict[str, Request] = {}
        self.groups: dict[str, _Group] = {}
        self._seed_rng = random.Random(config.model.seed)
        self.stats = EngineStats()
        self.num_in_flight = 0  # steps submitted to the executor and not collected yet
        self.max_in_flight = 1 if config.scheduler.async_scheduling else 0  # beyond the one collected
        eos = self.arch.eos_token_ids or [self.tokenizer.eos_token_id]
        self.eos_token_ids = [t for t in eos if t is not None]

    def _resolve_max_model_len(self, kv_capacity: int) -> int:
        requested = self.config.model.max_model_len
        limit = self.arch.max_position_embeddings
        if requested is not None:
            if requested > kv_capacity:
                raise ValueError(f"config key 'max_model_len' = {requested} does not fit in the KV "
                                 f"cache ({kv_capacity} tokens); lower it or give the cache more memory")
            return requested
        if limit > kv_capacity:
            logger.warning("max_model_len capped at the KV cache capacity, %d tokens (the model "
                           "allows %d)", kv_capacity, limit)
        return min(limit, kv_capacity)

    # -- requests --------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: Prompt, params: Optional[SamplingParams] = None,
                    stream: bool = False, priority: int = 0, prompt_text: Optional[str] = None) -> None:
        """Validate and queue a prompt (text or token ids); raises ValueError on bad input.

        `priority` matters under the "priority" policy: lower values run first. `prompt_text`
        labels a prompt given as token ids (when the caller tokenized it already)."""
        params = params or SamplingParams()
        if request_id in self.groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, prompt_ids = self.check_request(prompt, params)
        text = text if text is not None else prompt_text

        stop_ids = list(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids += [t for t in self.eos_token_ids if t not in stop_ids]
        now = time.monotonic()
        reqs = []
        for i in range(params.n):
            # Every sample gets a seed, so that all TP ranks draw the same tokens and a seeded
            # request is reproducible; sample i of a seeded request uses seed + i.
            seed = params.seed + i if params.seed is not None else self._seed_rng.getrandbits(63)
            child = dataclasses.replace(params, seed=seed, n=1)
            req_id = request_id if params.n == 1 else f"{request_id}#{i}"
            reqs.append(Request(req_id, prompt_ids, child, stop_ids, now, group_id=request_id,
                                priority=priority))
        self.groups[request_id] = _Group(text, prompt_ids, reqs, stream)
        for req in reqs:
            self.requests[req.req_id] = req
            self.output_processor.add_request(req, stream)
            self.scheduler.add_request(req)

    def check_request(self, prompt: Prompt, params: SamplingParams) -> tuple[Optional[str], list[int]]:
        """Tokenize and validate; returns (text or None, token ids) or raises ValueError."""
        if isinstance(prompt, str):
            text: Optional[str] = prompt
            prompt_ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)):
            text, prompt_ids = None, list(prompt)
        else:
            raise ValueError(f"a prompt must be a string or a list of token ids, got "
                             f"{type(prompt).__name__}")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        if not prompt_ids:
            raise ValueError("prompt is empty: give at least one token")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens; max_model_len is "
                             f"{self.max_model_len}, so a prompt may have at most "
                             f"{self.max_model_len - 1} (one is kept for output)")
        vocab = self.arch.vocab_size
        for pos, t in enumerate(prompt_ids):
            if not isinstance(t, int) or not 0 <= t < vocab:
                raise ValueError(f"prompt token id {t!r} at position {pos} is outside the "
                                 f"vocabulary [0, {vocab})")
        for t in params.stop_token_ids:
            if not 0 <= t < vocab:
                raise ValueError(f"stop token id {t} is outside the vocabulary [0, {vocab})")
        return text, prompt_ids

    def abort_request(self, request_id: str) -> None:
        group = self.groups.pop(request_id, None)
        if group is None:
            return
        self.scheduler.finish_requests(group.requests, RequestStatus.FINISHED_ABORTED)
        self._forget(group)

    def has_unfinished_requests(self) -> bool:
        """Requests still to serve, or a submitted step still to collect."""
        return self.scheduler.has_unfinished() or self.num_in_flight > 0

    # -- the step loop ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule and submit one step; collect the oldest submitted step (this one, unless
        async scheduling keeps one more in flight) and return outputs of finished and
        streaming requests."""
        scheduler_output = self.scheduler.schedule()
        submitted = bool(scheduler_output.total_num_scheduled_tokens or (
            scheduler_output.blocks_to_swap_out or scheduler_output.finished_req_ids))
        if submitted:
            self.stats.record(self.scheduler.last_stats)
            self.executor.submit(scheduler_output)
            self.num_in_flight += 1
        elif not self.num_in_flight:
            if self.scheduler.has_unfinished():
                # Nothing fits (cannot happen with a valid config); fail loudly over spinning.
                raise RuntimeError(f"scheduler made no progress: {len(self.scheduler.running)} "
                                   f"running, {len(self.scheduler.waiting)} waiting, "
                                   f"{len(self.scheduler.swapped)} swapped")
            return []
        if submitted and self.num_in_flight <= self.max_in_flight and self.scheduler.has_unfinished():
            return []  # the step runs while the engine schedules the next one
        self.num_in_flight -= 1
        return self._process(self.executor.collect())

    def _process(self, runner_output) -> list[RequestOutput]:
        finished = self.output_processor.process(self.requests, runner_output)
        for req, status in finished:
            self.scheduler.finish_requests([req], status)
        touched = {req.group_id for req, _ in finished}
        for req_id in runner_output.req_ids:
            req = self.requests.get(req_id)
            if req is not None and self.groups[req.group_id].stream:
                touched.add(req.group_id)
        outputs = []
        for group_id in touched:
            group = self.groups[group_id]
            outputs.append(self._make_output(group_id, group))
            if all(r.status.finished for r in group.requests):
                del self.groups[group_id]
                self._forget(group)
        return outputs

    def _make_output(self, group_id: str, group: _Group) -> RequestOutput:
        completions = []
        for i, req in enumerate(group.requests):
            status = req.status
            completions.append(CompletionOutput(
                index=i,
                text=self.output_processor.text(req),
                token_ids=list(req.output_token_ids),
                finish_reason=status.value if status.finished else None,
                stop_reason=req.stop_reason,
                logprobs=list(req.logprobs) if req.params.logprobs is not None else None,
            ))
        return RequestOutput(group_id, group.prompt, group.prompt_token_ids, completions)

    def _forget(self, group: _Group) -> None:
        for req in group.requests:
            self.requests.pop(req.req_id, None)
            self.output_processor.remove(req.req_id)

    def shutdown(self) -> None:
        self.executor.shutdown()
