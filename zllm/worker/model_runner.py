"""One step on one rank: keep the batch's request state, flatten it, run the model, sample.

The scheduler output only says what changed; this class holds the rest (each request's tokens,
progress and block table). A step flattens every scheduled request's new tokens into one
sequence (mixed prefill chunks and decodes), writes their K/V into the paged cache inside the
attention backend, and computes logits only for the last token of requests that reach their end.
On CUDA with flashinfer, pure-decode steps replay a captured CUDA graph (zllm/worker/cuda_graphs.py)
unless enforce_eager is set.

Host work per step is kept small: per-request arithmetic for decodes is plain Python on ints,
and index arrays travel to the device from pinned memory: the token ids and positions in one
copy here, the attention layout in the backend's plan (only what its kernels read).

A step is launched (`launch`) and its sampled tokens are read back later (`collect`). In between,
the next step may be launched: its decodes read the tokens they continue from the previous
step's device tensor, so the host prepares step N+1 while the GPU still runs step N. Requests
whose sampling needs their token history on the host (penalties, min_tokens, seeded sampling)
wait for the previous step first.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from zllm.config import EngineConfig, LlamaArchitecture
from zllm.protocol import Logprobs, ModelRunnerOutput, SchedulerOutput
from zllm.sampling_params import SamplingParams
from zllm.worker.attention.base import AttentionBatch, make_attention_backend
from zllm.worker.cuda_graphs import DecodeGraphs, graph_batch_sizes
from zllm.worker.models.llama import build_model
from zllm.worker.models.weights import load_weights
from zllm.worker.sampler import SamplingMetadata, sample
from zllm.worker.staging import PinnedStaging

logger = logging.getLogger(__name__)


@dataclass
class RequestState:
    req_id: str
    token_ids: list[int]  # prompt then output
    num_prompt_tokens: int
    num_computed_tokens: int
    block_ids: list[int]
    params: SamplingParams
    stop_token_ids: list[int]
    _block_array: np.ndarray = None  # block_ids as int32, rebuilt when blocks are added
    num_pending: int = 0  # sampled by a launched step, not appended to token_ids yet

    def __post_init__(self) -> None:
        p = self.params
        # Sampling that reads the token history (or the output count) on the host.
        self.needs_history = bool(p.temperature > 0 or p.repetition_penalty != 1 or p.presence_penalty
                                  or p.frequency_penalty or p.min_tokens)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def block_array(self) -> np.ndarray:
        if self._block_array is None or len(self._block_array) != len(self.block_ids):
            self._block_array = np.asarray(self.block_ids, dtype=np.int32)
        return self._block_array


@dataclass
class LaunchedStep:
    """A step whose tokens may still be on the device."""
    states: list[RequestState]
    tokens: Optional[torch.Tensor]  # [len(states)] on the device
    logprobs: Optional[Logprobs] = None
    rows: dict[str, int] = field(default_factory=dict)  # req_id -> index in tokens
    output: Optional[ModelRunnerOutput] = None  # once read back
    done_event: Optional[torch.cuda.Event] = None  # recorded after the step's last kernel

    def done(self) -> bool:
        return self.done_event is None or self.done_event.query()

    def resolve(self) -> ModelRunnerOutput:
        """Read the tokens back (waits for the GPU) and append them to their requests."""
        if self.output is None:
            token_list = self.tokens.tolist() if self.states else []
            for state, token in zip(self.states, token_list):
                state.token_ids.append(token)
                state.num_pending -= 1
            self.output = ModelRunnerOutput([s.req_id for s in self.states],
                                            np.asarray(token_list, dtype=np.int32), self.logprobs)
        return self.output


class ModelRunner:
    def __init__(self, config: EngineConfig, arch: LlamaArchitecture, rank: int, tp_size: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.config = config
        self.arch = arch
        self.rank = rank
        self.device = device
        self.dtype = dtype
        self.block_size = config.cache.block_size
        self.model = build_model(arch, tp_size, arch.max_position_embeddings, dtype, device)
        dims = self.model.dims
        sched = config.scheduler
        max_num_tokens = max(sched.max_num_batched_tokens, graph_batch_sizes(sched.max_num_seqs)[-1])
        self.staging = PinnedStaging(device)
        self.attn = make_attention_backend(
            config.device.attention_backend, device, dtype, max_num_tokens, self.staging,
            num_heads=dims.num_heads, num_kv_heads=dims.num_kv_heads, head_dim=dims.head_dim,
            block_size=self.block_size)
        self.kv_caches: list[torch.Tensor] = []
        self.swap_caches: list[torch.Tensor] = []
        self.requests: dict[str, RequestState] = {}
        self.scratch_block = 0  # padding rows of a CUDA-graph step write here (set with the cache)
        self.graphs: DecodeGraphs | None = None
        self.launched: collections.deque[LaunchedStep] = collections.deque()  # not collected yet

    def load_weights(self) -> None:
        m = self.config.model
        load_weights(self.model, m.model, m.load_format, self.rank, m.seed)

    # -- KV cache --------------------------------------------------------------------------------

    def kv_block_bytes(self) -> int:
        d = self.model.dims
        return (2 * self.arch.num_layers * self.block_size * d.num_kv_heads * d.head_dim
                * self.dtype.itemsize)

    def _allocate_kv(self, num_blocks: int, device: torch.device, pin: bool = False) -> list[torch.Tensor]:
        d = self.model.dims
        shape = (num_blocks, 2, self.block_size, d.num_kv_heads, d.head_dim)
        return [torch.zeros(shape, dtype=self.dtype, device=device, pin_memory=pin)
                for _ in range(self.arch.num_layers)]

    def init_kv_cache(self, num_blocks: int, num_swap_blocks: int = 0) -> None:
        """Blocks 0..num_blocks-1 for the block manager, plus one scratch block at the end."""
        self.kv_caches = self._allocate_kv(num_blocks + 1, self.device)
        self.scratch_block = num_blocks
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
        self.attn.enable_cuda_graphs(sizes, max_pages=sizes[-1] * -(-max_len // self.block_size))
        self.graphs = DecodeGraphs(self.model, self.kv_caches, self.attn, sizes, self.device)
        self.graphs.capture(lambda bs: self.attn.plan(self._padding_batch(bs)))

    def _padding_batch(self, num_rows: int) -> AttentionBatch:
        """A decode batch of padding rows only (for capturing graphs)."""
        ones = [1] * num_rows
        return self._attention_batch(
            ones, ones, np.full((num_rows, 1), self.scratch_block, dtype=np.int32),
            np.full(num_rows, self.scratch_block * self.block_size, dtype=np.int64), cuda_graph=True)

    def _attention_batch(self, query_lens: list[int], seq_lens: list[int], block_table: np.ndarray,
                         slots: np.ndarray, cuda_graph: bool = False) -> AttentionBatch:
        return AttentionBatch.from_lists(query_lens, seq_lens, block_table, slots, self.block_size,
                                         cuda_graph)

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
        batch = self._attention_batch(lens, lens, block_table, np.concatenate(slots))
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
        return self.launched.popleft().resolve()

    def step_done(self) -> bool:
        return not self.launched or self.launched[0].done()

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput) -> None:
        """Queue one step's work on the device; `collect` returns its tokens."""
        # Swaps first: blocks swapped out this step may be handed to other requests below.
        self._swap(sched.blocks_to_swap_out, out=True)
        self._swap(sched.blocks_to_swap_in, out=False)
        self._update_states(sched)
        if sched.total_num_scheduled_tokens == 0:
            self.launched.append(LaunchedStep([], None))
            return
        self.staging.next_step()
        previous = self.launched[-1] if self.launched else None
        if previous is not None and any(self.requests[r].needs_history
                                        for r in sched.scheduled_req_ids):
            previous.resolve()
        input_ids, positions, batch, sample_rows, sampled_states = self._prepare_inputs(sched, previous)
        self.attn.plan(batch)
        if batch.cuda_graph:
            hidden = self.graphs.replay(input_ids, positions)
        else:
            hidden = self.model(input_ids, positions, self.kv_caches, self.attn)
        step = LaunchedStep(sampled_states, None)
        if sampled_states:
            logits = self.model.compute_logits(hidden[sample_rows])
            step.tokens, step.logprobs = sample(logits, self._sampling_metadata(sampled_states))
            for i, state in enumerate(sampled_states):
                state.num_pending += 1
                step.rows[state.req_id] = i
        if self.device.type == "cuda":
            step.done_event = torch.cuda.Event()
            step.done_event.record()
        self.launched.append(step)

    def _update_states(self, sched: SchedulerOutput) -> None:
        for req_id in sched.finished_req_ids + sched.preempted_req_ids:
            self.requests.pop(req_id, None)
        for new in sched.new_requests:
            self.requests[new.req_id] = RequestState(
                new.req_id, new.prompt_token_ids.tolist() + new.output_token_ids.tolist(),
                len(new.prompt_token_ids), new.num_computed_tokens, new.block_ids.tolist(),
                new.sampling_params, new.stop_token_ids.tolist())
        cached = sched.cached_requests
        for owner, block in zip(cached.new_block_owners.tolist(), cached.new_block_ids.tolist()):
            self.requests[cached.req_ids[owner]].block_ids.append(block)

    def _prepare_inputs(self, sched: SchedulerOutput, previous: Optional[LaunchedStep]):
        bs = self.block_size
        scheduled = [(self.requests[r], n) for r, n in zip(sched.scheduled_req_ids,
                                                            sched.num_scheduled_tokens.tolist())]
        num_reqs = len(scheduled)
        # A pure-decode step small enough for a captured graph is padded to the graph's size.
        graph_size = None
        if self.graphs is not None and sched.total_num_scheduled_tokens == num_reqs:
            graph_size = self.graphs.padded_size(num_reqs)
        num_rows = graph_size or num_reqs
        tokens, positions, slots, query_lens, seq_lens = [], [], [], [], []
        sample_rows, sampled_states = [], []
        fill_rows, fill_from = [], []  # rows whose token is still on the device: previous.tokens[i]
        for state, n in scheduled:
            start = state.num_computed_tokens
            end = start + n
            if end > len(state.token_ids) and (n > 1 or previous is None
                                               or state.req_id not in previous.rows):
                self._resolve_launched()  # not a plain continuation: read the tokens back first
            if n == 1:  # decode: plain integer arithmetic
                if start < len(state.token_ids):
                    tokens.append(state.token_ids[start])
                else:  # continues from the token the previous step sampled
                    fill_rows.append(len(tokens))
                    fill_from.append(previous.rows[state.req_id])
                    tokens.append(0)
                positions.append(start)
                slots.append(state.block_ids[start // bs] * bs + start % bs)
            else:
                pos = np.arange(start, end)
                tokens.extend(state.token_ids[start:end])
                positions.extend(range(start, end))
                slots.extend((state.block_array[pos // bs].astype(np.int64) * bs + pos % bs).tolist())
            state.num_computed_tokens = end
            query_lens.append(n)
            seq_lens.append(end)
            if end == len(state.token_ids) + state.num_pending:  # reached its end: sample
                sample_rows.append(len(tokens) - 1)
                sampled_states.append(state)
        num_pad = num_rows - num_reqs
        if num_pad:
            tokens += [0] * num_pad
            positions += [0] * num_pad
            slots += [self.scratch_block * bs] * num_pad
            query_lens += [1] * num_pad
            seq_lens += [1] * num_pad
        max_blocks = max(-(-s // bs) for s in seq_lens)
        block_table = np.full((num_rows, max_blocks), self.scratch_block, dtype=np.int32)
        for i, (state, _) in enumerate(scheduled):
            blocks = state.block_array
            block_table[i, :len(blocks)] = blocks
        batch = self._attention_batch(query_lens, seq_lens, block_table,
                                      np.asarray(slots, dtype=np.int64), graph_size is not None)
        num_tokens, num_fill = len(tokens), len(fill_rows)
        longs = self.staging.to_device(np.asarray(tokens + positions + fill_rows + fill_from,
                                                  dtype=np.int64))
        input_ids, positions_t = longs[:2 * num_tokens].view(2, num_tokens)
        if num_fill:
            fill = longs[2 * num_tokens:].view(2, num_fill)
            input_ids[fill[0]] = previous.tokens[fill[1]]
        if sample_rows == list(range(len(sample_rows))):  # decodes: the first rows, no gather
            rows = slice(0, len(sample_rows))
        else:
            rows = self.staging.to_device(np.asarray(sample_rows, dtype=np.int64))
        return input_ids, positions_t, batch, rows, sampled_states

    def _resolve_launched(self) -> None:
        for step in self.launched:
            step.resolve()

    def _sampling_metadata(self, states: list[RequestState]) -> SamplingMetadata:
        dev = self.device
        params = [s.params for s in states]
        vocab = self.arch.vocab_size

        def column(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=dev)

        if all(p.temperature == 0 for p in params):  # greedy: argmax needs no per-row tensors
            meta = SamplingMetadata(temperature=None, all_greedy=True, top_k=None, top_p=None,
                                    min_p=None, seeds=None, output_positions=None)
        else:
            top_k = [p.top_k if p.top_k > 0 else vocab for p in params]
            meta = SamplingMetadata(
                temperature=column([p.temperature for p in params]),
                all_greedy=False,
                top_k=column(top_k, torch.long) if any(k < vocab for k in top_k) else None,
                top_p=column([p.top_p for p in params]) if any(p.top_p < 1 for p in params) else None,
                min_p=column([p.min_p for p in params]) if any(p.min_p > 0 for p in params) else None,
                seeds=column([p.seed & (2**63 - 1) for p in params], torch.long),
                output_positions=column([s.num_output_tokens for s in states], torch.long),
            )
        logprob_counts = [p.logprobs for p in params if p.logprobs is not None]
        meta.num_logprobs = max(logprob_counts) if logprob_counts else None
        if any(p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty for p in params):
            meta.repetition_penalty = column([p.repetition_penalty for p in params])
            meta.presence_penalty = column([p.presence_penalty for p in params])
            meta.frequency_penalty = column([p.frequency_penalty for p in params])
            # Token statistics from flat (row * vocab + token) indices: one scatter each, not a
            # loop of device ops per request.
            lengths = np.array([len(s.token_ids) for s in states])
            rows = np.repeat(np.arange(len(states)), lengths)
            flat = rows * vocab + np.fromiter((t for s in states for t in s.token_ids), np.int64,
                                              int(lengths.sum()))
            is_output = np.concatenate([np.arange(n) >= s.num_prompt_tokens
                                        for n, s in zip(lengths, states)])
            seen = torch.zeros(len(states) * vocab, dtype=torch.bool, device=dev)
            seen[self.staging.to_device(flat)] = True
            counts = torch.zeros(len(states) * vocab, dtype=torch.float32, device=dev)
            outputs = self.staging.to_device(flat[is_output])
            counts.index_add_(0, outputs, torch.ones(len(outputs), dtype=torch.float32, device=dev))
            meta.seen_tokens = seen.view(len(states), vocab)
            meta.output_counts = counts.view(len(states), vocab)
        banned = [(row, t) for row, s in enumerate(states)
                  if s.num_output_tokens < s.params.min_tokens for t in s.stop_token_ids]
        if banned:
            rows, toks = zip(*banned)
            meta.banned_rows, meta.banned_tokens = column(rows, torch.long), column(toks, torch.long)
        return meta
