"""Request priority over HTTP: vLLM's `priority` field in completions and chat, sent by the openai
client and by zllm.Client / AsyncClient; refused under fcfs, obeyed under `policy: priority`."""

from __future__ import annotations

import asyncio

import pytest

import zllm
from tests.entrypoints.conftest import API_KEY, MODEL_NAME, join_all, queue_behind_one, send_long
from zllm import SamplingParams


def test_priority_request_over_http_overtakes_earlier_low_priority_ones(short_cache_server):
    """The KV cache holds one request at a time: r0 runs, r1 and r2 (priority 5) wait for its
    blocks; r3 (priority 1), sent last, is served next."""
    finished = []
    threads = queue_behind_one(short_cache_server, [5, 5, 5], finished)
    threads.append(send_long(short_cache_server, 3, 1, finished))
    join_all(threads)
    # fcfs order would be r0, r1, r2, r3.
    assert finished == ["r0", "r3", "r1", "r2"], finished


def test_priority_reaches_the_server_from_every_client_call(short_cache_server, server):
    """Under `policy: priority` each Client / AsyncClient call with a priority is served; the
    fcfs server refuses each one, naming the field: so every call really sends it."""
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    chat = [{"role": "user", "content": "Hi"}]
    for url, refused in ((short_cache_server.url, False), (server.url, True)):
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

    assert all(isinstance(r, str) and r for r in asyncio.run(async_calls(short_cache_server.url)))
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
