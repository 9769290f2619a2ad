"""CUDA graphs: whole forwards for decode steps, forwards in pieces for steps with prompt tokens.

Decode steps (`DecodeGraphs`): one captured forward per padded batch size.

A decode step of a large model launches over a thousand small kernels; on the GPU each takes
microseconds, but launching them from Python takes longer, so eager decode is bound by the host.
At start-up the model runner captures the forward (embedding to final norm) for batch sizes 1, 2,
4, 8, then every multiple of 8 up to max_num_seqs; a decode step with R requests is padded to the
smallest captured size >= R and replays that graph. Padding rows read token 0 at position 0 and
write their K/V into a scratch block that the block manager never hands out. The graph ends with
the LM head: every row of a decode step is sampled, and launching the head's matmul from Python
after the replay took 116 µs of a batch-1 step's 701 µs of host time (H200, 2026-12-03).

Graphs share one memory pool, captured largest first so the smaller ones reuse its memory.

Steps that carry prompt tokens (`PiecewiseGraphs`): their attention cannot be captured, since
the batch-prefill kernel's schedule depends on each step's query lengths. Everything else can:
the forward is captured once per padded token count (16, 32, 48, 64, 96, ... up to
`piecewise_cuda_graph_tokens`) as one graph per stretch between attention calls: embedding to
the first layer's q/k/v, then each layer's output projection and MLP to the next layer's q/k/v,
then the last MLP to the final norm. A step replays piece 0, runs the first layer's attention
eagerly (planned for the step's real tokens, not the padding), replays piece 1, and so on:
L + 1 graph launches and L attention calls instead of the ten or more launches per layer that
an eager forward makes from Python. Pieces hand q, k and v to attention (unrotated: RoPE runs
in the attention call, as in an eager step, where the backend may fuse it with its K/V store),
and take its output back, through static buffers that every size shares; padding rows compute
on stale inputs and are never read.
"""

from __future__ import annotations

import bisect
import logging
import time
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from zllm.worker.attention.base import AttentionBackend, AttentionSpec

if TYPE_CHECKING:
    from zllm.worker.models.weight_prefetch import WeightPrefetch

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
                 batch_sizes: list[int], device: torch.device,
                 prefetch: Optional[WeightPrefetch] = None) -> None:
        self.model, self.kv_caches, self.attn = model, kv_caches, attn
        self.prefetch = prefetch  # weights read into L2 ahead of their matmuls at few rows
        self.batch_sizes = sorted(batch_sizes)
        largest = self.batch_sizes[-1]
        # Static inputs: each replay reads the step's values from here.
        self.input_ids = torch.zeros(largest, dtype=torch.long, device=device)
        self.positions = torch.zeros(largest, dtype=torch.long, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # Each graph's outputs: the final hidden states (for prompt log-probabilities of a
        # one-token prompt chunk riding in a decode step) and every row's float32 logits.
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
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
            # Warm-up: lazy initialisation (a kernel's compile) must not happen during capture.
            with self._prefetching(bs):
                self._forward(bs)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream), self._prefetching(bs):
                self.outputs[bs] = self._forward(bs)
            pool = graph.pool() if pool is None else pool
            self.graphs[bs] = graph
        torch.cuda.synchronize()
        logger.info("captured %d decode CUDA graphs (batch sizes %d..%d) in %.1f s",
                    len(self.graphs), self.batch_sizes[0], self.batch_sizes[-1],
                    time.perf_counter() - t0)

    def _prefetching(self, bs: int):
        return self.prefetch.capturing(bs) if self.prefetch is not None else nullcontext()

    def _forward(self, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.model(self.input_ids[:bs], self.positions[:bs], self.kv_caches, self.attn)
        return hidden, self.model.compute_logits(hidden)

    def replay(self, input_ids: torch.Tensor,
               positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the graph of size len(input_ids) (attention already planned); (hidden states,
        logits) of every row, valid until the next replay."""
        bs = len(input_ids)
        self.input_ids[:bs].copy_(input_ids, non_blocking=True)
        self.positions[:bs].copy_(positions, non_blocking=True)
        self.graphs[bs].replay()
        self.num_replays += 1
        return self.outputs[bs]


def piecewise_sizes(max_tokens: int) -> list[int]:
    """Token counts to capture for steps with prompt tokens: 16, then powers of two and 1.5x
    powers of two (a step pads by at most half), up to and including max_tokens."""
    sizes = {16}
    p = 32
    while p < max_tokens:
        sizes |= {p, p * 3 // 2}
        p *= 2
    return sorted(s for s in sizes | {max_tokens} if s <= max_tokens) if max_tokens >= 16 else []


class PiecewiseGraphs:
    """The forward in pieces between attention calls, captured per padded token count; see the
    module docstring."""

    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], spec: AttentionSpec,
                 sizes: list[int], dtype: torch.dtype, device: torch.device) -> None:
        self.model, self.kv_caches, self.spec = model, kv_caches, spec
        self.sizes = sorted(sizes)
        largest = self.sizes[-1]
        self.input_ids = torch.zeros(largest, dtype=torch.long, device=device)
        self.positions = torch.zeros(largest, dtype=torch.long, device=device)
        heads, kv_heads, dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        # Attention's inputs and output, shared by every layer and size.
        self.q = torch.zeros(largest, heads, dim, dtype=dtype, device=device)
        self.k = torch.zeros(largest, kv_heads, dim, dtype=dtype, device=device)
        self.v = torch.zeros(largest, kv_heads, dim, dtype=dtype, device=device)
        self.out = torch.zeros(largest, heads, dim, dtype=dtype, device=device)
        self.pieces: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.hidden: dict[int, torch.Tensor] = {}
        # Each layer's (cache, window, rope): the rope where the layer's attention call rotates
        # q and k (between the pieces, so a fused RoPE + K/V store runs as in an eager step).
        self.calls: list[tuple[torch.Tensor, Optional[int], Any]] = []
        self.num_replays = 0  # for checks that the piecewise path is really taken

    def size_for(self, num_tokens: int) -> int | None:
        i = bisect.bisect_left(self.sizes, num_tokens)
        return self.sizes[i] if i < len(self.sizes) else None

    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        for size in reversed(self.sizes):
            self._forward(size, _AttentionSplit(self, None))  # warm-up, nothing captured
            torch.cuda.synchronize()
            split = _AttentionSplit(self, pool)
            with torch.cuda.stream(stream):
                split.open_piece()
                self.hidden[size] = self._forward(size, split)
                split.close_piece()
            self.pieces[size] = split.graphs
            self.calls = split.calls
        torch.cuda.synchronize()
        logger.info("captured piecewise CUDA graphs for steps of %d..%d tokens (%d pieces each) "
                    "in %.1f s", self.sizes[0], self.sizes[-1], len(self.calls) + 1,
                    time.perf_counter() - t0)

    def _forward(self, size: int, split: "_AttentionSplit") -> torch.Tensor:
        return self.model(self.input_ids[:size], self.positions[:size], self.kv_caches, split)

    def replay(self, input_ids: torch.Tensor, positions: torch.Tensor,
               attn: AttentionBackend) -> torch.Tensor:
        """The forward for len(input_ids) tokens (attention already planned for them); hidden
        states of those tokens."""
        n = len(input_ids)
        size = self.size_for(n)
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        q, k, v, out = self.q[:n], self.k[:n], self.v[:n], self.out[:n]
        pieces = self.pieces[size]
        for piece, (kv_cache, window, rope) in zip(pieces, self.calls):
            piece.replay()
            if rope is None:
                attn.forward(q, k, v, kv_cache, window, out=out)
            else:
                attn.forward_rotated(rope, self.positions[:n], q, k, v, kv_cache, window, out=out)
        pieces[-1].replay()
        self.num_replays += 1
        return self.hidden[size][:n]


class _AttentionSplit:
    """Stands in for the attention backend while `PiecewiseGraphs` captures a forward (pool set)
    or warms it up (pool None): each layer's attention call copies q, k and v into the static
    buffers, ends the piece being captured and starts the next, whose first read is the static
    output that replay fills by running the real backend in between."""

    def __init__(self, owner: PiecewiseGraphs, pool) -> None:
        self.owner, self.pool = owner, pool
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.calls: list[tuple[torch.Tensor, Optional[int], Any]] = []

    def open_piece(self) -> None:
        if self.pool is not None:
            self.graphs.append(torch.cuda.CUDAGraph())
            self.graphs[-1].capture_begin(pool=self.pool)

    def close_piece(self) -> None:
        if self.pool is not None:
            self.graphs[-1].capture_end()

    def forward_rotated(self, rope, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                        v: torch.Tensor, kv_cache: torch.Tensor,
                        window: Optional[int] = None) -> torch.Tensor:
        """q and k leave the piece unrotated: replay rotates them in the backend's call."""
        return self.forward(q, k, v, kv_cache, window, rope)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                window: Optional[int] = None, rope=None) -> torch.Tensor:
        o, n = self.owner, len(q)
        o.q[:n].copy_(q)
        o.k[:n].copy_(k)
        o.v[:n].copy_(v)
        self.calls.append((kv_cache, window, rope))
        self.close_piece()
        self.open_piece()
        return o.out[:n]
