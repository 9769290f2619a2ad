"""Paged attention with flashinfer kernels: the CUDA path.

One step is planned once (`plan`) and its plan is shared by every layer. A step with any query
longer than one token (prefill chunks, possibly mixed with decodes) runs the batch-prefill kernel,
causal and bottom-right aligned, so a chunk sees the cached prefix and itself; a step of pure
decodes runs the batch-decode kernel, which is faster for one query row per request.

Everything the kernels read about the step's layout (the page table as indptr / indices /
last_page_len, and each new token's request and position for the K/V store) is built on the host
with vectorized numpy from the step's arrays, packed into one pinned int32 buffer
(zllm/worker/staging.py) and copied to the device in one transfer, so planning step N+1 never
waits for step N to finish on the GPU. flashinfer reads indptr on the host to choose its split-k
schedule. Each layer stores its new K and V with one kernel: zllm's, which applies RoPE to q and k
on the way (zllm/worker/attention/rope_store.py), or, where the model's RoPE is PyTorch's (a
model built unfused) or Triton is missing, flashinfer's append_paged_kv_cache after the RoPE. A
pure-decode step on zllm's Triton decode kernel (below) needs neither: that kernel rotates, stores
and attends in one launch (`NewKV`).

CUDA graphs: a captured decode step replays fixed kernels on fixed buffers, so for each captured
batch size there is a decode wrapper in flashinfer's CUDA-graph mode whose page table lives in
one device region (`_TableLayout`) that `plan` refills with its one copy; after each wrapper's
first full `plan()`, a step re-plans it with flashinfer's `fast_decode_plan`, which only reruns
the split-k scheduler (no tensor copies, no sequence-length arithmetic in Python).
flashinfer is imported here only, so CPU installs never need it.

Two kernels run some pure-decode steps instead of flashinfer's decode, eager or captured. Neither
takes a plan, so such a step skips flashinfer's host-side scheduler and its graphs need no
wrappers; the K/V store is the same kernel either way.
- zllm's Triton GQA decode kernel (zllm/worker/attention/triton_decode.py) runs steps whose
  requests times KV heads reach `triton_decode_min_programs` (one program of the kernel each; it
  does not split a sequence, so it needs many to fill the GPU). It reads the page table (indptr,
  indices) and the sequence lengths that the packed table holds anyway. Steps of at most
  `triton_decode_split_max_batch` requests run it with each sequence split among programs
  (`split_count`), which merge in the same launch.
  It also runs a mixed step's leading decodes (the running requests come first) where they
  reach the same threshold (`leading_decodes`); the prefill kernel, planned for the requests
  after them, runs the rest.
- XQA (xqa_decode_max_batch, off by default) runs steps of up to that many requests:
  TensorRT-LLM's XQA GQA decode kernel as flashinfer ships it. It reads a padded [R, W] page
  table, one more section of the packed table.

Sliding windows: flashinfer takes a window in `plan` (window_left, the number of keys a query
sees before its own position: Hugging Face's window W is window_left = W - 1) and binds the
kernel to it, so each distinct window of the model's layers has its own wrappers, planned
together, each with its own plan data (int workspace); they share the float workspace, which
only the running kernel uses. Scores are soft-capped in the kernel when the model says so.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from zllm.worker.attention.base import AttentionBackend, AttentionBatch, AttentionSpec
from zllm.worker.staging import PinnedStaging

logger = logging.getLogger(__name__)

FLOAT_WORKSPACE_BYTES = 256 * 2**20
# The Triton decode kernel's split of one sequence, at most (a part is at least one 64-token tile).
MAX_SPLITS = 128
# XQA's own: 8 MiB of semaphores, which must read zero at each call (the kernel leaves them so),
# then scratch for the partial results of sequences split across CTAs at small batch sizes.
XQA_WORKSPACE_BYTES = 32 * 2**20
INT_WORKSPACE_BYTES = 8 * 2**20  # flashinfer's own default for its plan data
_ALIGN = 16  # int32 entries (64 bytes) between sections of the packed table


@dataclass
class _TableViews:
    indptr: torch.Tensor  # [R + 1] pages per request, as offsets into indices
    last_page_len: torch.Tensor  # [R]
    batch_indices: torch.Tensor  # [T] request of each new token
    positions: torch.Tensor  # [T] position of each new token in its sequence
    qo_indptr: torch.Tensor  # [R + 1]
    seq_lens: torch.Tensor  # [R] (XQA reads them; flashinfer's wrappers take them on the host)
    page_table: torch.Tensor  # [R * W]: row i holds request i's pages, padded (XQA only; W >= 0)
    indices: torch.Tensor  # [pages]: kept last, so a graph step copies only the pages it has


class _TableLayout:
    """Offsets of the sections of one packed int32 page table, sized for up to `max_reqs`
    requests, `max_tokens` new tokens and `max_pages` pages, with a padded [R, width] page
    table for XQA when R <= `width_reqs` (width 0: none)."""

    def __init__(self, max_reqs: int, max_tokens: int, max_pages: int, width: int = 0,
                 width_reqs: Optional[int] = None) -> None:
        self.width = width
        self.width_reqs = max_reqs if width_reqs is None else min(width_reqs, max_reqs)
        sizes = (max_reqs + 1, max_reqs, max_tokens, max_tokens, max_reqs + 1, max_reqs,
                 self.width_reqs * width, max_pages)
        self.offsets = []
        offset = 0
        for size in sizes:
            self.offsets.append(offset)
            offset += -(-size // _ALIGN) * _ALIGN
        self.size = self.offsets[-1] + max_pages

    def views(self, table: torch.Tensor | np.ndarray, num_reqs: int, num_tokens: int,
              num_pages: int) -> _TableViews:
        padded = num_reqs * self.width if num_reqs <= self.width_reqs else 0
        lengths = (num_reqs + 1, num_reqs, num_tokens, num_tokens, num_reqs + 1, num_reqs,
                   padded, num_pages)
        return _TableViews(*(table[o:o + n] for o, n in zip(self.offsets, lengths)))


def fill_table(views: _TableViews, batch: AttentionBatch, indptr: np.ndarray,
               block_size: int) -> None:
    """Write the step's page table and K/V store positions into host (numpy) views."""
    num_blocks, seq_lens, starts = batch.num_blocks, batch.seq_lens, batch.query_start_loc
    views.indptr[:] = indptr
    views.last_page_len[:] = seq_lens - (num_blocks - 1) * block_size
    views.qo_indptr[:] = starts
    views.seq_lens[:] = seq_lens
    batch.page_indices(indptr, out=views.indices)
    if len(views.page_table):  # columns past a request's own pages are never read
        rows = views.page_table.reshape(batch.num_reqs, -1)
        width = min(rows.shape[1], batch.block_table.shape[1])
        rows[:, :width] = batch.block_table[batch.table_rows, :width]
    if batch.is_decode_only:
        views.batch_indices[:] = np.arange(batch.num_reqs)
        views.positions[:] = seq_lens - 1
    else:
        # Token t of request i sits at position t + seq_lens[i] - query_start_loc[i + 1].
        query_lens = batch.query_lens
        views.batch_indices[:] = np.repeat(np.arange(batch.num_reqs), query_lens)
        views.positions[:] = np.repeat(seq_lens - starts[1:], query_lens)
        views.positions[:] += np.arange(batch.num_tokens, dtype=np.int32)


def leading_decodes(query_lens: np.ndarray, num_kv_heads: int, triton_min_programs: int) -> int:
    """How many of a mixed step's first requests, its decodes (one new token each: the running
    requests come first), run on the Triton decode kernel instead of inside the prefill kernel:
    all of them where they are enough for it (requests times KV heads at least
    triton_min_programs; 0: never), else none. In the prefill kernel a decode costs several
    times its KV read (on an H100 W1's mixed steps spent 7.4 ms in attention against 1.8 ms
    for the same prompts alone, 2026-12-05)."""
    if not triton_min_programs:
        return 0
    first_longer = np.flatnonzero(query_lens != 1)
    decodes = int(first_longer[0]) if len(first_longer) else len(query_lens)
    return decodes if decodes * num_kv_heads >= triton_min_programs else 0


def prefill_part(batch: AttentionBatch, indptr: np.ndarray,
                 decodes: int) -> tuple[np.ndarray, np.ndarray, int]:
    """What the prefill kernel reads of a mixed step whose first `decodes` requests run on
    another kernel: the rest's query and page offsets, both counted from 0 and int32 (what
    flashinfer reads, whatever the batch's own dtype), and the first page of the step's page
    list that is theirs."""
    first_page = int(indptr[decodes])
    qo_indptr = (batch.query_start_loc[decodes:] - decodes).astype(np.int32)
    return qo_indptr, (indptr[decodes:] - first_page).astype(np.int32), first_page


def split_count(num_reqs: int, num_kv_heads: int, min_programs: int) -> int:
    """Into how many parts the Triton decode kernel splits each sequence of a small decode step,
    so that its programs (requests x KV heads x parts) reach `min_programs`: 1 where one program
    per (request, KV head) already does, at most MAX_SPLITS. Parts past a short sequence's end
    exit at once."""
    return max(1, min(MAX_SPLITS, -(-min_programs // (num_reqs * num_kv_heads))))


def planless_kernel(num_reqs: int, num_kv_heads: int, xqa_max_batch: int,
                    triton_min_programs: int, triton_split_max_batch: int = 0) -> str:
    """Which kernel without a flashinfer plan runs a pure-decode step of `num_reqs` requests:
    "xqa" (up to xqa_max_batch requests), "triton" (at least triton_min_programs requests times
    KV heads, or, each sequence split, at most triton_split_max_batch requests; 0: never) or ""
    (flashinfer's decode wrappers)."""
    if num_reqs <= xqa_max_batch:
        return "xqa"
    if triton_min_programs and (num_reqs * num_kv_heads >= triton_min_programs
                                or num_reqs <= triton_split_max_batch):
        return "triton"
    return ""


class FlashInferBackend(AttentionBackend):
    supports_cuda_graphs = True

    def __init__(self, device: torch.device, dtype: torch.dtype, spec: AttentionSpec,
                 block_size: int, max_num_tokens: int, staging: PinnedStaging | None = None,
                 xqa_max_batch: int = 0, triton_min_programs: int = 0,
                 triton_split_max_batch: int = 0) -> None:
        super().__init__(spec, block_size)
        import flashinfer

        self.device, self.dtype = device, dtype
        # Decode steps of at most this many requests run XQA; the rest flashinfer's decode.
        self.xqa_max_batch = xqa_max_batch
        self._xqa = None  # flashinfer's XQA entry point, if decode steps run it
        if xqa_max_batch:
            why_not = self._xqa_unsupported()
            if why_not:
                raise ValueError(f"xqa_decode_max_batch {xqa_max_batch}: XQA cannot run here: "
                                 f"{why_not}")
            from flashinfer.decode import xqa_batch_decode_with_kv_cache

            self._xqa = xqa_batch_decode_with_kv_cache
            self.xqa_workspace = torch.zeros(XQA_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self._xqa_args: tuple | None = None  # (page table [R, W], seq_lens, W * block_size)
        # Decode steps of more than xqa_max_batch requests, and at least this many requests
        # times KV heads, run the Triton kernel; 0: none. (`_new_kv`: the kernel's NewKV, which
        # its pure-decode steps hand it so that it also does their RoPE and K/V store.)
        self.triton_min_programs, self._triton_decode, self._new_kv = self._triton_kernel(
            triton_min_programs)
        # Decode steps of at most this many requests run it too, each sequence split among
        # programs so that there are triton_min_programs of them (`split_count`).
        self.triton_split_max_batch = triton_split_max_batch if self._triton_decode else 0
        self._split_workspace = None
        if self.triton_split_max_batch:
            from zllm.worker.attention.triton_decode import SplitWorkspace

            pairs = self.triton_split_max_batch * self.num_kv_heads
            slots = min(self.triton_min_programs + pairs, MAX_SPLITS * pairs)  # split_count's
            self._split_workspace = SplitWorkspace(device, slots, pairs, self.num_heads,
                                                   self.num_kv_heads, self.head_dim)
        self._decode_splits = 1  # this step's split of each sequence on the Triton kernel
        # A pure-decode step on the Triton kernel: RoPE and the K/V store run inside it.
        self._decode_new_kv = False
        # The step's first rows that the Triton kernel runs: all of a decode step's, a mixed
        # step's leading decodes (the prefill kernel runs the rest), or none.
        self._decode_rows = 0
        self.staging = staging or PinnedStaging(device)
        self.windows = spec.sliding_windows
        self.workspace = torch.zeros(FLOAT_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        # Per window: a step plans all windows, but uses exactly one of prefill / decode / graph.
        self.int_workspaces = {w: torch.zeros(INT_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
                               for w in self.windows}
        self.prefill = {w: self._share(flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            self.workspace, "NHD"), w) for w in self.windows}
        self.decode = {w: self._share(flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_tensor_cores=self._decode_tensor_cores()), w)
            for w in self.windows}
        self.graph_decode: dict[int, dict] = {}  # batch size -> window -> CUDA-graph decode wrapper
        self.graph_layout: _TableLayout | None = None
        self.graph_table: torch.Tensor | None = None  # the region graph wrappers read
        self._planned: set[int] = set()  # graph wrappers that had their first, full plan()
        # Per wrapper: an event behind the copy of its last plan (see `_plan_one`).
        self._plan_copied: dict[int, torch.cuda.Event] = {}
        self._wrappers: dict = {}  # window -> the wrapper planned for this step
        self._table: _TableViews | None = None  # this step's device views
        try:
            from flashinfer.decode import fast_decode_plan
        except ImportError:  # older flashinfer: every step takes the full plan()
            fast_decode_plan = None
        self._fast_decode_plan = fast_decode_plan
        self._append_kv = flashinfer.append_paged_kv_cache
        self._rope_and_store = self._rope_store_kernel()

    def _xqa_unsupported(self) -> str:
        """Why XQA cannot run this backend's decode steps ("" if it can)."""
        try:
            from flashinfer.decode import xqa_batch_decode_with_kv_cache  # noqa: F401
        except ImportError:
            return "this flashinfer has no XQA kernel"
        major, minor = torch.cuda.get_device_capability(self.device)
        checks = ((major in (9, 10, 12), f"compute capability {major}.{minor} (XQA: 9.0 and up)"),
                  (self.dtype in (torch.bfloat16, torch.float16), f"dtype {self.dtype}"),
                  (self.block_size in (16, 32, 64, 128),
                   f"block_size {self.block_size} (XQA: 16, 32, 64 or 128)"),
                  (self.head_dim % 16 == 0 and self.head_dim <= 256,
                   f"head_dim {self.head_dim} (XQA: a multiple of 16, at most 256)"),
                  (not self.spec.logits_soft_cap, "soft-capped scores"),
                  # XQA takes windows, but no GPU run has checked them against torch yet.
                  (self.spec.sliding_windows == (None,), "sliding windows"))
        return next((why for ok, why in checks if not ok), "")

    def _rope_store_kernel(self):
        """zllm's fused RoPE + K/V store kernel, or None where Triton is missing (then RoPE and
        the store run as flashinfer's two kernels)."""
        try:
            from zllm.worker.attention.rope_store import rope_and_store
        except ImportError as e:
            logger.warning("no Triton (%s): RoPE and the K/V store run as two kernels", e)
            return None
        return rope_and_store

    def _triton_kernel(self, min_programs: int):
        """(min_programs, the kernel, its NewKV) where the Triton decode kernel can run this
        backend's decode steps, else (0, None, None): it is on by default, so a model or install
        it cannot serve falls back to flashinfer's decode rather than failing."""
        if not min_programs:
            return 0, None, None
        try:
            from zllm.worker.attention import triton_decode
        except ImportError as e:
            logger.warning("no Triton (%s): decode steps run flashinfer's decode kernel", e)
            return 0, None, None
        why_not = triton_decode.unsupported(self.head_dim, self.dtype)
        if why_not:
            logger.info("the Triton decode kernel cannot run %s: decode steps run flashinfer's",
                        why_not)
            return 0, None, None
        return min_programs, triton_decode.gqa_decode, triton_decode.NewKV

    def _planless_kernel(self, num_reqs: int) -> str:
        return planless_kernel(num_reqs, self.num_kv_heads, self.xqa_max_batch,
                               self.triton_min_programs, self.triton_split_max_batch)

    def _decode_tensor_cores(self) -> bool:
        # Tensor-core decode (flashinfer's prefill kernels) pays off for GQA groups of 4 and up:
        # on an H100 with the Llama-3.1-8B shape (group 4) it cut attention from 7.6 to 7.1 ms
        # of a 256-request decode step and from 0.46 to 0.30 ms at batch 1 (2026-11-25).
        return self.num_heads // self.num_kv_heads >= 4

    def _share(self, wrapper, window: Optional[int]):
        wrapper.reset_workspace_buffer(self.workspace, self.int_workspaces[window])
        return wrapper

    def enable_cuda_graphs(self, batch_sizes: list[int], max_blocks_per_req: int) -> None:
        """Make the page-table region that captured decode steps read, and (flashinfer decode)
        a CUDA-graph decode wrapper for each batch size and window, whose buffers are views of
        that region (a step plans only the wrappers it replays). Sizes that XQA or the Triton
        kernel run need no wrappers: XQA reads the region's padded [R, max_blocks_per_req]
        table, the Triton kernel its indptr, indices and seq_lens."""
        import flashinfer

        largest = max(batch_sizes)
        max_pages = largest * max_blocks_per_req
        width = max_blocks_per_req if self._xqa else 0
        self.graph_layout = _TableLayout(largest, largest, max_pages, width, self.xqa_max_batch)
        self.graph_table = torch.zeros(self.graph_layout.size, dtype=torch.int32,
                                       device=self.device)
        for bs in (bs for bs in batch_sizes if not self._planless_kernel(bs)):
            views = self.graph_layout.views(self.graph_table, bs, bs, max_pages)
            self.graph_decode[bs] = {w: self._share(flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace, "NHD", use_cuda_graph=True,
                use_tensor_cores=self._decode_tensor_cores(),
                paged_kv_indptr_buffer=views.indptr, paged_kv_indices_buffer=views.indices,
                paged_kv_last_page_len_buffer=views.last_page_len), w) for w in self.windows}

    def plan(self, batch: AttentionBatch) -> None:
        kernel = self._planless_kernel(batch.num_reqs) if batch.is_decode_only else ""
        host, indptr = self._pack_table(batch, kernel == "xqa")
        # Every field `forward` dispatches on is set here, before any early return: a step must
        # never run on the route of the step before.
        self._xqa_args = None
        self._decode_splits = 1
        self._decode_new_kv = False
        if batch.is_decode_only:
            self._decode_rows = batch.num_reqs if kernel == "triton" else 0
            self._decode_new_kv = kernel == "triton"
            if self._decode_rows:  # 1 unless a step of few requests (`planless_kernel`)
                self._decode_splits = split_count(batch.num_reqs, self.num_kv_heads,
                                                  self.triton_min_programs)
        else:
            self._decode_rows = leading_decodes(batch.query_lens, self.num_kv_heads,
                                                self.triton_min_programs)
        if kernel == "xqa":  # nothing to plan: the kernel reads the padded table and the lengths
            t = self._table
            rows = t.page_table.view(batch.num_reqs, -1)
            self._xqa_args = (rows, t.seq_lens, rows.shape[1] * self.block_size)
            return
        if kernel == "triton":  # nothing to plan either: it reads indptr, indices and seq_lens
            return
        common = dict(num_qo_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                      page_size=self.block_size, sm_scale=self.scale, q_data_type=self.dtype,
                      kv_data_type=self.dtype, logits_soft_cap=self.spec.logits_soft_cap)
        seq_lens = self.staging.host(batch.seq_lens)  # given, so flashinfer need not derive it
        indices = self._table.indices
        if self._decode_rows:  # the prefill kernel sees only the requests after them
            d = self._decode_rows
            qo_indptr, page_indptr, first_page = prefill_part(batch, indptr, d)
            # Staged (pinned): flashinfer copies them to the device, and a copy from pageable
            # memory would make the host wait for the GPU's queue to drain.
            host = dataclasses.replace(host, qo_indptr=self.staging.host(qo_indptr),
                                       indptr=self.staging.host(page_indptr),
                                       last_page_len=host.last_page_len[d:])
            seq_lens, indices = seq_lens[d:], indices[first_page:]
        if batch.cuda_graph:
            self._wrappers = self.graph_decode[batch.num_reqs]
        else:
            self._wrappers = self.decode if batch.is_decode_only else self.prefill
        for window, wrapper in self._wrappers.items():
            self._plan_one(wrapper, batch, host, indices, seq_lens,
                           dict(common, window_left=_window_left(window)))

    def _plan_one(self, wrapper, batch: AttentionBatch, host: _TableViews, indices: torch.Tensor,
                  seq_lens: torch.Tensor, kw: dict) -> None:
        """Plan one wrapper. flashinfer writes the plan into the wrapper's one pinned buffer and
        queues its copy to the device behind the work already queued, which may be a step still
        running: a second plan of the same wrapper must not overwrite the buffer before that copy
        has run. So the host waits for it first. The worker plans a step after collecting the one
        before, by when that copy has normally run; where a step is planned with two before it
        unfinished (in process, async_steps_ahead 2), the staging buffers (zllm/worker/staging.py)
        wait for the older one anyway."""
        copied = self._plan_copied.get(id(wrapper))
        self.staging.wait(copied)
        if batch.cuda_graph:
            self._plan_graph(wrapper, host, seq_lens, kw)
        elif batch.is_decode_only:
            wrapper.plan(host.indptr, indices, host.last_page_len,
                         head_dim=self.head_dim, seq_lens=seq_lens, **kw)
        else:
            wrapper.plan(host.qo_indptr, host.indptr, indices, host.last_page_len,
                         head_dim_qk=self.head_dim, causal=True, seq_lens=seq_lens,
                         max_token_per_sequence=batch.max_query_len, **kw)
        if copied is None:
            copied = self._plan_copied[id(wrapper)] = torch.cuda.Event()
        copied.record()

    def _plan_graph(self, wrapper, host: _TableViews, seq_lens: torch.Tensor,
                    kw: dict) -> None:
        if self._fast_decode_plan is not None and id(wrapper) in self._planned:
            # Buffers are filled already: only the split-k schedule is recomputed.
            self._fast_decode_plan(wrapper, host.indptr, self._table.indices, host.last_page_len,
                                   head_dim=self.head_dim, **kw)
        else:
            # plan() copies indices into the wrapper's buffer, which is this very region:
            # hand it a copy rather than the region itself.
            wrapper.plan(host.indptr, self._table.indices.clone(), host.last_page_len,
                         head_dim=self.head_dim, seq_lens=seq_lens, **kw)
            self._planned.add(id(wrapper))

    def _pack_table(self, batch: AttentionBatch, xqa: bool) -> tuple[_TableViews, np.ndarray]:
        """Fill the step's page table in pinned memory and copy it to the device in one transfer:
        into the graph region for a graph step, else into a fresh device tensor (with a padded
        [R, longest] table if XQA runs the step). Returns the host views (pinned tensors, which
        flashinfer's plan reads) and sets `_table` to the device views."""
        num_reqs, num_tokens = batch.num_reqs, batch.num_tokens
        indptr = batch.page_indptr()
        num_pages = int(indptr[-1])
        if batch.cuda_graph:
            layout = self.graph_layout
            used = layout.offsets[-1] + num_pages
        else:
            width = int(batch.num_blocks.max()) if xqa else 0
            layout = _TableLayout(num_reqs, num_tokens, num_pages, width)
            used = layout.size
        packed = self.staging.alloc(used, np.int32)
        fill_table(layout.views(packed.numpy(), num_reqs, num_tokens, num_pages), batch, indptr,
                   self.block_size)
        if batch.cuda_graph:
            self.graph_table[:used].copy_(packed, non_blocking=True)
            device = self.graph_table
        else:
            device = packed.to(self.device, non_blocking=True)
        self._table = layout.views(device, num_reqs, num_tokens, num_pages)
        return layout.views(packed, num_reqs, num_tokens, num_pages), indptr

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                window: Optional[int] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        t = self._table
        self._append_kv(k, v, t.batch_indices, t.positions, kv_cache, t.indices, t.indptr,
                        t.last_page_len, "NHD")
        return self._attend(q, kv_cache, window, out)

    def forward_rotated(self, rope, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                        v: torch.Tensor, kv_cache: torch.Tensor, window: Optional[int] = None,
                        out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """RoPE and the K/V store in one kernel where the rope carries a cos | sin table
        (FusedRotaryEmbedding), then attention; in a pure-decode step on the Triton kernel, all
        three in that one kernel (one launch per layer instead of two)."""
        cos_sin = getattr(rope, "cos_sin", None)
        if self._rope_and_store is None or cos_sin is None:
            return super().forward_rotated(rope, positions, q, k, v, kv_cache, window, out)
        t = self._table
        if self._decode_new_kv:
            return self._triton_decode(q, kv_cache, t.indptr, t.indices, t.seq_lens, self.scale,
                                       out=out, soft_cap=self.spec.logits_soft_cap, window=window,
                                       splits=self._decode_splits,
                                       workspace=self._split_workspace,
                                       new_kv=self._new_kv(k, v, positions, cos_sin))
        self._rope_and_store(q, k, v, positions, cos_sin, kv_cache, t.batch_indices, t.positions,
                             t.indptr, t.indices)
        return self._attend(q, kv_cache, window, out)

    def _attend(self, q: torch.Tensor, kv_cache: torch.Tensor, window: Optional[int],
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attention of the step's queries over the cache, which holds their K and V already."""
        t = self._table
        if self._decode_rows:  # request i < d is row i: the decodes' rows come first
            d = self._decode_rows
            out = q.new_empty(q.shape) if out is None else out
            self._triton_decode(q[:d], kv_cache, t.indptr[:d + 1], t.indices, t.seq_lens[:d],
                                self.scale, out=out[:d], soft_cap=self.spec.logits_soft_cap,
                                window=window, splits=self._decode_splits,
                                workspace=self._split_workspace)
            if d < q.shape[0]:  # a mixed step: the prefill kernel runs the requests after them
                self._wrappers[window].run(q[d:], kv_cache, out=out[d:])
            return out
        if self._xqa_args is not None:
            page_table, seq_lens, max_len = self._xqa_args
            return self._xqa(q.contiguous(), kv_cache, self.xqa_workspace, page_table, seq_lens,
                             max_len, bmm1_scale=self.scale, window_left=_window_left(window),
                             out=out)
        # The prefill kernels read q through its strides (a view of the qkv projection's
        # output): no copy of it per layer. Decode wrappers get a contiguous q.
        return self._wrappers[window].run(q if self._wrappers is self.prefill else q.contiguous(),
                                          kv_cache, out=out)


def _window_left(window: Optional[int]) -> int:
    """flashinfer's window_left (keys visible before the query's own; -1: all) for a window of
    W keys ending at the query's position."""
    return -1 if window is None else window - 1
