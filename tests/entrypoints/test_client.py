"""zllm.Client and zllm.AsyncClient against the shared test server."""

from __future__ import annotations

import asyncio

import pytest

import zllm
from zllm import SamplingParams
from tests.entrypoints.conftest import API_KEY, MAX_MODEL_LEN, MODEL_NAME, wait_until

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def test_client_generate_stream_and_chat_agree_with_openai(server, openai_client):
    client = zllm.Client(server.url, api_key=API_KEY)
    assert client.health() and client.models() == [MODEL_NAME]
    text = client.generate("Once upon a time", GREEDY)
    reference = openai_client.completions.create(model=MODEL_NAME, prompt="Once upon a time",
                                                 max_tokens=10, temperature=0,
                                                 extra_body={"ignore_eos": True})
    assert text == reference.choices[0].text
    assert "".join(client.stream("Once upon a time", GREEDY)) == text
    messages = [{"role": "user", "content": "Hi"}]
    chat_reference = openai_client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=10, temperature=0,
        extra_body={"ignore_eos": True}).choices[0].message.content
    assert client.chat(messages, GREEDY) == chat_reference
    assert "".join(client.stream_chat(messages, GREEDY)) == chat_reference
    # Sampled, n=2, with logprobs: the same choices as the openai client's request.
    full = client.complete("Hello", SamplingParams(n=2, seed=3, max_tokens=4, logprobs=1,
                                                   top_k=20))
    reference = openai_client.completions.create(model=MODEL_NAME, prompt="Hello", n=2, seed=3,
                                                 max_tokens=4, logprobs=1,
                                                 extra_body={"top_k": 20}).model_dump()
    for got, want in zip(full["choices"], reference["choices"], strict=True):
        assert got["text"] == want["text"] and got["finish_reason"] == want["finish_reason"]
        assert got["logprobs"]["tokens"] == want["logprobs"]["tokens"]
        assert got["logprobs"]["token_logprobs"] == pytest.approx(
            want["logprobs"]["token_logprobs"], abs=1e-5)
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert full["usage"][key] == reference["usage"][key]


def test_client_raises_server_errors_with_status_and_message(server):
    with pytest.raises(zllm.ServerError) as too_long:
        zllm.Client(server.url, api_key=API_KEY).generate([5] * MAX_MODEL_LEN)
    assert too_long.value.status == 400 and f"maximum context length is {MAX_MODEL_LEN} tokens" in \
        too_long.value.message
    with pytest.raises(zllm.ServerError) as unauthorized:
        zllm.Client(server.url, api_key="wrong", model=MODEL_NAME).generate("Hi")
    assert unauthorized.value.status == 401 and "API key" in unauthorized.value.message
    with pytest.raises(zllm.ServerError) as unknown:
        zllm.Client(server.url, api_key=API_KEY, model="other").generate("Hi")
    assert unknown.value.status == 404 and unknown.value.param == "model"
    assert not zllm.Client(server.url + "/nowhere").health()


def test_closing_a_client_stream_aborts_the_request(server):
    aborted = 'zllm_request_finished_total{finished_reason="abort"}'
    before = server.metrics()[aborted]
    stream = zllm.Client(server.url, api_key=API_KEY).stream(
        "Hello", SamplingParams(temperature=0, max_tokens=1500, ignore_eos=True))
    next(stream)
    stream.close()
    wait_until(lambda: server.metrics()[aborted] == before + 1
               and server.metrics()["zllm_kv_cache_usage_ratio"] == 0, 30, "the abort")


def test_async_client_runs_concurrent_requests(server, openai_client):
    prompts = ["Hello", "The quick brown fox", "Tensor parallelism"]
    reference = [openai_client.completions.create(model=MODEL_NAME, prompt=p, max_tokens=10,
                                                  temperature=0, extra_body={"ignore_eos": True})
                 .choices[0].text for p in prompts]
    chat_reference = openai_client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=10,
        temperature=0, extra_body={"ignore_eos": True}).choices[0].message.content

    async def run():
        async with zllm.AsyncClient(server.url, api_key=API_KEY) as client:
            assert await client.health()
            texts = await asyncio.gather(*[client.generate(p, GREEDY) for p in prompts])
            assert texts == reference
            streamed = []
            for p in prompts:
                streamed.append("".join([d async for d in client.stream(p, GREEDY)]))
            assert streamed == texts
            reply = await client.chat([{"role": "user", "content": "Hi"}], GREEDY)
            assert reply == chat_reference
            assert reply == "".join([d async for d in client.stream_chat(
                [{"role": "user", "content": "Hi"}], GREEDY)])
            with pytest.raises(zllm.ServerError) as bad:
                await client.generate("Hi", SamplingParams(top_k=-1, max_tokens=1, min_p=0.5,
                                                           repetition_penalty=1.0, n=1,
                                                           presence_penalty=0.0, stop=["x"],
                                                           stop_token_ids=[10**6]))
            assert bad.value.status == 400 and "stop token id" in bad.value.message
            assert bad.value.param == "stop_token_ids"

    asyncio.run(run())
