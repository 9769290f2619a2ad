"""The msgpack encoding of what the engine and the workers say to each other."""

import msgpack
import pytest

from zllm.protocol import (CachedRequestData, Logprobs, ModelRunnerOutput, NewRequestData,
                           SchedulerOutput, WorkerError, decode_model_runner_output,
                           decode_scheduler_output, decode_worker_reply,
                           encode_model_runner_output, encode_scheduler_output,
                           encode_worker_error)
from zllm.sampling_params import SamplingParams


def a_scheduler_output() -> SchedulerOutput:
    new = NewRequestData("a", [0, 5, 70000], [9], SamplingParams(temperature=0.7, top_k=5, seed=3),
                         [1], [4, 2], 0)
    cached = CachedRequestData(["b", "c"], [[], [11]])
    return SchedulerOutput([new], cached, {"b": 1, "c": 1, "a": 4}, 6, ["d"],
                           blocks_to_swap_out=[(3, 0), (7, 1)], blocks_to_swap_in=[])


def test_scheduler_output_round_trips():
    out = a_scheduler_output()
    back = decode_scheduler_output(encode_scheduler_output(out))
    assert back.cached_requests == out.cached_requests
    assert back.num_scheduled_tokens == out.num_scheduled_tokens
    assert list(back.num_scheduled_tokens) == ["b", "c", "a"]  # batch order survives
    assert (back.blocks_to_swap_out, back.blocks_to_swap_in) == ([(3, 0), (7, 1)], [])
    assert (back.total_num_scheduled_tokens, back.finished_req_ids) == (6, ["d"])
    new, orig = back.new_requests[0], out.new_requests[0]
    assert (new.req_id, new.prompt_token_ids, new.output_token_ids, new.stop_token_ids,
            new.block_ids, new.num_computed_tokens) == ("a", [0, 5, 70000], [9], [1], [4, 2], 0)
    assert (new.sampling_params.temperature, new.sampling_params.top_k,
            new.sampling_params.seed) == (orig.sampling_params.temperature, 5, 3)


def test_model_runner_output_and_error_round_trip():
    out = ModelRunnerOutput(["a", "b"], [7, 8], Logprobs([-0.1, -0.2], [[7], [8]], [[-0.1], [-0.2]]))
    assert decode_model_runner_output(encode_model_runner_output(out)) == out
    assert decode_worker_reply(encode_model_runner_output(out)) == out
    err = WorkerError(1, "KeyError: 'x'")
    assert decode_worker_reply(encode_worker_error(err)) == err


@pytest.mark.parametrize("data", [
    b"",
    b"\xc1",
    encode_scheduler_output(a_scheduler_output())[:-3],      # truncated
    msgpack.packb(["output", [], b"", None]),                # another kind
    msgpack.packb(["sched", [1], [[], []], [[], b""], 0, []]),  # a field of the wrong shape
    msgpack.packb({"sched": 1}),
])
def test_malformed_scheduler_output_raises_value_error(data):
    with pytest.raises(ValueError, match="malformed"):
        decode_scheduler_output(data)


def test_malformed_worker_reply_raises_value_error():
    for data in (b"\x92", msgpack.packb(["output", ["a"], b"", None]), msgpack.packb(["nope"])):
        with pytest.raises(ValueError):
            decode_worker_reply(data)


def test_scheduler_output_must_name_exactly_its_requests():
    out = a_scheduler_output()
    out.num_scheduled_tokens["stray"] = 1
    with pytest.raises(ValueError, match="must name exactly the cached and new requests"):
        encode_scheduler_output(out)
