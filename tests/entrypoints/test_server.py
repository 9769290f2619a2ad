"""zllm serve over real HTTP, with the official openai client where it fits."""

from __future__ import annotations

import http.client
import json
import threading
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.conftest import PROMPTS
from tests.entrypoints.conftest import API_KEY, MAX_MODEL_LEN, MAX_REQUEST_BYTES, MODEL_NAME, wait_until

CHAT = [{"role": "user", "content": "Hello there, how are you?"}]


def _stream_text(client, **kwargs) -> tuple[str, list]:
    chunks = list(client.completions.create(model=MODEL_NAME, stream=True, **kwargs))
    return "".join(c.choices[0].text for c in chunks if c.choices), chunks


def test_completion_returns_text_usage_and_logprobs(openai_client):
    out = openai_client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=7,
                                           temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    choice = out.choices[0]
    assert choice.finish_reason == "length" and choice.text
    assert out.usage.completion_tokens == 7 and out.usage.prompt_tokens >= 1
    assert out.usage.total_tokens == out.usage.prompt_tokens + 7
    assert len(choice.logprobs.token_logprobs) == 7
    # Keys are decoded tokens, so two partial-character tokens can share one ("\ufffd").
    assert all(1 <= len(top) <= 3 for top in choice.logprobs.top_logprobs)


def test_chat_completion_and_n_choices(openai_client):
    out = openai_client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=5,
                                                n=3, seed=7, temperature=1.0,
                                                extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert all(c.message.role == "assistant" and c.finish_reason == "length" for c in out.choices)
    assert out.usage.completion_tokens == 15


def _stop_across_deltas(deltas: list[str]) -> str:
    """A stop string of three visible characters that spans two stream deltas (the text of
    successive steps), so a stream with it must hold back the first part until it knows; the
    first such after the output's first third, found nowhere earlier."""
    text, ends = "".join(deltas), []
    for d in deltas:
        ends.append((ends[-1] if ends else 0) + len(d))
    for end in ends[len(ends) // 3:-1]:
        for k in (end - 1, end - 2):
            stop = text[k:k + 3]
            if (len(stop) == 3 and stop.strip() == stop and "\ufffd" not in stop
                    and text.find(stop) == k):
                return stop
    raise AssertionError(f"no stop string to cut from {deltas!r}")


def test_streamed_text_equals_non_streamed_with_a_stop_string_across_deltas(openai_client):
    """A stop string that matches mid-output across two steps' text: the full answer ends just
    before it, and the streamed deltas join to exactly that text (no part of it leaks)."""
    kwargs = dict(max_tokens=40, temperature=0.9, top_p=0.95, seed=1234, presence_penalty=0.5)
    chunks = list(openai_client.completions.create(model=MODEL_NAME, prompt="Once upon a time",
                                                   stream=True, **kwargs))
    deltas = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    unstopped, stop = "".join(deltas), _stop_across_deltas(deltas)
    full = openai_client.completions.create(model=MODEL_NAME, prompt="Once upon a time", stop=stop,
                                            **kwargs)
    assert full.choices[0].finish_reason == "stop"
    assert full.choices[0].text == unstopped[:unstopped.index(stop)]
    streamed, chunks = _stream_text(openai_client, prompt="Once upon a time", stop=stop, **kwargs)
    assert streamed == full.choices[0].text
    assert chunks[-1].choices[-1].finish_reason == "stop"

    def chat_deltas(**extra) -> list[str]:
        stream = openai_client.chat.completions.create(model=MODEL_NAME, messages=CHAT,
                                                       stream=True, **kwargs, **extra)
        return [c.choices[0].delta.content for c in stream
                if c.choices and c.choices[0].delta.content]

    deltas = chat_deltas()
    unstopped, stop = "".join(deltas), _stop_across_deltas(deltas)
    full_chat = openai_client.chat.completions.create(model=MODEL_NAME, messages=CHAT, stop=stop,
                                                      **kwargs)
    assert full_chat.choices[0].message.content == unstopped[:unstopped.index(stop)]
    assert "".join(chat_deltas(stop=stop)) == full_chat.choices[0].message.content


def test_streamed_text_equals_non_streamed_for_the_same_seed(openai_client):
    kwargs = dict(prompt="Once upon a time", max_tokens=40, temperature=0.9, top_p=0.95, seed=1234,
                  presence_penalty=0.5, frequency_penalty=0.3)
    full = openai_client.completions.create(model=MODEL_NAME, **kwargs)
    streamed, chunks = _stream_text(openai_client, **kwargs, stream_options={"include_usage": True})
    assert streamed == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens

    chat_kwargs = dict(messages=CHAT, max_tokens=30, temperature=0.8, top_k=20, seed=5)
    full_chat = openai_client.chat.completions.create(model=MODEL_NAME, **{
        k: v for k, v in chat_kwargs.items() if k != "top_k"}, extra_body={"top_k": 20})
    stream = openai_client.chat.completions.create(model=MODEL_NAME, stream=True, messages=CHAT,
                                                   max_tokens=30, temperature=0.8, seed=5,
                                                   extra_body={"top_k": 20})
    assert "".join(c.choices[0].delta.content or "" for c in stream) == \
        full_chat.choices[0].message.content


def test_32_concurrent_streams_match_a_sequential_run_and_are_counted(server, openai_client):
    prompts = [f"{p} #{i}" for i, p in enumerate(PROMPTS * 4)]
    kwargs = dict(max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    sequential = [openai_client.completions.create(model=MODEL_NAME, prompt=p, **kwargs)
                  .choices[0].text for p in prompts]
    before = server.metrics()
    with ThreadPoolExecutor(32) as pool:
        concurrent = list(pool.map(lambda p: _stream_text(openai_client, prompt=p, **kwargs)[0],
                                   prompts))
    assert concurrent == sequential
    after = server.metrics()
    assert after["zllm_generation_tokens_total"] - before["zllm_generation_tokens_total"] == 32 * 12
    assert after['zllm_request_finished_total{finished_reason="length"}'] - \
        before['zllm_request_finished_total{finished_reason="length"}'] == 32
    assert after["zllm_time_to_first_token_seconds_count"] - \
        before["zllm_time_to_first_token_seconds_count"] == 32
    assert after["zllm_inter_token_latency_seconds_count"] > before["zllm_inter_token_latency_seconds_count"]
    assert after["zllm_prompt_tokens_total"] > before["zllm_prompt_tokens_total"]
    assert after["zllm_num_requests_running"] == 0


def _error(status_and_body: tuple[int, dict], status: int, param=None) -> dict:
    got_status, body = status_and_body
    assert got_status == status, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


def test_bad_requests_get_openai_errors_while_a_request_is_in_flight(server, openai_client):
    first_chunk, finished = threading.Event(), threading.Event()
    result = {}

    def long_stream():
        stream = openai_client.completions.create(
            model=MODEL_NAME, prompt="Hello", max_tokens=600, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        for chunk in stream:
            first_chunk.set()
            if chunk.usage is not None:
                result["usage"] = chunk.usage
        finished.set()

    thread = threading.Thread(target=long_stream)
    thread.start()
    try:
        assert first_chunk.wait(60)
        good = {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 2}
        post = server.post_json

        assert "JSON" in _error(server_raw(server, b'{"model": "tiny", "prompt": '), 400)["message"]
        _error(server_raw(server, b"[1, 2]"), 400)
        _error(post("/v1/completions", {"model": MODEL_NAME}), 400, "prompt")
        _error(post("/v1/completions", {"prompt": "Hi"}), 400, "model")
        _error(post("/v1/completions", {**good, "max_tokens": "ten"}), 400, "max_tokens")
        _error(post("/v1/completions", {**good, "stream": "yes"}), 400, "stream")
        _error(post("/v1/chat/completions", {"model": MODEL_NAME, "messages": [{"role": "user"}]}),
               400, "messages[0].content")
        assert "top_p" in _error(post("/v1/completions", {**good, "top_p": 1.5}), 400, "top_p")["message"]
        _error(post("/v1/completions", {**good, "temperature": -1}), 400, "temperature")
        _error(post("/v1/completions", {**good, "n": 0}), 400, "n")
        _error(post("/v1/completions", {**good, "logprobs": 99}), 400, "logprobs")
        _error(post("/v1/completions", {**good, "presence_penalty": 3}), 400, "presence_penalty")
        too_long = _error(post("/v1/completions", {**good, "prompt": [5] * MAX_MODEL_LEN}), 400, "prompt")
        assert str(MAX_MODEL_LEN) in too_long["message"]
        with pytest.raises(openai.BadRequestError):
            openai_client.completions.create(model=MODEL_NAME, prompt="Hi", extra_body={"top_k": -5})

        assert _error(post("/v1/completions", good, api_key="wrong"), 401)["type"] == "authentication_error"
        _error(post("/v1/completions", good, api_key=None), 401)
        for path in ("/v1/models", "/metrics"):
            assert server.request("GET", path, api_key=None)[0] == 401
        assert server.request("GET", "/health", api_key=None)[0] == 200

        assert _error(post("/v1/completions", {**good, "model": "gpt-4"}), 404, "model")["code"] == \
            "model_not_found"
        status, raw = server.request("GET", "/v1/nothing-here")
        _error((status, json.loads(raw)), 404)
        with pytest.raises(openai.NotFoundError):
            openai_client.chat.completions.create(model="nope", messages=CHAT)

        huge = json.dumps({**good, "prompt": "x" * (MAX_REQUEST_BYTES + 10)}).encode()
        status, raw = server.request("POST", "/v1/completions", huge)
        _error((status, json.loads(raw)), 413)

        assert not finished.is_set(), "the in-flight request ended before the bad requests did"
    finally:
        thread.join(120)
    assert result["usage"].completion_tokens == 600


def server_raw(server, body: bytes) -> tuple[int, dict]:
    status, raw = server.request("POST", "/v1/completions", body)
    return status, json.loads(raw)


def test_models_lists_the_served_model(server):
    status, raw = server.request("GET", "/v1/models")
    assert status == 200
    (model,) = json.loads(raw)["data"]
    assert model["id"] == MODEL_NAME and model["max_model_len"] == MAX_MODEL_LEN


def test_client_disconnect_mid_stream_aborts_and_frees_kv_blocks(server):
    aborted_before = server.metrics()['zllm_request_finished_total{finished_reason="abort"}']
    url = urllib.parse.urlparse(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    body = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 1500, "stream": True,
            "temperature": 0, "ignore_eos": True}
    conn.request("POST", "/v1/completions", json.dumps(body),
                 {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")
    running = server.metrics()
    assert running["zllm_num_requests_running"] == 1 and running["zllm_kv_cache_usage_ratio"] > 0
    conn.close()  # the client goes away mid-stream

    def freed():
        m = server.metrics()
        return (m["zllm_num_requests_running"] == 0 and m["zllm_kv_cache_usage_ratio"] == 0
                and m['zllm_request_finished_total{finished_reason="abort"}'] == aborted_before + 1)

    wait_until(freed, 30, "the aborted request's KV blocks to be freed")
