"""What crosses from the frontend to the engine core: token ids and numbers, never text; and
what the core does with frames that are not a well-formed message."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
import threading

import msgpack
import numpy as np
import zmq

from zllm import LLM, EngineConfig, SamplingParams
from zllm.codec import decode, encode
from zllm.frontend.async_llm import AsyncLLM
from zllm.frontend.core_client import AsyncMPClient, CoreHandle, read_line, start_engine_core
from zllm.frontend.llm_engine import LLMEngine
from zllm.protocol import (CORE_INPUTS, CORE_OUTPUTS, EngineCoreAbort, EngineCoreCall,
                           EngineCoreOutputs, EngineCoreRequest, EngineCoreRequests)

PROMPT_MARK, STOP_MARK = "Zebrafish", "Quokka"


@contextlib.contextmanager
def _spied_core(config, tmp_path):
    """An engine core behind a ZeroMQ proxy that copies every frame: yields the handle that
    frontends connect to and a function returning the frames copied so far."""
    core = start_engine_core(config)
    context = zmq.Context()
    front, back = context.socket(zmq.DEALER), context.socket(zmq.DEALER)
    front.bind(f"ipc://{tmp_path}/spy")
    back.connect(core.address)
    capture, control = context.socket(zmq.PUSH), context.socket(zmq.PAIR)
    capture.bind("inproc://capture")
    control.bind("inproc://control")
    captured = context.socket(zmq.PULL)
    captured.connect("inproc://capture")
    steer = context.socket(zmq.PAIR)
    steer.connect("inproc://control")
    proxy = threading.Thread(target=zmq.proxy_steerable, args=(front, back, capture, control))
    proxy.start()

    def frames() -> list[bytes]:
        out = []
        while captured.poll(100):
            out.append(captured.recv())
        return out

    try:
        yield CoreHandle(f"ipc://{tmp_path}/spy", core.status_fd, None, core.ready), frames
    finally:
        steer.send(b"TERMINATE")
        proxy.join(10)
        for s in (front, back, capture, control, captured, steer):
            s.close()
        context.term()
        core.stop()


def _batches(frames: list[bytes]) -> list[list[str]]:
    """The request ids of each EngineCoreRequests message among the frames."""
    messages = [decode(f, *CORE_INPUTS, *CORE_OUTPUTS) for f in frames]
    return [sorted(r.request_id for r in m.requests) for m in messages
            if isinstance(m, EngineCoreRequests)]


def test_the_engine_core_receives_only_token_ids(gqa_model, tmp_path):
    config = EngineConfig.from_dict({}, model=gqa_model, device="cpu", num_kv_blocks=128)
    with _spied_core(config, tmp_path) as (handle, copied):
        engine = LLMEngine(config, core=handle)
        try:
            prompt = f"Hello {PROMPT_MARK}, how are you?"
            engine.add_request("a", prompt, SamplingParams(max_tokens=8, stop=[STOP_MARK], n=2,
                                                           seed=1))
            engine.add_request("b", [5, 6, 7], SamplingParams(max_tokens=4, temperature=0))
            greedy = SamplingParams(max_tokens=2, temperature=0)
            engine.add_checked_requests([(rid, None, [5, 6, 7], greedy, 0) for rid in ("c", "d")])
            outputs = []
            while engine.has_unfinished_requests():
                outputs += engine.step()
            assert sorted(o.request_id for o in outputs) == ["a", "b", "c", "d"]
            frames = copied()
        finally:
            engine.client.socket.close()
    requests = []
    for frame in frames:
        assert PROMPT_MARK.encode() not in frame and STOP_MARK.encode() not in frame
        message = decode(frame, *CORE_INPUTS, *CORE_OUTPUTS)  # every frame is a typed message
        if isinstance(message, EngineCoreRequest):
            requests.append(message)
        elif isinstance(message, EngineCoreRequests):
            requests += message.requests
    # "a"'s two samples travel together, and so do "c" and "d", queued together.
    assert sorted(_batches(frames)) == [["a#0", "a#1"], ["c", "d"]]
    requests = [r for r in requests if r.request_id not in ("c", "d")]
    assert sorted(r.request_id for r in requests) == ["a#0", "a#1", "b"]
    tokenizer = engine.tokenizer
    for r in requests:
        assert r.prompt_token_ids.dtype == np.int32 and r.sampling_params.stop == []
        if r.request_id != "b":
            assert r.prompt_token_ids.tolist() == tokenizer.encode(prompt)
    assert [r.sampling_params.seed for r in requests if r.request_id != "b"] == [1, 2]


def test_the_servers_n_samples_reach_the_core_in_one_message(gqa_model, tmp_path):
    """AsyncLLM (the server's frontend) sends a request's n samples as one message, as LLM
    does, so the core admits them before the same step; a single sample goes alone."""
    config = EngineConfig.from_dict({}, model=gqa_model, device="cpu", num_kv_blocks=128)
    with _spied_core(config, tmp_path) as (handle, copied):
        llm = AsyncLLM(config, core=handle)

        async def run():
            llm.start()
            params = SamplingParams(max_tokens=3, n=3, seed=5)
            outs = [o async for o in llm.generate("x", [5, 6, 7], params)]
            outs += [o async for o in llm.generate("y", [5, 6], SamplingParams(max_tokens=2))]
            return outs

        try:
            outputs = asyncio.run(run())
        finally:
            llm.shutdown()
        frames = copied()
    assert [len(o.outputs) for o in outputs if o.finished] == [3, 1]
    assert _batches(frames) == [["x#0", "x#1", "x#2"]]
    singles = [m.request_id for m in (decode(f, *CORE_INPUTS, *CORE_OUTPUTS) for f in frames)
               if isinstance(m, EngineCoreRequest)]
    assert singles == ["y"]


def test_an_offline_batch_fills_every_prompt_step_from_the_first(gqa_model, hf):
    """LLM.generate hands the engine core process its whole batch in one message, so the core
    admits every prompt before its first step: the steps spend the whole token budget until
    the prompts run out, and none after a short step does (sent one by one, the first step
    held only the prompts that had arrived, and the batch took a step more). Greedy tokens stay
    Hugging Face's."""
    prompts = [[(7 * i + j) % 50 + 3 for j in range(8 + i % 5)] for i in range(12)]
    budget = 24
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    with LLM(gqa_model, device="cpu", max_num_batched_tokens=budget, max_num_seqs=16,
             record_steps=True) as llm:
        llm.engine.call("step_log")  # start afresh
        outputs = llm.generate(prompts, params, use_tqdm=False)
        steps = llm.engine.call("step_log")
    for prompt, out in zip(prompts, outputs):
        assert out.outputs[0].token_ids == hf.greedy(gqa_model, prompt, 4)
    tokens = [sum(new) for _, _, _, new, _ in steps]  # per step, in order
    assert tokens[0] == budget and steps[0][2] == [0] * len(steps[0][2])  # prompts only
    first_short = next(i for i, n in enumerate(tokens) if n < budget)
    assert sum(tokens[:first_short]) >= sum(len(p) for p in prompts) - budget
    assert all(n < budget for n in tokens[first_short:]), tokens


def test_a_batch_that_fails_midway_leaves_nothing_waiting(gqa_model):
    """If queuing a batch raises partway (here a malformed third prompt), the requests already
    registered are forgotten, none is left waiting for outputs that never come, and the next
    generate() runs."""
    params = SamplingParams(temperature=0, max_tokens=2)
    with LLM(gqa_model, device="cpu") as llm:
        batch = [("x", None, [5, 6, 7], params, 0), ("y", None, [8, 9], params, 0),
                 ("z", None, [[1, 2], [3]], params, 0)]
        try:
            llm.engine.add_checked_requests(batch)
        except (ValueError, TypeError):
            pass
        else:
            raise AssertionError("a ragged prompt was queued")
        assert not llm.engine.has_unfinished_requests()
        out = llm.generate([[5, 6, 7]], params, use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 2


def test_hostile_frames_on_the_core_socket_are_dropped_and_the_core_serves_on(gqa_model):
    params = SamplingParams(max_tokens=8, temperature=0)
    with LLM(gqa_model, device="cpu", num_kv_blocks=128) as llm:
        baseline = [o.outputs[0].token_ids for o in llm.generate(["Hello", "Once"], params,
                                                                 use_tqdm=False)]
        address = llm.engine.client.handle.address
        path = address[len("ipc://"):]
        # The socket's directory is the access control: no other user can reach the core.
        directory = os.stat(os.path.dirname(path))
        assert stat.S_IMODE(directory.st_mode) == 0o700 and directory.st_uid == os.getuid()
        context = zmq.Context()
        hostile = context.socket(zmq.DEALER)
        hostile.setsockopt(zmq.LINGER, 0)
        hostile.connect(address)
        malformed = [[b"\xc1 not msgpack"],
                     [msgpack.packb(["EngineCoreRequest", "id", 1])],  # the wrong schema
                     [msgpack.packb(["EngineCoreOutputs"])],           # an output sent inwards
                     [b"one", b"frame", b"too many"]]
        try:
            hostile.send(encode(EngineCoreCall(6, "rejected_frames")))
            before = decode(hostile.recv(), *CORE_OUTPUTS).result
            for frames in malformed:
                hostile.send_multipart(frames)
            hostile.send(encode(EngineCoreAbort(["no-such-request"])))
            hostile.send(encode(EngineCoreCall(7, "no_such_call")))
            reply = decode(hostile.recv(), *CORE_OUTPUTS)
            assert reply.call_id == 7 and "unknown engine core call" in reply.error
            hostile.send(encode(EngineCoreCall(8, "rejected_frames")))
            assert decode(hostile.recv(), *CORE_OUTPUTS).result == before + len(malformed)
        finally:
            context.destroy(linger=0)
        with socket.socket(socket.AF_UNIX) as raw:  # no ZeroMQ greeting at all
            raw.connect(path)
            raw.sendall(b"GET / HTTP/1.1\r\n\r\n" + bytes(range(256)))
        again = [o.outputs[0].token_ids for o in llm.generate(["Hello", "Once"], params,
                                                              use_tqdm=False)]
        assert again == baseline


def test_the_frontend_drops_bad_frames_and_fails_requests_if_handling_raises(tmp_path):
    """The test plays the engine core's ROUTER: a frame that does not decode is dropped and the
    next outputs still arrive; if handling outputs raises, the frontend declares the core lost
    (its requests then fail) rather than leaving them waiting forever."""
    address = f"ipc://{tmp_path}/core.sock"
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.bind(address)
    status_read, status_write = os.pipe()

    def outputs(req_id: str) -> bytes:
        return encode(EngineCoreOutputs([req_id], np.array([7], np.int32), np.zeros(1, np.int32)))

    async def run() -> tuple[list[list[str]], list[str]]:
        client = AsyncMPClient(address, status_read, {})
        seen: list[list[str]] = []
        dead: list[str] = []

        def on_outputs(out: EngineCoreOutputs) -> None:
            seen.append(out.request_ids)
            if out.request_ids == ["boom"]:
                raise KeyError("boom")

        client.start(on_outputs, dead.append)
        loop = asyncio.get_running_loop()
        frontend, _hello = await loop.run_in_executor(None, router.recv_multipart)
        for frame in (b"\xc1 not msgpack", msgpack.packb([1, 2, 3]), outputs("a"), outputs("boom")):
            router.send_multipart([frontend, frame])
        for _ in range(500):  # until the frontend has handled both good frames (5 s at most)
            if dead:
                break
            await asyncio.sleep(0.01)
        client.close()
        return seen, dead

    try:
        seen, dead = asyncio.run(run())
    finally:
        router.close()
        context.term()
        os.close(status_read)
        os.close(status_write)
    assert seen == [["a"], ["boom"]]
    assert len(dead) == 1 and "KeyError" in dead[0]


def test_read_line_leaves_the_next_line_in_the_pipe():
    # An API server reads its settings and, seconds later, the core's ready message from one
    # stdin; reading the first must not swallow the second when both are already there.
    r, w = os.pipe()
    os.write(w, b'{"first": 1}\n{"second": 2}\n')
    os.close(w)
    assert read_line(r) == b'{"first": 1}\n'
    assert read_line(r) == b'{"second": 2}\n'
    assert read_line(r) == b""
    os.close(r)
