"""Python clients for `zllm serve`: `Client` (blocking, standard library) and `AsyncClient` (aiohttp).

    client = zllm.Client("http://127.0.0.1:8000", api_key="secret")
    text = client.generate("Hello", SamplingParams(max_tokens=32, temperature=0))
    for delta in client.stream("Once upon a time", SamplingParams(max_tokens=64)):
        print(delta, end="", flush=True)
    reply = client.chat([{"role": "user", "content": "Hi"}])

Aborting: stop reading a stream and close it (`stream.close()`, leaving a `for` loop that holds the
generator, or cancelling the task with AsyncClient). The connection closes, the server sees the
disconnect, aborts the request and frees its KV blocks; there is no separate abort call.

Errors the server reports raise `ServerError` with its status code and message.
"""

from __future__ import annotations

import dataclasses
import json
import urllib.error
import urllib.request
from typing import Any, AsyncIterator, Iterator, Optional

from zllm.sampling_params import SamplingParams

_DEFAULTS = SamplingParams()


class ServerError(Exception):
    """An error response from the server: HTTP status, and OpenAI's error fields."""

    def __init__(self, status: int, message: str, type: Optional[str] = None,
                 param: Optional[str] = None, code: Optional[str] = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    @classmethod
    def from_body(cls, status: int, raw: bytes) -> "ServerError":
        try:
            error = json.loads(raw)["error"]
            return cls(status, error.get("message", ""), error.get("type"), error.get("param"),
                       error.get("code"))
        except (ValueError, KeyError, TypeError):
            return cls(status, raw.decode(errors="replace")[:500])


def _params_json(params: Optional[SamplingParams], chat: bool) -> dict[str, Any]:
    """SamplingParams as request fields: only those that differ from the defaults."""
    params = params or SamplingParams()
    body = {f.name: getattr(params, f.name) for f in dataclasses.fields(params)
            if getattr(params, f.name) != getattr(_DEFAULTS, f.name)}
    body["max_tokens"] = params.max_tokens  # chat's default differs from SamplingParams'
    if params.structured_outputs is not None:  # vLLM's field: the one constraint that is set
        spec = params.structured_outputs
        body["structured_outputs"] = {spec.kind: getattr(spec, spec.kind)}
    if chat and "logprobs" in body:
        body["top_logprobs"] = body.pop("logprobs")
        body["logprobs"] = True
    return body


def _priority_json(priority: int) -> dict[str, Any]:
    """vLLM's `priority` field, sent only when set: a server under fcfs refuses any other than 0."""
    return {"priority": priority} if priority != 0 else {}


_DONE = object()


def _sse_event(line: bytes) -> Any:
    """The JSON of one `data:` line, _DONE at the end, None for other lines; raises on errors."""
    line = line.strip()
    if not line.startswith(b"data:"):
        return None
    data = line[5:].strip()
    if data == b"[DONE]":
        return _DONE
    event = json.loads(data)
    if "error" in event:
        error = event["error"]
        raise ServerError(500, error.get("message", ""), error.get("type"))
    return event


def _delta_text(event: dict[str, Any]) -> str:
    choice = (event.get("choices") or [{}])[0]
    if "delta" in choice:
        return choice["delta"].get("content") or ""
    return choice.get("text") or ""


class _Base:
    def __init__(self, url: str, api_key: Optional[str] = None, model: Optional[str] = None,
                 timeout: float = 600.0) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        self._model = model
        self.timeout = timeout

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    @staticmethod
    def _completion_body(model: str, prompt: Any, params: Optional[SamplingParams],
                         stream: bool, priority: int) -> dict[str, Any]:
        return {"model": model, "prompt": prompt, "stream": stream,
                **_params_json(params, False), **_priority_json(priority)}

    @staticmethod
    def _chat_body(model: str, messages: list[dict[str, str]], params: Optional[SamplingParams],
                   stream: bool, priority: int) -> dict[str, Any]:
        return {"model": model, "messages": messages, "stream": stream,
                **_params_json(params, True), **_priority_json(priority)}


class Client(_Base):
    """A blocking client for one zllm server (standard library only).

    `model` defaults to the one model the server lists at /v1/models.
    """

    def _request(self, method: str, path: str, body: Optional[dict[str, Any]] = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers=self._headers())
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            raise ServerError.from_body(e.code, e.read()) from None

    def _json(self, method: str, path: str, body: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        with self._request(method, path, body) as response:
            return json.loads(response.read())

    @property
    def model(self) -> str:
        if self._model is None:
            self._model = self.models()[0]
        return self._model

    def health(self) -> bool:
        """True when the server answers /health with 200."""
        try:
            with self._request("GET", "/health") as response:
                return response.status == 200
        except ServerError:
            return False

    def models(self) -> list[str]:
        return [m["id"] for m in self._json("GET", "/v1/models")["data"]]

    def complete(self, prompt: str | list[int], params: Optional[SamplingParams] = None, *,
                 priority: int = 0) -> dict[str, Any]:
        """The full OpenAI completion response (all `n` choices, usage, logprobs). `priority`
        (lower first) needs a server with `policy: priority`, as in every method here."""
        return self._json("POST", "/v1/completions",
                          self._completion_body(self.model, prompt, params, False, priority))

    def generate(self, prompt: str | list[int], params: Optional[SamplingParams] = None, *,
                 priority: int = 0) -> str:
        """The generated text (of the first choice)."""
        return self.complete(prompt, params, priority=priority)["choices"][0]["text"]

    def stream(self, prompt: str | list[int], params: Optional[SamplingParams] = None, *,
               priority: int = 0) -> Iterator[str]:
        """Text deltas as they are generated; closing the iterator early aborts the request."""
        body = self._completion_body(self.model, prompt, params, True, priority)
        return self._stream("/v1/completions", body)

    def chat(self, messages: list[dict[str, str]], params: Optional[SamplingParams] = None, *,
             priority: int = 0) -> str:
        """The assistant's reply to a conversation."""
        body = self._chat_body(self.model, messages, params, False, priority)
        return self._json("POST", "/v1/chat/completions", body)["choices"][0]["message"]["content"]

    def stream_chat(self, messages: list[dict[str, str]], params: Optional[SamplingParams] = None,
                    *, priority: int = 0) -> Iterator[str]:
        body = self._chat_body(self.model, messages, params, True, priority)
        return self._stream("/v1/chat/completions", body)

    def _stream(self, path: str, body: dict[str, Any]) -> Iterator[str]:
        response = self._request("POST", path, body)
        with response:  # closing the connection is how the server learns to abort
            for line in iter(response.readline, b""):
                event = _sse_event(line)
                if event is _DONE:
                    return
                if event is not None and _delta_text(event):
                    yield _delta_text(event)


class AsyncClient(_Base):
    """The asyncio twin of `Client`, on aiohttp; use `async with AsyncClient(url) as client:`."""

    def __init__(self, url: str, api_key: Optional[str] = None, model: Optional[str] = None,
                 timeout: float = 600.0) -> None:
        super().__init__(url, api_key, model, timeout)
        self._session = None

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self):
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self._session

    async def _json(self, method: str, path: str, body: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        async with self._http().request(method, self.url + path, json=body,
                                        headers=self._headers()) as response:
            raw = await response.read()
            if response.status >= 400:
                raise ServerError.from_body(response.status, raw)
            return json.loads(raw)

    async def model(self) -> str:
        if self._model is None:
            self._model = (await self.models())[0]
        return self._model

    async def health(self) -> bool:
        async with self._http().get(self.url + "/health") as response:
            return response.status == 200

    async def models(self) -> list[str]:
        return [m["id"] for m in (await self._json("GET", "/v1/models"))["data"]]

    async def complete(self, prompt: str | list[int], params: Optional[SamplingParams] = None,
                       *, priority: int = 0) -> dict[str, Any]:
        body = self._completion_body(await self.model(), prompt, params, False, priority)
        return await self._json("POST", "/v1/completions", body)

    async def generate(self, prompt: str | list[int], params: Optional[SamplingParams] = None,
                       *, priority: int = 0) -> str:
        return (await self.complete(prompt, params, priority=priority))["choices"][0]["text"]

    async def chat(self, messages: list[dict[str, str]], params: Optional[SamplingParams] = None,
                   *, priority: int = 0) -> str:
        body = self._chat_body(await self.model(), messages, params, False, priority)
        return (await self._json("POST", "/v1/chat/completions", body))["choices"][0]["message"]["content"]

    async def stream(self, prompt: str | list[int], params: Optional[SamplingParams] = None,
                     *, priority: int = 0) -> AsyncIterator[str]:
        """Text deltas; `aclose()` the generator (or cancel the task) to abort the request."""
        body = self._completion_body(await self.model(), prompt, params, True, priority)
        async for text in self._stream("/v1/completions", body):
            yield text

    async def stream_chat(self, messages: list[dict[str, str]],
                          params: Optional[SamplingParams] = None, *,
                          priority: int = 0) -> AsyncIterator[str]:
        body = self._chat_body(await self.model(), messages, params, True, priority)
        async for text in self._stream("/v1/chat/completions", body):
            yield text

    async def _stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[str]:
        async with self._http().post(self.url + path, json=body, headers=self._headers()) as response:
            if response.status >= 400:
                raise ServerError.from_body(response.status, await response.read())
            async for line in response.content:
                event = _sse_event(line)
                if event is _DONE:
                    return
                if event is not None and _delta_text(event):
                    yield _delta_text(event)
