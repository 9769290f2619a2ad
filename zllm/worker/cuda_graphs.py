"""CUDA graphs for decode steps: one captured forward per padded batch size.

A decode step of a large model launches over a thousand small kernels; on the GPU each takes
microseconds, but launching them from Python takes longer, so eager decode is bound by the host.
At start-up the model runner captures the forward (embedding to final norm) for batch sizes 1, 2,
4, 8, then every multiple of 8 up to max_num_seqs; a decode step with R requests is padded to the
smallest captured size >= R and replays that graph. Padding rows read token 0 at position 0 and
write their K/V into a scratch block that the block manager never hands out. Logits are computed
after the replay, only for the rows that are sampled.

Graphs share one memory pool, captured largest first so the smaller ones reuse its memory.
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import Callable

import torch

logger = logging.getLogger(__name__)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    largest = -(-max_num_seqs // 8) * 8
    return sorted({s for s in (1, 2, 4, 8) if s <= largest} | set(range(8, largest + 1, 8)))


def graph_size_for(batch_sizes: list[int], num_tokens: int, num_reqs: int) -> int | None:
    """The captured size a step runs at: the smallest one >= num_reqs for a step of decodes
    only (an exact fit included), None (run eagerly) for a step with a longer query or with
    more requests than the largest graph. `batch_sizes` rises."""
    if num_tokens != num_reqs:
        return None
    i = bisect.bisect_left(batch_sizes, num_reqs)
    return batch_sizes[i] if i < len(batch_sizes) else None


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], attn,
                 batch_sizes: list[int], device: torch.device) -> None:
        self.model, self.kv_caches, self.attn = model, kv_caches, attn
        self.batch_sizes = sorted(batch_sizes)
        largest = self.batch_sizes[-1]
        # Static inputs: each replay reads the step's values from here.
        self.input_ids = torch.zeros(largest, dtype=torch.long, device=device)
        self.positions = torch.zeros(largest, dtype=torch.long, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.hidden: dict[int, torch.Tensor] = {}
        self.num_replays = 0  # for checks that the graph path is really taken

    def size_for(self, num_tokens: int, num_reqs: int) -> int | None:
        return graph_size_for(self.batch_sizes, num_tokens, num_reqs)

    @torch.inference_mode()
    def capture(self, plan_padding_batch: Callable[[int], None]) -> None:
        """plan_padding_batch(bs) plans attention for a batch of bs padding rows."""
        t0 = time.perf_counter()
        pool = None
        stream = torch.cuda.Stream()
        for bs in reversed(self.batch_sizes):
            plan_padding_batch(bs)
            self._forward(bs)  # warm-up: lazy initialisation must not happen during capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self.hidden[bs] = self._forward(bs)
            pool = graph.pool() if pool is None else pool
            self.graphs[bs] = graph
        torch.cuda.synchronize()
        logger.info("captured %d decode CUDA graphs (batch sizes %d..%d) in %.1f s",
                    len(self.graphs), self.batch_sizes[0], self.batch_sizes[-1],
                    time.perf_counter() - t0)

    def _forward(self, bs: int) -> torch.Tensor:
        return self.model(self.input_ids[:bs], self.positions[:bs], self.kv_caches, self.attn)

    def replay(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Run the graph of size len(input_ids) (attention already planned); hidden states."""
        bs = len(input_ids)
        self.input_ids[:bs].copy_(input_ids, non_blocking=True)
        self.positions[:bs].copy_(positions, non_blocking=True)
        self.graphs[bs].replay()
        self.num_replays += 1
        return self.hidden[bs]
