"""The persistent input batch against the straightforward computation: a random schedule (new,
resumed, finished and preempted requests, new blocks, reordering, chunked prefills, decodes,
CUDA-graph padding, steps in flight) is replayed on an InputBatch and on plain Python lists,
and every step's arrays must agree."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import pytest

from zllm.protocol import ContinuingRequestData, NewRequestData, SchedulerOutput
from zllm.sampling_params import SamplingParams
from zllm.worker.cuda_graphs import graph_batch_sizes, graph_size_for
from zllm.worker.input_batch import InputBatch

BLOCK_SIZE = 4
MAX_LEN = 64
SCRATCH = 999


@dataclass
class Req:
    """A request as plain lists: what the worker should know about it."""
    req_id: str
    prompt: list[int]
    outputs: list[int] = field(default_factory=list)  # on the host
    pending: list[int] = field(default_factory=list)  # sampled by steps not read back yet
    computed: int = 0
    blocks: list[int] = field(default_factory=list)
    params: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0))

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.outputs + self.pending


class Simulation:
    """Drives an InputBatch with random steps and checks each against the lists."""

    def __init__(self, seed: int, max_reqs: int = 6) -> None:
        self.rng = random.Random(seed)
        self.max_reqs = max_reqs
        self.batch = InputBatch(max_reqs, MAX_LEN, BLOCK_SIZE, 512, SCRATCH)
        self.held: list[Req] = []  # in the order the worker last saw them
        self.waiting: list[Req] = []  # preempted, to come back in full
        self.in_flight: list[tuple[list[Req], np.ndarray, np.ndarray]] = []  # (reqs, slots, tokens)
        self.next_block = 0
        self.next_id = 0

    def new_request(self) -> Req:
        self.next_id += 1
        params = SamplingParams(temperature=0, presence_penalty=0.5) if self.rng.random() < 0.15 \
            else SamplingParams(temperature=0)
        prompt = [self.rng.randrange(2, 500) for _ in range(self.rng.randrange(1, 12))]
        return Req(f"r{self.next_id}", prompt, params=params)

    def step(self) -> None:
        rng = self.rng
        finished, preempted = self._remove()
        new = self._admit()
        cached = [r for r in self.held if r not in new]
        if rng.random() < 0.3:
            rng.shuffle(cached)  # a priority policy reorders running requests
        scheduled, counts = [], []  # batch order: cached requests, then new ones (all of them)
        for req in cached + new:
            remaining = len(req.tokens) - req.computed
            if remaining and (req in new or rng.random() < 0.9):
                scheduled.append(req)
                counts.append(rng.randrange(1, remaining + 1) if rng.random() < 0.5 else remaining)
        continuing_ids = [r.req_id for r in scheduled if r not in new]
        owners, blocks = self._allocate(scheduled, counts, new)
        sched = SchedulerOutput([new_data(r) for r in new],
                                ContinuingRequestData(continuing_ids, owners, blocks),
                                np.asarray(counts, np.int32), sum(counts), finished, preempted)
        self.held = scheduled + [r for r in self.held if r not in scheduled]
        slots = self.batch.update(sched)
        assert len(slots) == len(scheduled)
        if scheduled:
            self._check_step(scheduled, slots, np.asarray(counts, np.int64))
        else:  # the runner launches an empty step: nothing continues from it
            self.batch.forget_previous()
            self.in_flight.append(([], np.zeros(0, np.int64), np.zeros(0, np.int64)))
            self._read_back_oldest()

    def _remove(self) -> tuple[list[str], list[str]]:
        finished, preempted = [], []
        for req in list(self.held):
            roll = self.rng.random()
            if roll < 0.1:
                finished.append(req.req_id)  # possibly with a token in flight
                self.held.remove(req)
            elif roll < 0.15:
                preempted.append(req.req_id)
                self.held.remove(req)
                req.computed, req.blocks = 0, []
                self.waiting.append(req)
        return finished, preempted

    def _admit(self) -> list[Req]:
        new = []
        while len(self.held) + len(new) < self.max_reqs and self.rng.random() < 0.5:
            ready = [r for r in self.waiting if not r.pending]  # the scheduler waits for those
            if ready and self.rng.random() < 0.5:
                req = ready[0]
                self.waiting.remove(req)
                req.computed = self.rng.randrange(0, len(req.tokens)) // BLOCK_SIZE * BLOCK_SIZE
            else:
                req = self.new_request()
            req.blocks = [self._block() for _ in range(-(-req.computed // BLOCK_SIZE))]
            new.append(req)
        self.held += new
        return new

    def _block(self) -> int:
        self.next_block += 1
        return self.next_block

    def _allocate(self, scheduled: list[Req], counts: list[int], new: list[Req]):
        owners, blocks = [], []
        cached = [r for r in scheduled if r not in new]
        for req, n in zip(scheduled, counts):
            needed = -(-(req.computed + n) // BLOCK_SIZE) - len(req.blocks)
            fresh = [self._block() for _ in range(max(0, needed))]
            req.blocks += fresh
            if req not in new:
                owners += [cached.index(req)] * len(fresh)
                blocks += fresh
        return np.asarray(owners, np.int32), np.asarray(blocks, np.int32)

    def _check_step(self, order: list[Req], slots: np.ndarray, counts: np.ndarray) -> None:
        batch = self.batch
        last_reqs = self.in_flight[-1][0] if self.in_flight else []
        # An input token still in flight that is not a decode continuing from the last step,
        # or a penalty's history with a token in flight.
        needs = any(r.computed + n > len(r.prompt) + len(r.outputs)
                    and (n > 1 or r not in last_reqs) for r, n in zip(order, counts))
        needs |= any(r.params.presence_penalty and r.pending for r in order)
        assert batch.needs_sampled_tokens(slots, counts, int(counts.sum())) == needs
        if needs:
            self._read_back_all()
        num_tokens = int(counts.sum())
        # Decodes may replay a CUDA graph of their exact size (pad 0) or of a larger one.
        pad = self.rng.choice([None, 0, 3]) if num_tokens == len(order) else None
        step = batch.prepare(slots, counts, num_tokens, None if pad is None else len(order) + pad)
        expect = expected_step(order, counts, last_reqs)
        _assert_step(step, expect, len(order), pad)
        # Launch: the sampled requests get a token, in flight until read back.
        sampled = [order[i] for i in expect["sampled"]]
        tokens = np.asarray([self.rng.randrange(2, 500) for _ in sampled], np.int64)
        for req, n in zip(order, counts):
            req.computed += int(n)
        for req, token in zip(sampled, tokens.tolist()):
            req.pending.append(token)
        self.in_flight.append((sampled, step.sampled_slots, tokens))
        if len(self.in_flight) > 1 or self.rng.random() < 0.5:
            self._read_back_oldest()
        self._check_history()

    def _read_back_oldest(self) -> None:
        reqs, slots, tokens = self.in_flight.pop(0)
        self.batch.append_sampled(slots, tokens)
        for req, token in zip(reqs, tokens.tolist()):
            assert req.pending[0] == token
            req.outputs.append(req.pending.pop(0))

    def _read_back_all(self) -> None:
        while self.in_flight:
            self._read_back_oldest()

    def _check_history(self) -> None:
        batch = self.batch
        for req in self.held:
            slot = batch.slot_of[req.req_id]
            known = req.prompt + req.outputs
            assert batch.token_ids[slot, :len(known)].tolist() == known
            assert batch.num_tokens[slot] == len(known)
            assert batch.num_pending_tokens[slot] == len(req.pending)
            assert batch.num_computed_tokens[slot] == req.computed
            assert batch.block_table[slot, :len(req.blocks)].tolist() == req.blocks
        slots = [batch.slot_of[r.req_id] for r in self.held]
        assert len(set(slots)) == len(slots)
        assert not set(slots) & (set(batch.free_slots) | set(batch.draining))


def new_data(req: Req) -> NewRequestData:
    return NewRequestData(req.req_id, np.asarray(req.prompt, np.int32),
                          np.asarray(req.outputs, np.int32), req.params, np.zeros(0, np.int32),
                          np.asarray(req.blocks, np.int32), req.computed)


def expected_step(order: list[Req], counts: np.ndarray, last_reqs: list[Req]) -> dict:
    """The step's arrays, request by request and token by token."""
    ids, positions, slots, fill_rows, fill_from = [], [], [], [], []
    sampled, sample_rows, out_pos, pages, seq_lens = [], [], [], [], []
    for i, (req, n) in enumerate(zip(order, counts.tolist())):
        tokens = req.tokens
        for p in range(req.computed, req.computed + n):
            if p >= len(req.prompt) + len(req.outputs):  # still on the device
                fill_rows.append(len(ids))
                fill_from.append(last_reqs.index(req))
                ids.append(None)
            else:
                ids.append(tokens[p])
            positions.append(p)
            slots.append(req.blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE)
        seq = req.computed + n
        seq_lens.append(seq)
        pages += req.blocks[:-(-seq // BLOCK_SIZE)]
        if seq == len(tokens):
            sampled.append(i)
            sample_rows.append(len(ids) - 1)
            out_pos.append(len(tokens) - len(req.prompt))
    return dict(ids=ids, positions=positions, slots=slots, fill_rows=fill_rows,
                fill_from=fill_from, sampled=sampled, sample_rows=sample_rows, out_pos=out_pos,
                pages=pages, seq_lens=seq_lens)


def _assert_step(step, expect: dict, num_reqs: int, pad: int | None) -> None:
    """`pad`: padding rows of a CUDA-graph step (None: not a graph step)."""
    graph, pad = pad is not None, pad or 0
    num_tokens = len(expect["ids"])
    got_ids = step.input_ids[:num_tokens].tolist()
    assert [g if e is not None else None for g, e in zip(got_ids, expect["ids"])] == expect["ids"]
    assert step.positions[:num_tokens].tolist() == expect["positions"]
    assert step.attention.slot_mapping[:num_tokens].tolist() == expect["slots"]
    assert step.fill_rows.tolist() == expect["fill_rows"]
    assert step.fill_from.tolist() == expect["fill_from"]
    sampled = list(range(num_reqs)) if step.sampled is None else step.sampled.tolist()
    rows = list(range(num_reqs)) if step.sample_rows is None else step.sample_rows.tolist()
    assert (sampled, rows) == (expect["sampled"], expect["sample_rows"])
    assert step.output_positions.tolist() == expect["out_pos"]
    attn = step.attention
    assert attn.seq_lens[:num_reqs].tolist() == expect["seq_lens"]
    assert attn.query_start_loc[-1] == num_tokens + pad
    indptr = attn.page_indptr()
    pages = attn.page_indices(indptr).tolist()
    assert pages[:indptr[num_reqs]] == expect["pages"]
    assert attn.cuda_graph == graph
    if pad:  # padding rows: token 0 at position 0, one page, the scratch block
        assert len(step.input_ids) == num_tokens + pad
        assert step.input_ids[num_tokens:].tolist() == [0] * pad
        assert step.positions[num_tokens:].tolist() == [0] * pad
        assert attn.seq_lens[num_reqs:].tolist() == [1] * pad
        assert pages[indptr[num_reqs]:] == [SCRATCH] * pad
        assert attn.slot_mapping[num_tokens:].tolist() == [SCRATCH * BLOCK_SIZE] * pad


@pytest.mark.parametrize("seed", range(8))
def test_random_schedule_matches_plain_lists(seed):
    sim = Simulation(seed)
    for _ in range(120):
        sim.step()


def test_steady_decode_continues_from_the_previous_step_on_the_device():
    """Decodes whose token is in flight read it from the previous step's tensor, in order; a
    finished request with a token in flight keeps its slot until the token lands."""
    batch = InputBatch(4, MAX_LEN, BLOCK_SIZE, 512, SCRATCH)
    new = [new_data(Req(f"r{i}", [5 + i, 6, 7], blocks=[i])) for i in range(3)]
    slots = batch.update(SchedulerOutput(new, ContinuingRequestData(), np.full(3, 3, np.int32), 9, []))
    first = batch.prepare(slots, np.full(3, 3, np.int64), 9, 3)
    assert first.sample_rows.tolist() == [2, 5, 8]
    ids = ["r0", "r1", "r2"]
    step = SchedulerOutput([], ContinuingRequestData(ids), np.ones(3, np.int32), 3, [])
    slots = batch.update(step)
    assert not batch.needs_sampled_tokens(slots, step.num_scheduled_tokens, 3)
    second = batch.prepare(slots, np.ones(3, np.int64), 3, 3)
    assert second.fill_rows.tolist() == [0, 1, 2] and second.fill_from.tolist() == [0, 1, 2]
    assert second.sampled is None and second.positions.tolist() == [3, 3, 3]
    # r1 finishes while its second token is in flight: its slot is not reused yet.
    batch.append_sampled(first.sampled_slots, np.array([10, 11, 12]))
    r1_slot = batch.slot_of["r1"]
    third = SchedulerOutput([new_data(Req("r3", [1], blocks=[7]))],
                            ContinuingRequestData(["r0", "r2"], np.array([0, 1], np.int32),
                                              np.array([8, 9], np.int32)),
                            np.ones(3, np.int32), 3, ["r1"])
    slots = batch.update(third)
    assert r1_slot not in slots.tolist() and r1_slot in batch.draining
    assert batch.prepare(slots, np.ones(3, np.int64), 3, 3).fill_from.tolist() == [0, 2]
    batch.append_sampled(second.sampled_slots, np.array([20, 21, 22]))
    assert r1_slot in batch.free_slots
    assert batch.token_ids[batch.slot_of["r0"], :5].tolist() == [5, 6, 7, 10, 20]


def test_steady_decode_steps_read_every_input_from_the_device_until_tokens_land():
    """Step after step of the same decodes (the batch's own array): every input comes from row i
    of the step before, none from the host; once a step's tokens land, the next reads them."""
    batch = InputBatch(4, MAX_LEN, BLOCK_SIZE, 512, SCRATCH)
    new = [new_data(Req(f"r{i}", [5 + i, 6, 7], blocks=[i])) for i in range(3)]
    slots = batch.update(SchedulerOutput(new, ContinuingRequestData(), np.full(3, 3, np.int32), 9, []))
    steps = [batch.prepare(slots, np.full(3, 3, np.int64), 9)]
    decode = SchedulerOutput([], ContinuingRequestData(["r0", "r1", "r2"]), np.ones(3, np.int32), 3, [])
    for _ in range(3):  # positions 3, 4 and 5: nothing read back in between
        slots = batch.update(decode)
        assert not batch.needs_sampled_tokens(slots, decode.num_scheduled_tokens, 3)
        steps.append(batch.prepare(slots, np.ones(3, np.int64), 3))
        assert steps[-1].fill_rows.tolist() == [0, 1, 2] == steps[-1].fill_from.tolist()
    assert steps[-1].positions.tolist() == [5, 5, 5]
    for i, step in enumerate(steps):  # all land: r_j sampled 10 * i + j at step i
        batch.append_sampled(step.sampled_slots, np.array([10 * i, 10 * i + 1, 10 * i + 2]))
    slots = batch.update(decode)
    last = batch.prepare(slots, np.ones(3, np.int64), 3)
    assert len(last.fill_rows) == 0 and last.input_ids.tolist() == [30, 31, 32]
    assert last.positions.tolist() == [6, 6, 6]


def test_decode_steps_of_a_captured_size_replay_its_graph():
    """A decode step replays the smallest captured graph that holds it, an exact fit included
    (a step of exactly 8 or 256 requests must not run eagerly); longer queries run eagerly."""
    sizes = graph_batch_sizes(256)
    assert [graph_size_for(sizes, n, n) for n in (1, 3, 8, 9, 256)] == [1, 4, 8, 16, 256]
    assert graph_size_for(sizes, 257, 257) is None
    assert graph_size_for(sizes, 9, 8) is None
