"""The packed page table that FlashInferBackend copies to the device each step, filled on CPU
(numpy only; the kernels that read it need a GPU): the ragged page list flashinfer's wrappers
read, and the padded [R, W] rows XQA reads, for a decode step, a graph step with padding rows,
and a mixed step."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from zllm.worker.attention.base import AttentionBatch
from zllm.worker.attention.flashinfer_backend import _TableLayout, fill_table

BS = 16


def _batch(seq_lens, query_lens, width=8, pad_rows=0):
    """Requests in scattered blocks of a shared [rows, width] table; `pad_rows` CUDA-graph
    padding rows name the last row, whose only block is the scratch block."""
    rng = np.random.default_rng(0)
    n = len(seq_lens)
    table = rng.permutation(200)[:(n + 1) * width].reshape(n + 1, width).astype(np.int32)
    table[n] = 0
    table[n, 0] = 199  # the scratch block
    seq_lens = list(seq_lens) + [1] * pad_rows
    query_lens = list(query_lens) + [1] * pad_rows
    rows = np.array(list(range(n)) + [n] * pad_rows, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(query_lens)]).astype(np.int32)
    slots = np.zeros(int(starts[-1]), dtype=np.int64)
    seq = np.array(seq_lens, dtype=np.int32)
    return AttentionBatch(starts, seq, (seq + BS - 1) // BS, table, rows, slots,
                          int(max(query_lens)), cuda_graph=pad_rows > 0)


def _fill(batch, width, layout=None):
    indptr = batch.page_indptr()
    layout = layout or _TableLayout(batch.num_reqs, batch.num_tokens, int(indptr[-1]), width)
    packed = np.full(layout.size, -1, dtype=np.int32)
    views = layout.views(packed, batch.num_reqs, batch.num_tokens, int(indptr[-1]))
    fill_table(views, batch, indptr, BS)
    return views, indptr


def _check_pages(batch, views, indptr):
    for i in range(batch.num_reqs):
        own = batch.block_table[batch.table_rows[i], :batch.num_blocks[i]]
        assert list(views.indices[indptr[i]:indptr[i + 1]]) == list(own)
        if len(views.page_table):
            rows = views.page_table.reshape(batch.num_reqs, -1)
            assert list(rows[i, :batch.num_blocks[i]]) == list(own)
    assert list(views.seq_lens) == list(batch.seq_lens)


def test_decode_step_padded_rows_hold_each_requests_pages():
    batch = _batch([5, 16, 17, 100], [1, 1, 1, 1])
    width = int(batch.num_blocks.max())
    views, indptr = _fill(batch, width)
    assert views.page_table.shape == (4 * width,)
    _check_pages(batch, views, indptr)
    assert list(views.positions) == [4, 15, 16, 99]
    assert list(views.last_page_len) == [5, 16, 1, 4]


def test_graph_step_rows_wider_than_the_padding_rows_table():
    """A graph region is as wide as the longest request may be; capture's padding batch has a
    table one block wide, and a real batch narrower rows than the region."""
    layout = _TableLayout(8, 8, 8 * 12, width=12)
    batch = _batch([30, 64, 3], [1, 1, 1], pad_rows=5)
    views, indptr = _fill(batch, 12, layout)
    _check_pages(batch, views, indptr)
    one_wide = AttentionBatch.from_lists([1] * 8, [1] * 8, np.full((8, 1), 7, np.int32),
                                         np.full(8, 7 * BS), BS, cuda_graph=True)
    views, indptr = _fill(one_wide, 12, layout)
    assert list(views.page_table.reshape(8, 12)[:, 0]) == [7] * 8


def test_graph_region_pads_only_the_batches_xqa_runs():
    layout = _TableLayout(16, 16, 16 * 12, width=12, width_reqs=8)
    small, large = _batch([30, 64, 3], [1, 1, 1], pad_rows=5), _batch([9] * 16, [1] * 16)
    assert len(_fill(small, 12, layout)[0].page_table) == 8 * 12
    views, indptr = _fill(large, 12, layout)
    assert len(views.page_table) == 0
    _check_pages(large, views, indptr)


def test_mixed_step_without_xqa_has_no_padded_table():
    batch = _batch([40, 17, 3], [40, 1, 2])
    views, indptr = _fill(batch, 0)
    assert len(views.page_table) == 0
    _check_pages(batch, views, indptr)
    assert list(views.batch_indices) == [0] * 40 + [1] + [2, 2]
    assert list(views.positions) == list(range(40)) + [16] + [1, 2]


def test_xqa_batch_config_is_checked():
    from zllm.config import EngineConfig

    assert EngineConfig.from_dict({}).device.xqa_decode_max_batch == 0  # off unless asked
    assert EngineConfig.from_dict({}, xqa_decode_max_batch=8).device.xqa_decode_max_batch == 8
    with pytest.raises(ValueError, match="'xqa_decode_max_batch' = -1 .*>= 0"):
        EngineConfig.from_dict({}, xqa_decode_max_batch=-1)


def test_triton_decode_config_is_checked():
    from zllm.config import EngineConfig

    device = EngineConfig.from_dict({}).device
    assert device.triton_decode_min_programs == 512  # on for large decode steps by default
    assert EngineConfig.from_dict({}, triton_decode_min_programs=0).device \
        .triton_decode_min_programs == 0
    with pytest.raises(ValueError, match="'triton_decode_min_programs' = -1 .*>= 0"):
        EngineConfig.from_dict({}, triton_decode_min_programs=-1)


def test_decode_kernel_choice_counts_programs_and_lets_xqa_go_first():
    from zllm.worker.attention.flashinfer_backend import planless_kernel

    # The default (512): 64 requests of a rank with 8 KV heads, 512 with one (TP 8 of a Llama-8B).
    assert [planless_kernel(r, 8, 0, 512) for r in (1, 63, 64, 256)] == ["", "", "triton", "triton"]
    assert [planless_kernel(r, 1, 0, 512) for r in (256, 511, 512)] == ["", "", "triton"]
    assert planless_kernel(256, 8, 0, 0) == ""  # off
    assert [planless_kernel(r, 8, 64, 512) for r in (64, 72)] == ["xqa", "triton"]
    # Small steps, each sequence split: up to the split batch, and never with the kernel off.
    assert [planless_kernel(r, 8, 0, 512, 16) for r in (1, 16, 17, 63, 64)] == \
        ["triton", "triton", "", "", "triton"]
    assert planless_kernel(1, 8, 0, 0, 16) == ""
    assert [planless_kernel(r, 8, 4, 512, 16) for r in (4, 5)] == ["xqa", "triton"]


def test_small_decode_steps_split_each_sequence_to_reach_the_program_count():
    from zllm.worker.attention.flashinfer_backend import MAX_SPLITS, split_count

    assert [split_count(r, 8, 512) for r in (1, 2, 3, 16, 63, 64, 256)] == [64, 32, 22, 4, 2, 1, 1]
    assert split_count(1, 1, 512) == MAX_SPLITS  # capped
    assert split_count(3, 8, 512) * 3 * 8 >= 512
    with pytest.raises(ValueError, match="'triton_decode_split_max_batch' = -1 .*in \\[0, 1024\\]"):
        from zllm.config import EngineConfig

        EngineConfig.from_dict({}, triton_decode_split_max_batch=-1)


def test_a_mixed_steps_leading_decodes_go_to_the_triton_kernel_when_enough():
    from zllm.worker.attention.flashinfer_backend import leading_decodes

    lens = lambda *q: np.array(q, dtype=np.int32)  # noqa: E731
    # 64 decodes, then a prompt chunk and more: the 64 decodes x 8 KV heads reach 512.
    assert leading_decodes(lens(*[1] * 64, 200, 1, 3), 8, 512) == 64
    assert leading_decodes(lens(*[1] * 63, 200), 8, 512) == 0  # too few: all in the prefill kernel
    assert leading_decodes(lens(*[1] * 63, 200), 8, 8) == 63
    assert leading_decodes(lens(200, *[1] * 100), 8, 8) == 0  # only decodes that come first
    assert leading_decodes(lens(*[1] * 100, 7), 8, 0) == 0  # the kernel off


def test_the_prefill_part_of_a_mixed_step_reads_as_a_step_of_its_own():
    """With its leading decodes on the Triton kernel, the prefill kernel is planned from slices of
    the whole step's table: they must describe the remaining requests exactly as a table built
    for those requests alone would."""
    from zllm.worker.attention.flashinfer_backend import prefill_part

    seq_lens, query_lens = [101, 38, 514, 200, 23, 70], [1, 1, 1, 200, 3, 1]
    whole = _batch(seq_lens, query_lens)
    # int64 offsets, as the worker's InputBatch makes them: flashinfer reads int32 whatever it
    # is given (an int64 array once reached its plan as garbage offsets).
    whole = dataclasses.replace(whole, query_start_loc=whole.query_start_loc.astype(np.int64))
    views, indptr = _fill(whole, 0)
    decodes = 3
    qo_indptr, page_indptr, first_page = prefill_part(whole, indptr, decodes)
    assert qo_indptr.dtype == page_indptr.dtype == np.int32
    alone = AttentionBatch(np.concatenate([[0], np.cumsum(query_lens[decodes:])]).astype(np.int32),
                           whole.seq_lens[decodes:], whole.num_blocks[decodes:], whole.block_table,
                           whole.table_rows[decodes:], whole.slot_mapping[whole.query_start_loc[decodes]:],
                           whole.max_query_len)
    own, own_indptr = _fill(alone, 0)
    assert list(qo_indptr) == list(alone.query_start_loc)
    assert list(page_indptr) == list(own_indptr)
    assert list(views.indices[first_page:]) == list(own.indices)
    assert list(views.last_page_len[decodes:]) == list(own.last_page_len)
    assert list(views.seq_lens[decodes:]) == list(own.seq_lens)
