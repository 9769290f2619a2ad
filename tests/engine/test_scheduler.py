"""Scheduler and block manager bookkeeping, without a model."""

from __future__ import annotations

from zllm.config import SchedulerConfig
from zllm.engine.block_manager import BlockManager
from zllm.engine.request import Request, RequestStatus
from zllm.engine.scheduler import Scheduler
from zllm.sampling_params import SamplingParams


def _request(i: int, prompt_len: int) -> Request:
    return Request(f"r{i}", list(range(1, prompt_len + 1)), SamplingParams(max_tokens=100), [], 0.0)


def _decode(reqs, sched_out):
    """Pretend a step ran: requests that reached their end get their pending token."""
    for req in reqs:
        if req.req_id in sched_out.scheduled_req_ids and req.num_pending_tokens:
            req.append_output_token(7, max_model_len=10**6)


def test_block_manager_allocates_frees_and_keeps_a_watermark():
    bm = BlockManager(num_blocks=10, block_size=4, watermark=0.2)
    req = _request(0, 9)
    assert bm.num_blocks_needed(req, 9) == 3
    assert bm.can_admit(req, [], 9)
    assert bm.allocate_slots(req, 9) == [0, 1, 2]
    req.num_computed_tokens = 9
    assert bm.allocate_slots(req, 3) == []  # fits in block 2
    assert bm.allocate_slots(req, 4) == [3]
    big = _request(1, 20)
    assert not bm.can_admit(big, [], 20)  # 5 blocks would leave 1 < watermark 2
    assert bm.allocate_slots(big, 40) is None
    bm.free(req)
    assert bm.num_free_blocks == 10 and all(c == 0 for c in bm.ref_counts)


def test_budget_splits_prompts_and_decodes_share_steps():
    bm = BlockManager(num_blocks=100, block_size=4, watermark=0.0)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=10), bm)
    reqs = [_request(0, 6), _request(1, 12)]
    for r in reqs:
        sched.add_request(r)
    out = sched.schedule()
    assert out.num_scheduled_by_id() == {"r0": 6, "r1": 4}  # r1's prompt is chunked
    _decode(reqs, out)
    out = sched.schedule()
    assert out.num_scheduled_by_id() == {"r0": 1, "r1": 8}  # r0 decodes beside r1's next chunk
    assert [r.req_id for r in out.new_requests] == [] and out.continuing_requests.req_ids == ["r0", "r1"]
    assert out.total_num_scheduled_tokens == 9


def test_preemption_takes_the_newest_and_requeues_it_first():
    bm = BlockManager(num_blocks=4, block_size=4, watermark=0.0)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=100), bm)
    reqs = [_request(0, 8), _request(1, 8)]
    for r in reqs:
        sched.add_request(r)
    out = sched.schedule()
    assert bm.num_free_blocks == 0
    _decode(reqs, out)
    out = sched.schedule()  # r0 needs a third block: r1 (newest) is preempted
    assert out.scheduled_req_ids == ["r0"]
    assert out.preempted_req_ids == ["r1"]  # workers drop its state in the same step
    assert sched.waiting[0] is reqs[1] and sched.num_preemptions == 1
    assert reqs[1].status == RequestStatus.WAITING and reqs[1].num_computed_tokens == 0
    sched.finish_requests([reqs[0]], RequestStatus.FINISHED_STOPPED)
    assert bm.num_free_blocks == 4
    out3 = sched.schedule()
    assert [r.req_id for r in out3.new_requests] == ["r1"]
    assert out3.new_requests[0].output_token_ids.tolist() == [7]  # resumes with its generated token


def test_recompute_all_requeues_running_and_swapped_by_arrival_on_a_new_block_manager():
    # What the engine core does after the worker group is rebuilt: nothing is in any KV cache.
    bm = BlockManager(num_blocks=4, block_size=4, watermark=0.0, num_cpu_blocks=8)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=100), bm, "swap")
    reqs = [Request(f"r{i}", list(range(1, 9)), SamplingParams(max_tokens=100), [], float(i))
            for i in range(3)]
    for r in reqs:
        sched.add_request(r)
    out = sched.schedule()  # r0 and r1 fill the 4 blocks; r2 waits
    _decode(reqs, out)
    sched.schedule()  # r0 and r1 need a block each: r1 is swapped out, r0's token is pending
    assert [r.status for r in reqs] == [RequestStatus.RUNNING, RequestStatus.SWAPPED,
                                        RequestStatus.WAITING]
    assert reqs[0].num_pending_tokens == 1

    fresh = BlockManager(num_blocks=16, block_size=4, watermark=0.0, num_cpu_blocks=8)
    assert sched.recompute_all(fresh) == 2
    assert [r.req_id for r in sched.waiting] == ["r0", "r1", "r2"]  # arrival order kept
    assert not sched.running and not sched.swapped and sched.block_manager is fresh
    assert all(r.num_computed_tokens == r.num_pending_tokens == 0 for r in reqs)
    assert [r.num_preemptions for r in reqs] == [1, 2, 0]

    out = sched.schedule()  # everything starts again in full: prompt and generated tokens
    assert [r.req_id for r in out.new_requests] == ["r0", "r1", "r2"]
    assert [r.output_token_ids.tolist() for r in out.new_requests] == [[7], [7], []]
    assert out.num_scheduled_by_id() == {"r0": 9, "r1": 9, "r2": 8}
    assert not out.preempted_req_ids and not len(out.blocks_to_swap_in)
    assert fresh.num_free_blocks == 16 - (3 + 3 + 2)


def _sample(name: str, index: int, arrival: float, max_tokens: int = 4) -> Request:
    return Request(f"{name}#{index}", [1, 2, 3], SamplingParams(max_tokens=max_tokens), [],
                   arrival, sample_index=index)


def _run_until_done(sched: Scheduler, reqs: list[Request], arrivals: dict[int, list[Request]],
                    max_steps: int = 200) -> list[str]:
    """Step the scheduler (adding `arrivals[step]` before each step) until every request has
    finished; the request ids in the order they finished."""
    finished = []
    for step in range(max_steps):
        for req in arrivals.get(step, []):
            reqs.append(req)
            sched.add_request(req)
        if not sched.has_unfinished():
            break
        out = sched.schedule()
        done = []
        for req in reqs:
            if req.req_id in out.scheduled_req_ids and req.num_pending_tokens:
                if req.append_output_token(7, max_model_len=10**6) is not None:
                    done.append(req)
        sched.finish_requests(done, RequestStatus.FINISHED_LENGTH)
        finished += [r.req_id for r in done]
    return finished


def test_a_large_n_request_takes_turns_with_later_requests():
    """Four seats, a request of 16 samples, then a one-sample request: the later one runs in
    the first step (FCFS by arrival alone would put it behind all 16 samples, 16 steps later),
    and a stream of later single requests does not starve the big one's samples either."""
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=100),
                      BlockManager(num_blocks=200, block_size=4, watermark=0.0))
    big = [_sample("big", i, 0.0) for i in range(16)]
    arrivals = {0: [*big, _sample("small", 0, 1.0, max_tokens=1)]}
    # Then one more single request per step, for as long as the big one runs.
    arrivals.update({step: [_sample(f"late{step}", 0, 1.0 + step)] for step in range(1, 40)})
    order = _run_until_done(sched, [], arrivals)
    assert order.index("small#0") == 0  # done after its first step, before any of big's
    big_done = [order.index(f"big#{i}") for i in range(16)]
    assert big_done == sorted(big_done)  # the samples in their own order
    # big finishes while late requests still arrive, not after all of them.
    assert max(big_done) < order.index("late39#0")


def test_the_frontend_sends_sample_indexes_and_a_small_request_overtakes_large_n(gqa_model):
    """Through LLMEngine's frontend (which numbers the samples) and the engine core: with 4
    seats, a one-token request added after a 16-sample request ends before any of the 16 samples
    does. The core runs in this process so that both requests are queued before its first step
    (a core process may start stepping before the second request reaches it)."""
    from zllm import LLM

    with LLM(gqa_model, device="cpu", max_num_seqs=4, num_kv_blocks=64,
             engine_process=False) as llm:
        engine = llm.engine
        engine.add_request("big", "Hello", SamplingParams(n=16, max_tokens=6, ignore_eos=True,
                                                          seed=1), stream=True)
        engine.add_request("small", "Hi", SamplingParams(max_tokens=1, ignore_eos=True))
        big_finished_before_small, small_done = 0, False
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id == "small":
                    small_done = True
                elif not small_done:
                    big_finished_before_small += sum(o.finish_reason is not None
                                                     for o in out.outputs)
        assert small_done and big_finished_before_small == 0
