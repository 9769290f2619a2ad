"""The next linear layer's weight read into L2 while the small kernels before its matmul run.

At a few rows a decode step's matmuls only stream their weights, and between two of them run
small kernels that move few bytes: RoPE with the K/V store and attention (between qkv and o), the
all-reduce and norm (o to gate_up, down to the next layer's qkv), the activation (gate_up to
down). For those microseconds the memory bus idles. With the `weight_prefetch_max_rows` config
key, each linear layer, right after its own product, starts a kernel on a side stream that reads
the first bytes of the next linear layer's weight (in forward order; the LM head after the last
layer) with L2's evict-last priority, so that the next matmul finds them in L2.

Only inside the decode CUDA graphs of at most that many rows: `DecodeGraphs` captures those
forwards inside `WeightPrefetch.capturing`, which also joins the side stream back before the
capture ends. Eager steps and other graphs never prefetch (the check is one attribute read). The
reads only load: no result can change.

On an H100 (2026-12-06): `python -m zllm.bench.l2_prefetch` (8B shape, one row, 23 µs of
stand-in small kernels per layer) took 176.0 µs per layer with 8 MB per window and 16 before o
(173.5 with 24 before o and 8 before down) against 182.8 without, the matmuls alone 160.4. In
the engine (`zllm bench throughput --workload latency`, Ray) the 8B shape's batch-1 token took
6.37 ms with 8 and 16 MB against 6.47 without (4 and 24 MB: 6.47), the 1B shape's 1.49 ms
either way. That was while RoPE + K/V store and the SiLU ran as kernels of their own. Once they
ran inside the attention kernel and the gate_up kernel (few_rows_gated_tile), the same H100 gave
5.90 ms without against 6.10 with, and 1.31 against 1.40 on the 1B shape, so the key is off by
default (0). Why it now costs was not measured; the fused gate_up kernel runs one wave of
programs with 96 KiB of shared memory each, which a read kernel beside it on some SMs may push
into a second.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import triton
import triton.language as tl

from zllm.worker.models.linear import QKVParallelLinear

READ_WORDS = 2048  # int64 words (16 KB) per program


# n_words not specialised: one compiled variant for every size (compiled before any capture).
@triton.jit(do_not_specialize=["n_words"])
def _read_kernel(src, sink, n_words, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    words = tl.load(src + offs, mask=offs < n_words, other=0, eviction_policy="evict_last")
    # One word per program to a private sink: a load whose value is never used is compiled away.
    tl.store(sink + tl.program_id(0), tl.sum(words, axis=0))


def weight_words(weight: torch.Tensor) -> torch.Tensor:
    """The weight's memory as int64 words, in memory order (row-major [out, in] or the
    column-major layout of `column_major_linears`)."""
    flat = weight if weight.is_contiguous() else weight.t()
    if not flat.is_contiguous() or flat.numel() * flat.element_size() % 8:
        raise ValueError(f"weight of shape {tuple(weight.shape)} and strides {weight.stride()} "
                         "is not one dense block of 8-byte words")
    return flat.reshape(-1).view(torch.int64)


def read_into_l2(words: torch.Tensor, n_bytes: int, sink: torch.Tensor) -> None:
    """Read the first `n_bytes` of `words` (evict-last in L2); sink takes one word per 16 KB."""
    n_words = min(n_bytes // 8, words.numel())
    programs = triton.cdiv(n_words, READ_WORDS)
    if programs > sink.numel():
        raise ValueError(f"reading {n_bytes} bytes needs a sink of {programs} words, "
                         f"it has {sink.numel()}")
    _read_kernel[(programs,)](words, sink, n_words, BLOCK=READ_WORDS)


class WeightPrefetch:
    """The side stream and sink that the linear layers' reads share, and whether the forward
    being captured prefetches."""

    def __init__(self, device: torch.device, max_rows: int, max_bytes: int) -> None:
        self.max_rows = max_rows
        self.stream = torch.cuda.Stream(device)
        self.sink = torch.zeros(triton.cdiv(max_bytes, 8 * READ_WORDS), dtype=torch.int64,
                                device=device)
        self.active = False
        self.forked = False  # the side stream has work queued in the forward being captured
        read_into_l2(self.sink, 8, self.sink)  # compiled and loaded now: not while capturing

    @contextmanager
    def capturing(self, rows: int) -> Iterator[None]:
        """Around the capture of a forward of `rows` rows: its linear layers prefetch if rows <=
        max_rows; the side stream is joined back at the end, as a capture requires."""
        self.active, self.forked = rows <= self.max_rows, False
        try:
            yield
        finally:
            # Join only a fork this forward made: a capture may not wait on work queued before it.
            if self.forked:
                torch.cuda.current_stream().wait_stream(self.stream)
            self.active = self.forked = False

    def read(self, words: torch.Tensor, n_bytes: int) -> None:
        """On the side stream, after all work queued so far on the current one."""
        self.stream.wait_stream(torch.cuda.current_stream())
        self.forked = True
        with torch.cuda.stream(self.stream):
            read_into_l2(words, n_bytes, self.sink)


class NextWeight:
    """What a linear layer reads ahead after its product: part of the next layer's weight."""

    def __init__(self, prefetch: WeightPrefetch, weight: torch.Tensor, n_bytes: int) -> None:
        self.prefetch, self.words, self.n_bytes = prefetch, weight_words(weight), n_bytes

    def read(self) -> None:
        if self.prefetch.active:
            self.prefetch.read(self.words, self.n_bytes)


def chain_linears(linears: list[torch.nn.Module], prefetch: Optional[WeightPrefetch],
                  n_bytes: int, after_attention_bytes: int) -> None:
    """Give each of `linears` (in forward order) the next one's weight to read ahead:
    `after_attention_bytes` of it where attention runs in between (after a layer that makes q, k
    and v), else `n_bytes`. prefetch None: none reads ahead."""
    for layer, following in zip(linears, linears[1:] + [None]):
        layer.next_weight = None
        if prefetch is not None and following is not None:
            size = after_attention_bytes if isinstance(layer, QKVParallelLinear) else n_bytes
            layer.next_weight = NextWeight(prefetch, following.weight, size) if size else None
