"""The Ray executor on one node: TP=2 greedy parity, failure handling, data-plane hygiene."""

import contextlib
import os
import re
import signal
import socket
import time

import msgpack
import numpy as np
import pytest
import ray
import zmq

from tests.executor.conftest import PROMPTS, greedy_tokens, make_llm, stranger_socket
from zllm import EngineDeadError, SamplingParams
from zllm.config import EngineConfig
from zllm.executor.data_plane import WorkerEndpoint
from zllm.executor.ray_executor import _BLAME_WAIT_S, RayExecutor
from zllm.codec import encode
from zllm.protocol import ContinuingRequestData, ModelRunnerOutput, SchedulerOutput, WorkerError

API_KEY = "frontend-only-secret"


@pytest.fixture(scope="module")
def tp2_llm(ray_session, gqa_model):
    # The engine core in this process, to look at its executor; it joins this Ray session.
    # An API key in the config: it must not reach the workers.
    llm = make_llm(gqa_model, tensor_parallel_size=2, execute_timeout_s=30, engine_process=False,
                   api_key=API_KEY)
    yield llm
    llm.shutdown()


def zllm_actor_names() -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("zllm-worker-")]


def test_tp2_on_ray_matches_tp1_and_transformers_under_preemption(tp2_llm, gqa_model,
                                                                   reference_tokens):
    tp2 = greedy_tokens(tp2_llm)
    assert tp2_llm.stats().num_preemptions > 0, "the setting must force preemption"
    tp1_llm = make_llm(gqa_model, distributed_executor_backend="uni")
    try:
        tp1 = greedy_tokens(tp1_llm)
    finally:
        tp1_llm.shutdown()
    assert tp1 == reference_tokens
    assert tp2 == reference_tokens


def test_tp2_ranks_run_the_same_grammars_as_tp1(tp2_llm, gqa_model):
    # Each rank keeps its own matchers; they agree because every rank samples the same tokens.
    from zllm.structured_outputs import StructuredOutputs

    specs = [StructuredOutputs(regex=r"[a-z]{2,4}-[0-9]{2}"),
             StructuredOutputs(json={"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 4}),
             StructuredOutputs(choice=["red", "green", "blue"])] * 3
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=40, structured_outputs=spec)
              for i, spec in enumerate(specs)]
    prompts = (PROMPTS * 2)[:len(specs)]
    tp2 = [o.outputs[0].text for o in tp2_llm.generate(prompts, params, use_tqdm=False)]
    tp1_llm = make_llm(gqa_model, distributed_executor_backend="uni")
    try:
        tp1 = [o.outputs[0].text for o in tp1_llm.generate(prompts, params, use_tqdm=False)]
    finally:
        tp1_llm.shutdown()
    assert tp2 == tp1
    assert re.fullmatch(r"[a-z]{2,4}-[0-9]{2}", tp2[0]) and tp2[2] in ("red", "green", "blue")


def test_tp2_prompt_logprobs_equal_transformers(tp2_llm, gqa_model, hf):
    # Every rank gathers the vocabulary-parallel logits; rank 0's scores travel back.
    from tests.test_prompt_logprobs import check_prompt_logprobs

    params = SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=3)
    check_prompt_logprobs(tp2_llm.generate(PROMPTS, params, use_tqdm=False), hf, gqa_model, top=3)


def test_tp4_replicates_kv_heads_and_matches_transformers(ray_session, gqa_model, reference_tokens):
    # 2 KV heads over 4 ranks: each KV head is held by two ranks. With async scheduling two
    # steps ahead, the data plane carries steps N+1 and N+2 while the ranks still run step N
    # (one step ahead on Ray: tests/executor/test_worker_recovery.py).
    # The engine core in its own process (the default), joining the module's Ray session.
    llm = make_llm(gqa_model, tensor_parallel_size=4, execute_timeout_s=60, async_scheduling=True,
                   async_steps_ahead=2, ray_address=ray_session)
    try:
        assert greedy_tokens(llm) == reference_tokens
        assert llm.stats().num_preemptions > 0
    finally:
        llm.shutdown()


def test_malformed_messages_are_rejected_without_executing(tp2_llm, reference_tokens):
    executor = tp2_llm.engine.engine_core.executor
    before = ray.get([a.stats.remote() for a in executor.actors])
    valid = encode(SchedulerOutput.empty())
    bad = [valid[: len(valid) // 2],                      # truncated
           b"\xc1garbage",                                # not msgpack
           msgpack.packb(["SchedulerOutput", 1, 2, 3, 4, 5, 6, 7, 8]),  # right kind, wrong types
           encode(ModelRunnerOutput([], []))]              # a reply kind sent the wrong way
    for message in bad:
        executor.endpoint.publish(message)
    # Generation after the bad messages still gives the reference tokens: no rank executed them
    # or answered them (a stray reply would be taken as the next step's result).
    assert greedy_tokens(tp2_llm) == reference_tokens
    after = ray.get([a.stats.remote() for a in executor.actors])
    for b, a in zip(before, after):
        assert a["num_rejected_messages"] == b["num_rejected_messages"] + len(bad)


@pytest.mark.parametrize("tp", [1, 2])
def test_worker_exception_raises_engine_dead_naming_the_rank(ray_session, gqa_model, tp):
    config = EngineConfig.from_dict({}, model=gqa_model, load_format="safetensors",
                                    tensor_parallel_size=tp, device="cpu",
                                    num_kv_blocks=8, block_size=4, execute_timeout_s=300)
    others = set(zllm_actor_names())
    executor = RayExecutor(config)
    mine = set(zllm_actor_names()) - others
    assert len(mine) == tp
    try:
        executor.init_kv_cache(8)
        # A request the workers never saw: every rank fails looking it up.
        step = SchedulerOutput([], ContinuingRequestData(["unknown"]), [1], 1, [])
        t0 = time.monotonic()
        with pytest.raises(EngineDeadError, match=r"rank \d raised KeyError"):
            executor.execute_model(step)
        if tp == 1:  # no peer to blame: no wait for Ray to report one dead
            assert time.monotonic() - t0 < _BLAME_WAIT_S
        t0 = time.monotonic()
        with pytest.raises(EngineDeadError):
            executor.execute_model(SchedulerOutput.empty())
        with pytest.raises(EngineDeadError):
            executor.collective_rpc("get_pid")
        # A generous bound that still tells "at once" from waiting for execute_timeout_s.
        assert time.monotonic() - t0 < 60, "later calls must fail at once, not time out"
    finally:
        executor.shutdown()
        executor.shutdown()  # idempotent
    assert not mine & set(zllm_actor_names())


def test_killed_worker_with_no_restarts_makes_generate_raise_engine_dead(ray_session, gqa_model):
    others = set(zllm_actor_names())
    # execute_timeout_s bounds the test even if death went unnoticed; the death must be noticed
    # well before it (a generous bound, for loaded machines). With restarts allowed the engine
    # would rebuild the workers (tests/executor/test_worker_recovery.py).
    llm = make_llm(gqa_model, tensor_parallel_size=2, num_kv_blocks=256, execute_timeout_s=180,
                   engine_process=False, max_worker_restarts=0)
    pids = llm.engine.engine_core.executor.collective_rpc("get_pid")
    mine = set(zllm_actor_names()) - others
    assert len(mine) == 2
    killed_at = []
    engine_step = llm.engine.step

    def step_then_kill():
        if len(killed_at) == 0 and llm.engine.engine_core.scheduler.running:
            outputs = engine_step()
            os.kill(pids[1], signal.SIGKILL)  # mid-generation: requests are running
            killed_at.append(time.monotonic())
            return outputs
        return engine_step()

    llm.engine.step = step_then_kill
    try:
        with pytest.raises(EngineDeadError, match="rank 1"):
            llm.generate(PROMPTS, SamplingParams(max_tokens=64, ignore_eos=True), use_tqdm=False)
        assert time.monotonic() - killed_at[0] < 60
        with pytest.raises(EngineDeadError):  # at once, not after another timeout
            llm.generate(PROMPTS[:1], SamplingParams(max_tokens=4), use_tqdm=False)
        assert not llm.engine.has_unfinished_requests()
    finally:
        llm.shutdown()
    assert not mine & set(zllm_actor_names())


def _send_raw(address: str, data: bytes) -> None:
    host, port = address[len("tcp://"):].rsplit(":", 1)
    with socket.create_connection((host, int(port))) as raw:
        raw.sendall(data)


def test_hostile_frames_on_the_data_plane_change_no_output(tp2_llm, reference_tokens):
    executor = tp2_llm.engine.engine_core.executor
    endpoint, keys = executor.endpoint, executor.plane_keys
    assert keys.mechanism == "curve"
    before = executor.num_rejected_frames
    # A reply of the right schema that, if taken, would be the next step's result.
    forged = encode(ModelRunnerOutput(["0", "1"], np.asarray([5, 6], dtype=np.int32)))
    context = zmq.Context()
    try:
        for address in (endpoint.sched_address, endpoint.reply_address):
            _send_raw(address, b"GET / HTTP/1.1\r\nHost: zllm\r\n\r\n" + bytes(range(256)))
            _send_raw(address, b"\xff\x00\x00\x00\x00\x00\x00\x00\x01\x7f" + os.urandom(512))
        spies = [stranger_socket(context, zmq.SUB, endpoint.sched_address),
                 stranger_socket(context, zmq.SUB, endpoint.sched_address, keys.server_public)]
        for spy in spies:
            spy.setsockopt(zmq.SUBSCRIBE, b"")
        for server_key in (b"", keys.server_public):
            forger = stranger_socket(context, zmq.PUSH, endpoint.reply_address, server_key)
            with contextlib.suppress(zmq.Again):  # Again: refused before the frame could queue
                forger.send(forged, zmq.NOBLOCK)
        # Authenticated ranks sending what they may not: rank 1 posing as rank 0 (tokens, and an
        # error that would kill the engine), rank 0 sending bytes of the wrong schema.
        insiders = [(1, forged), (1, encode(WorkerError(0, "forged"))),
                    (0, msgpack.packb(["ModelRunnerOutput", "x"])), (0, b"\xc1 not msgpack")]
        for rank, message in insiders:
            insider = WorkerEndpoint(endpoint.sched_address, endpoint.reply_address,
                                     keys.ranks[rank])
            insider.send(message)
            insider.close()  # LINGER: the frame has left when close returns
        assert greedy_tokens(tp2_llm) == reference_tokens
        assert not any(spy.poll(100) for spy in spies), "a stranger read a scheduler output"
        # The insiders' frames, and at least one refused CURVE handshake, were counted.
        assert executor.num_rejected_frames >= before + len(insiders) + 1
        metrics = tp2_llm.engine.engine_core.metrics_snapshot()
        assert metrics["rejected_frames"] == executor.num_rejected_frames
    finally:
        context.destroy(linger=0)


def test_workers_get_no_api_key(tp2_llm):
    executor = tp2_llm.engine.engine_core.executor
    assert executor.config.server.api_key == API_KEY  # the driver had one to hold back
    keys = ray.get([a.__ray_call__.remote(lambda worker: worker.config.server.api_key)
                    for a in executor.actors])
    assert keys == [None, None]


def _listening_addresses(pid: int) -> set[tuple[str, int]]:
    """(IPv4 address, port) of every TCP socket process `pid` listens on (IPv6: '::' style hex)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).readlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                address, port = fields[1].split(":")
                if len(address) == 8:  # IPv4, little-endian hex
                    address = socket.inet_ntoa(bytes.fromhex(address)[::-1])
                found.add((address, int(port, 16)))
    return found


def test_rendezvous_store_and_data_plane_listen_on_loopback_only(tp2_llm):
    executor = tp2_llm.engine.engine_core.executor
    store_port = int(executor.distributed_init_method.rsplit(":", 1)[1])
    rank0_pid = executor.collective_rpc("get_pid")[0]
    store = [a for a in _listening_addresses(rank0_pid) if a[1] == store_port]
    assert store == [("127.0.0.1", store_port)]  # torch's own would listen on every interface
    for address in (executor.endpoint.sched_address, executor.endpoint.reply_address):
        assert address.startswith("tcp://127.0.0.1:")
