"""Request priority over HTTP: vLLM's `priority` field in completions and chat, sent by the openai
client and by zllm.Client / AsyncClient; refused under fcfs, obeyed under `policy: priority`."""

from __future__ import annotations

import asyncio
import threading

import openai
import pytest

import zllm
from tests.entrypoints.conftest import API_KEY, MODEL_NAME, start_server, wait_until
from zllm import SamplingParams

# Each prompt fills 20 blocks (block_size 16). The first request grows by 8 more (it runs long
# enough for the others to queue behind it), the others by 1: 28 blocks hold any one request to its
# end, but never a second prompt beside it, so the KV cache admits one request at a time.
PROMPT_LEN, FIRST_TOKENS, MAX_TOKENS, NUM_KV_BLOCKS = 320, 120, 8, 28


@pytest.fixture(scope="module")
def priority_server(gqa_model, tmp_path_factory):
    running = start_server(gqa_model, tmp_path_factory.mktemp("priority-server"), "",
                           "--policy", "priority", "--num-kv-blocks", str(NUM_KV_BLOCKS),
                           "--max-model-len", str(NUM_KV_BLOCKS * 16))
    try:
        yield running.server
    finally:
        running.stop()


def _prompt(i: int) -> list[int]:
    """A prompt whose first block differs from every other's: no prefix-cache sharing."""
    return [100 + i] + [7] * (PROMPT_LEN - 1)


def test_priority_request_over_http_overtakes_earlier_low_priority_ones(priority_server):
    client = openai.OpenAI(base_url=priority_server.url + "/v1", api_key=API_KEY, max_retries=0)
    finished, lock = [], threading.Lock()

    def send(name: str, i: int, priority: int) -> None:
        max_tokens = FIRST_TOKENS if i == 0 else MAX_TOKENS
        out = client.completions.create(model=MODEL_NAME, prompt=_prompt(i), max_tokens=max_tokens,
                                        temperature=0,
                                        extra_body={"ignore_eos": True, "priority": priority})
        assert out.usage.completion_tokens == max_tokens
        with lock:
            finished.append(name)

    def queue() -> tuple[float, float]:
        m = priority_server.metrics()
        return m["zllm_num_requests_running"], m["zllm_num_requests_waiting"]

    threads = []
    for i in range(3):  # low0 runs; low1 and low2 wait for its blocks
        threads.append(threading.Thread(target=send, args=(f"low{i}", i, 5)))
        threads[-1].start()
        wait_until(lambda: queue() == (1, i), 60, f"low{i} in the queue")
    threads.append(threading.Thread(target=send, args=("high", 3, 1)))
    threads[-1].start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    # fcfs order would be low0, low1, low2, high.
    assert finished == ["low0", "high", "low1", "low2"], finished


def test_priority_reaches_the_server_from_every_client_call(priority_server, server):
    """Under `policy: priority` each Client / AsyncClient call with a priority is served; the
    fcfs server refuses each one, naming the field: so every call really sends it."""
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    chat = [{"role": "user", "content": "Hi"}]
    for url, refused in ((priority_server.url, False), (server.url, True)):
        client = zllm.Client(url, api_key=API_KEY)
        calls = [lambda: client.generate("Hi", params, priority=2),
                 lambda: client.complete("Hi", params, priority=-3),
                 lambda: "".join(client.stream("Hi", params, priority=1)),
                 lambda: client.chat(chat, params, priority=4),
                 lambda: "".join(client.stream_chat(chat, params, priority=-1))]
        for call in calls:
            if refused:
                with pytest.raises(zllm.ServerError) as err:
                    call()
                assert err.value.status == 400 and err.value.param == "priority"
            else:
                assert call()

    async def async_calls(url: str) -> list:
        async with zllm.AsyncClient(url, api_key=API_KEY) as client:
            async def stream() -> str:
                return "".join([t async for t in client.stream("Hi", params, priority=3)])

            async def stream_chat() -> str:
                return "".join([t async for t in client.stream_chat(chat, params, priority=3)])

            return await asyncio.gather(client.generate("Hi", params, priority=3),
                                        client.chat(chat, params, priority=3), stream(),
                                        stream_chat(), return_exceptions=True)

    assert all(isinstance(r, str) and r for r in asyncio.run(async_calls(priority_server.url)))
    refused = asyncio.run(async_calls(server.url))
    assert all(isinstance(r, zllm.ServerError) and r.status == 400 and r.param == "priority"
               for r in refused), refused


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_priority_field_is_checked_and_refused_under_fcfs(server, path):
    """vLLM's behaviour: a priority other than 0 is a 400 when the policy is fcfs; 0 is fine."""
    body = {"model": MODEL_NAME, "max_tokens": 2}
    body.update({"prompt": "Hi"} if "chat" not in path else
                {"messages": [{"role": "user", "content": "Hi"}]})
    status, reply = server.post_json(path, {**body, "priority": 1})
    assert status == 400, reply
    error = reply["error"]
    assert error["param"] == "priority" and "Got priority 1" in error["message"]
    assert "policy" in error["message"] and error["type"] == "invalid_request_error"
    for bad in ("high", 1.5, True, [1]):
        status, reply = server.post_json(path, {**body, "priority": bad})
        assert status == 400 and reply["error"]["param"] == "priority", (bad, reply)
        assert reply["error"]["code"] == "invalid_type", (bad, reply)
    assert server.post_json(path, {**body, "priority": 0})[0] == 200
    assert server.post_json(path, {**body, "priority": None})[0] == 200
