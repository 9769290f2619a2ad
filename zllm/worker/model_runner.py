"""One step on one rank: keep the batch's request state, flatten it, run the model, sample.

The scheduler output only says what changed; this class holds the rest (each request's tokens,
progress and block table). A step flattens every scheduled request's new tokens into one
sequence (mixed prefill chunks and decodes), writes their K/V into the paged cache inside the
attention backend, and computes logits only for the last token of requests that reach their end.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from zllm.config import EngineConfig, LlamaArchitecture
from zllm.protocol import ModelRunnerOutput, SchedulerOutput
from zllm.sampling_params import SamplingParams
from zllm.worker.attention.base import AttentionBatch, make_attention_backend
from zllm.worker.models.llama import build_model
from zllm.worker.models.weights import load_weights
from zllm.worker.sampler import SamplingMetadata, sample

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

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


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
        self.attn = make_attention_backend(
            config.device.attention_backend, device, num_heads=dims.num_heads,
            num_kv_heads=dims.num_kv_heads, head_dim=dims.head_dim, block_size=self.block_size)
        self.kv_caches: list[torch.Tensor] = []
        self.swap_caches: list[torch.Tensor] = []
        self.requests: dict[str, RequestState] = {}

    def load_weights(self) -> None:
        m = self.config.model
        load_weights(self.model, m.model, m.load_format, self.rank, m.seed)

    # -- KV cache --------------------------------------------------------------------------------

    def kv_block_bytes(self) -> int:
        d = self.model.dims
        return (2 * self.arch.num_layers * self.block_size * d.num_kv_heads * d.head_dim
                * self.dtype.itemsize)

    def init_kv_cache(self, num_blocks: int, num_swap_blocks: int = 0) -> None:
        d = self.model.dims
        shape = (num_blocks, 2, self.block_size, d.num_kv_heads, d.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                          for _ in range(self.arch.num_layers)]
        # Host copies of swapped-out blocks; pinned so device copies can run asynchronously.
        pin = self.device.type == "cuda"
        self.swap_caches = [torch.zeros((num_swap_blocks, *shape[1:]), dtype=self.dtype, pin_memory=pin)
                            for _ in range(self.arch.num_layers)] if num_swap_blocks else []

    def _swap(self, pairs: list[tuple[int, int]], out: bool) -> None:
        """Copy blocks device -> host (out) or host -> device, in every layer."""
        if not pairs:
            return
        src_ids, dst_ids = (torch.tensor(ids, dtype=torch.long) for ids in zip(*pairs))
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
        saved, self.kv_caches = self.kv_caches, []
        self.init_kv_cache(sum(blocks_per_req))
        block_table = torch.zeros(len(lens), max(blocks_per_req), dtype=torch.int32)
        slots, first = [], 0
        for i, (n, nb) in enumerate(zip(lens, blocks_per_req)):
            block_table[i, :nb] = torch.arange(first, first + nb)
            slots.append(torch.arange(first * bs, first * bs + n))
            first += nb
        dev = self.device
        batch = AttentionBatch(
            query_start_loc=torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(dev),
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
            block_table=block_table.to(dev), slot_mapping=torch.cat(slots).to(dev),
            query_lens_cpu=lens, seq_lens_cpu=lens, num_blocks_cpu=blocks_per_req)
        input_ids = torch.zeros(num_tokens, dtype=torch.long, device=dev)
        positions = torch.cat([torch.arange(n) for n in lens]).to(dev)
        self.attn.plan(batch)
        hidden = self.model(input_ids, positions, self.kv_caches, self.attn)
        rows = min(num_tokens, self.config.scheduler.max_num_seqs)
        self.model.compute_logits(hidden[:rows]).softmax(dim=-1)
        self.kv_caches = saved

    # -- one step ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        # Swaps first: blocks swapped out this step may be handed to other requests below.
        self._swap(sched.blocks_to_swap_out, out=True)
        self._swap(sched.blocks_to_swap_in, out=False)
        self._update_states(sched)
        if sched.total_num_scheduled_tokens == 0:
            return ModelRunnerOutput([], [])
        input_ids, positions, batch, sample_rows, sampled_states = self._prepare_inputs(sched)
        self.attn.plan(batch)
        hidden = self.model(input_ids, positions, self.kv_caches, self.attn)
        if not sampled_states:
            return ModelRunnerOutput([], [])
        logits = self.model.compute_logits(hidden[sample_rows])
        tokens, logprobs = sample(logits, self._sampling_metadata(sampled_states))
        token_list = tokens.tolist()
        for state, token in zip(sampled_states, token_list):
            state.token_ids.append(token)
        return ModelRunnerOutput([s.req_id for s in sampled_states], token_list, logprobs)

    def _update_states(self, sched: SchedulerOutput) -> None:
        for req_id in sched.finished_req_ids:
            self.requests.pop(req_id, None)
        for new in sched.new_requests:
            self.requests[new.req_id] = RequestState(
                new.req_id, list(new.prompt_token_ids) + list(new.output_token_ids),
                len(new.prompt_token_ids), new.num_computed_tokens, list(new.block_ids),
                new.sampling_params, list(new.stop_token_ids))
        cached = sched.cached_requests
        for req_id, new_blocks in zip(cached.req_ids, cached.new_block_ids):
            self.requests[req_id].block_ids.extend(new_blocks)

    def _prepare_inputs(self, sched: SchedulerOutput):
        bs = self.block_size
        token_chunks, position_chunks, slot_chunks = [], [], []
        query_lens, seq_lens, sample_rows, sampled_states = [], [], [], []
        max_blocks = max(len(self.requests[r].block_ids) for r in sched.num_scheduled_tokens)
        block_table = np.zeros((len(sched.num_scheduled_tokens), max_blocks), dtype=np.int32)
        num_tokens = 0
        for i, (req_id, n) in enumerate(sched.num_scheduled_tokens.items()):
            state = self.requests[req_id]
            start = state.num_computed_tokens
            positions = np.arange(start, start + n)
            blocks = np.asarray(state.block_ids, dtype=np.int64)
            token_chunks.append(state.token_ids[start:start + n])
            position_chunks.append(positions)
            slot_chunks.append(blocks[positions // bs] * bs + positions % bs)
            block_table[i, :len(blocks)] = blocks
            state.num_computed_tokens = start + n
            query_lens.append(n)
            seq_lens.append(start + n)
            num_tokens += n
            if state.num_computed_tokens == len(state.token_ids):  # reached its end: sample
                sample_rows.append(num_tokens - 1)
                sampled_states.append(state)
        dev = self.device
        input_ids = torch.tensor([t for chunk in token_chunks for t in chunk], dtype=torch.long)
        batch = AttentionBatch(
            query_start_loc=torch.tensor(np.cumsum([0] + query_lens), dtype=torch.int32).to(dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(dev),
            block_table=torch.from_numpy(block_table).to(dev),
            slot_mapping=torch.from_numpy(np.concatenate(slot_chunks)).to(dev),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
            num_blocks_cpu=[-(-s // bs) for s in seq_lens],
        )
        positions = torch.from_numpy(np.concatenate(position_chunks)).to(dev)
        return input_ids.to(dev), positions, batch, torch.tensor(sample_rows, device=dev), sampled_states

    def _sampling_metadata(self, states: list[RequestState]) -> SamplingMetadata:
        dev = self.device
        params = [s.params for s in states]
        vocab = self.arch.vocab_size

        def column(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=dev)

        top_k = [p.top_k if p.top_k > 0 else vocab for p in params]
        meta = SamplingMetadata(
            temperature=column([p.temperature for p in params]),
            all_greedy=all(p.temperature == 0 for p in params),
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
            seen = torch.zeros(len(states), vocab, dtype=torch.bool, device=dev)
            counts = torch.zeros(len(states), vocab, dtype=torch.float32, device=dev)
            for row, s in enumerate(states):
                seen[row, column(s.token_ids, torch.long)] = True
                output = column(s.token_ids[s.num_prompt_tokens:], torch.long)
                counts[row].index_add_(0, output, torch.ones_like(output, dtype=torch.float32))
            meta.seen_tokens, meta.output_counts = seen, counts
        banned = [(row, t) for row, s in enumerate(states)
                  if s.num_output_tokens < s.params.min_tokens for t in s.stop_token_ids]
        if banned:
            rows, toks = zip(*banned)
            meta.banned_rows, meta.banned_tokens = column(rows, torch.long), column(toks, torch.long)
        return meta
