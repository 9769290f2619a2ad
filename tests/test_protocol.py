"""The msgpack encoding of what the processes say to each other (zllm.codec over zllm.protocol)."""

import msgpack
import numpy as np
import pytest

from zllm.codec import decode, encode
from zllm.protocol import (CORE_INPUTS, CORE_OUTPUTS, WORKER_REPLIES, ContinuingRequestData,
                           EngineCoreOutputs, EngineCoreRequest, EngineCoreRequests,
                           FinishedRequest, Logprobs, LogprobsRows, ModelRunnerOutput,
                           NewRequestData, PromptLogprobs, SchedulerOutput, WorkerError)
from zllm.sampling_params import SamplingParams


def ints(*values):
    return np.array(values, dtype=np.int32)


def a_scheduler_output() -> SchedulerOutput:
    new = NewRequestData("a", ints(0, 5, 70000), ints(9),
                         SamplingParams(temperature=0.7, top_k=5, seed=3), ints(1), ints(4, 2), 0)
    cached = ContinuingRequestData(["b", "c"], ints(1), ints(11))
    return SchedulerOutput([new], cached, ints(1, 1, 4), 6, ["d"], ["e"],
                           blocks_to_swap_out=ints(3, 0, 7, 1))


def test_scheduler_output_round_trips():
    out = a_scheduler_output()
    back = decode(encode(out), SchedulerOutput)
    assert back.continuing_requests.req_ids == ["b", "c"]
    assert back.num_scheduled_by_id() == {"b": 1, "c": 1, "a": 4}
    assert back.scheduled_req_ids == ["b", "c", "a"]  # batch order survives
    assert back.continuing_requests.new_block_owners.tolist() == [1]
    assert back.continuing_requests.new_block_ids.tolist() == [11]
    assert back.blocks_to_swap_out.tolist() == [3, 0, 7, 1] and back.blocks_to_swap_in.tolist() == []
    assert (back.total_num_scheduled_tokens, back.finished_req_ids, back.preempted_req_ids) == (
        6, ["d"], ["e"])
    new = back.new_requests[0]
    assert (new.req_id, new.prompt_token_ids.tolist(), new.output_token_ids.tolist(),
            new.stop_token_ids.tolist(), new.block_ids.tolist(), new.num_computed_tokens) == (
        "a", [0, 5, 70000], [9], [1], [4, 2], 0)
    assert new.sampling_params == out.new_requests[0].sampling_params


def test_model_runner_output_and_error_round_trip():
    out = ModelRunnerOutput(["a", "b"], ints(7, 8),
                            Logprobs([-0.1, -0.2], [[7], [8]], [[-0.1], [-0.2]]))
    back = decode(encode(out), *WORKER_REPLIES)
    assert back.req_ids == out.req_ids and back.sampled_token_ids.tolist() == [7, 8]
    assert back.logprobs == out.logprobs
    err = WorkerError(1, "KeyError: 'x'")
    assert decode(encode(err), *WORKER_REPLIES) == err


def test_engine_core_messages_round_trip():
    req = EngineCoreRequest("r", ints(1, 2, 3), SamplingParams(stop=["x"], max_tokens=5), ints(2),
                            12.5, 2)
    back = decode(encode(req), *CORE_INPUTS)
    assert (back.request_id, back.prompt_token_ids.tolist(), back.sampling_params,
            back.arrival_time, back.priority) == ("r", [1, 2, 3], req.sampling_params, 12.5, 2)
    outs = EngineCoreOutputs(["r", "s"], ints(4, 5), ints(0, 16), [FinishedRequest("s", "stop", 5)],
                             LogprobsRows(ints(1), np.array([-0.5], np.float32), ints(1), ints(5),
                                          np.array([-0.5], np.float32)))
    back = decode(encode(outs), *CORE_OUTPUTS)
    assert back.request_ids == ["r", "s"] and back.new_token_ids.tolist() == [4, 5]
    assert back.finished == outs.finished and back.logprobs.sampled.tolist() == [-0.5]


def test_a_batch_of_requests_round_trips():
    reqs = [EngineCoreRequest(f"r{i}", ints(*range(i + 1)), SamplingParams(max_tokens=i + 1),
                              ints(2), 1.0 + i) for i in range(3)]
    back = decode(encode(EngineCoreRequests(reqs)), *CORE_INPUTS)
    assert isinstance(back, EngineCoreRequests)
    assert [(r.request_id, r.prompt_token_ids.tolist(), r.sampling_params.max_tokens)
            for r in back.requests] == [("r0", [0], 1), ("r1", [0, 1], 2), ("r2", [0, 1, 2], 3)]


def floats(*values):
    return np.array(values, dtype=np.float32)


def test_outputs_split_by_frontend_keep_each_requests_logprobs():
    """Each API server gets its own requests' tokens, sampled logprobs and prompt logprobs."""
    rows = LogprobsRows(ints(0, 2), floats(-0.1, -0.3), ints(1, 2), ints(7, 8, 9),
                        floats(-1, -2, -3))
    prompt = PromptLogprobs(["a", "b", "c"], ints(1, 1, 3), ints(2, 1, 1), ints(1, 0, 2),
                            floats(-4, -5, -6, -7), ints(1, 2, 3, 4), ints(10, 11, 12, 13),
                            floats(-8, -9, -10, -11))
    outs = EngineCoreOutputs(["a", "b", "c"], ints(4, 5, 6), ints(0, 0, 0), [], rows, prompt)
    parts = outs.split_by({"a": "x", "b": "y", "c": "x"})
    x, y = parts["x"], parts["y"]
    assert x.request_ids == ["a", "c"] and y.request_ids == ["b"]
    assert x.logprobs.rows.tolist() == [0, 1] and x.logprobs.top_ids.tolist() == [7, 8, 9]
    assert y.logprobs is None
    assert x.prompt_logprobs.entries() == [
        ("a", 1, [(-4.0, 1, {10: -8.0}), (-5.0, 2, {11: -9.0})]),
        ("c", 3, [(-7.0, 4, {12: -10.0, 13: -11.0})])]
    assert y.prompt_logprobs.entries() == [("b", 1, [(-6.0, 3, {})])]
    back = decode(encode(x), *CORE_OUTPUTS)
    assert back.prompt_logprobs.entries() == x.prompt_logprobs.entries()


@pytest.mark.parametrize("data", [
    b"",
    b"\xc1",
    encode(a_scheduler_output())[:-3],                        # truncated
    encode(ModelRunnerOutput([], ints())),                     # another kind
    msgpack.packb(["SchedulerOutput", [1], [[], b"", b""], b"", 0, [], [], b"", b""]),  # bad types
    msgpack.packb(["SchedulerOutput", [], [["x"], msgpack.ExtType(1, b"\0\0\0\0"),  # owner, no block
                                           msgpack.ExtType(1, b"")],
                   msgpack.ExtType(1, b"\1\0\0\0"), 1, [], [], msgpack.ExtType(1, b""),
                   msgpack.ExtType(1, b"")]),
    msgpack.packb({"SchedulerOutput": 1}),
])
def test_malformed_scheduler_output_raises_value_error(data):
    with pytest.raises(ValueError, match="malformed"):
        decode(data, SchedulerOutput)


def test_malformed_worker_reply_raises_value_error():
    for data in (b"\x92", msgpack.packb(["ModelRunnerOutput", ["a"], msgpack.ExtType(1, b""), None]),
                 msgpack.packb(["nope"])):
        with pytest.raises(ValueError):
            decode(data, *WORKER_REPLIES)


def test_scheduler_output_must_count_exactly_its_requests():
    out = a_scheduler_output()
    with pytest.raises(ValueError, match="scheduled token counts for 3 requests"):
        SchedulerOutput(out.new_requests, out.continuing_requests, ints(1, 1), 6, [])


def test_bad_sampling_params_in_a_message_raise_value_error():
    raw = msgpack.unpackb(encode(EngineCoreRequest("r", ints(1), SamplingParams(), ints(), 0.0)))
    raw[3][1] = -1.0  # temperature
    with pytest.raises(ValueError, match="temperature"):
        decode(msgpack.packb(raw), *CORE_INPUTS)
