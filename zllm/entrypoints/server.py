"""`zllm serve`: an OpenAI-compatible HTTP server on aiohttp in front of the engine core.

Endpoints: POST /v1/completions, POST /v1/chat/completions (both stream as server-sent events
ending with `data: [DONE]`), GET /v1/models, GET /health, GET /metrics (Prometheus text).
Every endpoint but /health needs `Authorization: Bearer KEY` when an api_key is set. Errors are
OpenAI's JSON body `{"error": {"message", "type", "param", "code"}}`.

Processes: the engine core runs in its own process; this one (or, with `api_server_count: N`,
N of them sharing the port, under a supervisor) does HTTP, tokenization, chat
templates and detokenization (`zllm.frontend.async_llm`). If the core dies, requests in flight
fail (500, or an error event in a stream), /health answers 503, and the server exits non-zero
(unless `exit_on_engine_death: false`), so that a supervisor restarts it.

A client that disconnects cancels its handler (aiohttp's handler_cancellation), which leaves the
output generator early and so aborts the request and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import signal
import time
import uuid
from typing import Any, Optional

from aiohttp import web

from zllm.config import EngineConfig, ServerConfig
from zllm.entrypoints import openai_protocol as proto
from zllm.entrypoints.openai_protocol import APIError, GenerateRequest
from zllm.errors import EngineDeadError
from zllm.frontend.async_llm import AsyncLLM
from zllm.metrics import render_prometheus
from zllm.outputs import RequestOutput
from zllm.tokenizer import apply_chat_template

logger = logging.getLogger(__name__)

LLM = web.AppKey("llm", AsyncLLM)
SERVER_CONFIG = web.AppKey("server_config", ServerConfig)
MODEL_NAME = web.AppKey("model_name", str)

_STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                 405: "invalid_request_error", 413: "invalid_request_error",
                 500: "internal_server_error", 503: "service_unavailable"}


def error_response(error: APIError) -> web.Response:
    return web.json_response(error.body(), status=error.status)


@web.middleware
async def errors_and_auth(request: web.Request, handler) -> web.StreamResponse:
    """Turn every failure into OpenAI's error body, and check the API key first."""
    config = request.app[SERVER_CONFIG]
    try:
        if config.api_key is not None and request.path != "/health":
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {config.api_key}".encode()):
                raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer KEY'",
                               type="authentication_error", code="invalid_api_key")
        return await handler(request)
    except APIError as e:
        return error_response(e)
    except web.HTTPException as e:  # unknown path (404), wrong method (405), body too large (413)
        if e.status < 400:
            raise
        message = {404: f"no such endpoint: {request.method} {request.path}",
                   413: f"request body is larger than max_request_bytes "
                        f"({config.max_request_bytes})"}.get(e.status, e.reason)
        return error_response(APIError(e.status, message, type=_STATUS_TYPES.get(e.status, "error"),
                                       code={404: "not_found", 413: "request_too_large"}.get(e.status)))
    except EngineDeadError as e:
        return error_response(APIError(503, str(e), type="service_unavailable"))
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        logger.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(APIError(500, "internal server error (see the server log)",
                                       type="internal_server_error"))


async def read_json(request: web.Request) -> dict[str, Any]:
    limit = request.app[SERVER_CONFIG].max_request_bytes
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    raw = await request.read()  # aiohttp enforces client_max_size when there is no length
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(body).__name__}",
                       code="invalid_json")
    return body


def check_model(request: web.Request, model: str) -> None:
    name = request.app[MODEL_NAME]
    if model != name:
        raise APIError(404, f"model {model!r} does not exist; this server serves {name!r}",
                       type="not_found_error", param="model", code="model_not_found")


# -- endpoints -----------------------------------------------------------------------------------

async def health(request: web.Request) -> web.Response:
    llm = request.app[LLM]
    if not llm.is_running:
        return web.json_response({"status": "error", "error": llm.error}, status=503)
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    text = render_prometheus(await request.app[LLM].call("metrics"))
    return web.Response(text=text, content_type="text/plain", charset="utf-8",
                        headers={"X-Prometheus-Format": "0.0.4"})


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{
        "id": request.app[MODEL_NAME], "object": "model", "created": proto.now(),
        "owned_by": "zllm", "max_model_len": request.app[LLM].max_model_len}]})


async def completions(request: web.Request) -> web.StreamResponse:
    parsed = proto.parse_completion(await read_json(request))
    check_model(request, parsed.model)
    return await generate(request, parsed, f"cmpl-{uuid.uuid4().hex}", chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    llm = request.app[LLM]
    parsed = proto.parse_chat(await read_json(request), llm.max_model_len)
    check_model(request, parsed.model)
    try:
        parsed.prompt = apply_chat_template(llm.tokenizer, parsed.messages)
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from None
    return await generate(request, parsed, f"chatcmpl-{uuid.uuid4().hex}", chat=True)


class _Choices:
    """Turns a request's outputs into OpenAI choices: whole (non-streaming) or as chunk deltas."""

    def __init__(self, llm: AsyncLLM, parsed: GenerateRequest, chat: bool) -> None:
        self.tokenizer, self.parsed, self.chat = llm.tokenizer, parsed, chat
        n = parsed.params.n
        self.text_offset, self.num_tokens = [0] * n, [0] * n
        self.started, self.done = [False] * n, [False] * n
        # Tokens (and their logprobs) not yet sent in a chunk: they made no text so far.
        self.unsent_ids: list[list[int]] = [[] for _ in range(n)]
        self.unsent_logprobs: list[list] = [[] for _ in range(n)]

    def logprobs(self, token_ids, logprobs, text_offset: int) -> Optional[dict[str, Any]]:
        if logprobs is None:
            return None
        if self.chat:
            return proto.chat_logprobs(self.tokenizer, token_ids, logprobs, self.parsed.params.logprobs)
        return proto.completion_logprobs(self.tokenizer, token_ids, logprobs, text_offset)

    def full(self, out: RequestOutput) -> list[dict[str, Any]]:
        choices = []
        for c in out.outputs:
            choice: dict[str, Any] = {"index": c.index, "finish_reason": c.finish_reason,
                                      "logprobs": self.logprobs(c.token_ids, c.logprobs, 0)}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": c.text}
            else:
                choice["text"] = c.text
            if self.parsed.return_token_ids:
                choice["token_ids"] = c.token_ids
            choices.append(choice)
        return choices

    def deltas(self, out: RequestOutput) -> list[dict[str, Any]]:
        """Chunk choices for a delta output: one per sample with news (text, or its end)."""
        choices = []
        for c in out.outputs:
            i = c.index
            if self.done[i]:
                continue
            self.num_tokens[i] += len(c.token_ids)
            self.unsent_ids[i] += c.token_ids
            self.unsent_logprobs[i] += c.logprobs or []
            if not c.text and not c.finished and self.started[i] and not (
                    self.parsed.return_token_ids and c.token_ids):
                continue  # no text yet (half a character, or text held back at a stop string)
            logprobs = self.logprobs(self.unsent_ids[i], self.unsent_logprobs[i],
                                     self.text_offset[i]) if c.logprobs is not None else None
            choice: dict[str, Any] = {"index": i, "finish_reason": c.finish_reason,
                                      "logprobs": logprobs}
            if self.chat:
                choice["delta"] = {"content": c.text} if self.started[i] else {
                    "role": "assistant", "content": c.text}
            else:
                choice["text"] = c.text
            if self.parsed.return_token_ids:
                choice["token_ids"] = self.unsent_ids[i]
            choices.append(choice)
            self.started[i], self.done[i] = True, c.finished
            self.text_offset[i] += len(c.text)
            self.unsent_ids[i], self.unsent_logprobs[i] = [], []
        return choices


async def generate(request: web.Request, parsed: GenerateRequest, request_id: str,
                   chat: bool) -> web.StreamResponse:
    llm = request.app[LLM]
    head = {"id": request_id, "object": "chat.completion" if chat else "text_completion",
            "created": proto.now(), "model": request.app[MODEL_NAME]}
    choices = _Choices(llm, parsed, chat)
    if not llm.is_running:
        raise EngineDeadError(llm.error)  # 503: the server is going down
    outputs = llm.generate(request_id, parsed.prompt, parsed.params, stream=parsed.stream)
    async with contextlib.aclosing(outputs):
        try:
            first = await anext(outputs)
        except ValueError as e:  # a prompt the engine cannot take: too long, bad token ids
            raise APIError(400, str(e), param="messages" if chat else "prompt",
                           code="invalid_prompt") from None
        except EngineDeadError as e:  # the engine core died while this request was in it
            raise APIError(500, str(e), type="internal_server_error") from None
        if not parsed.stream:
            completion_tokens = sum(len(c.token_ids) for c in first.outputs)
            return web.json_response({**head, "choices": choices.full(first),
                                      "usage": proto.usage(len(first.prompt_token_ids),
                                                           completion_tokens)})
        return await _stream(request, head, choices, first, outputs, parsed.include_usage, chat)


async def _stream(request: web.Request, head: dict[str, Any], choices: _Choices,
                  first: RequestOutput, outputs, include_usage: bool, chat: bool) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
    await response.prepare(request)
    if chat:
        head["object"] = "chat.completion.chunk"

    async def send(payload: Any) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        await response.write(f"data: {data}\n\n".encode())

    out = first
    try:
        while True:
            delta = choices.deltas(out)
            if delta:
                await send({**head, "choices": delta})
            if out.finished:
                break
            out = await anext(outputs)
        if include_usage:
            await send({**head, "choices": [],
                        "usage": proto.usage(len(out.prompt_token_ids), sum(choices.num_tokens))})
    except EngineDeadError as e:
        await send(APIError(500, str(e), type="internal_server_error").body())
    await send("[DONE]")
    await response.write_eof()
    return response


# -- the application -----------------------------------------------------------------------------

def build_app(llm: AsyncLLM, config: ServerConfig, model_name: str,
              index: Optional[int] = None) -> web.Application:
    app = web.Application(middlewares=[errors_and_auth], client_max_size=config.max_request_bytes)
    app[LLM], app[SERVER_CONFIG], app[MODEL_NAME] = llm, config, model_name
    if index is not None:  # say which of several API servers answered (debugging, tests)
        async def name_server(request: web.Request, response: web.StreamResponse) -> None:
            response.headers["X-Zllm-Api-Server"] = str(index)
        app.on_response_prepare.append(name_server)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    return app


async def log_stats(llm: AsyncLLM, interval: float) -> None:
    """One log line of throughput and KV usage every `interval` seconds while there is work."""
    last, last_time = await llm.call("metrics"), time.monotonic()
    while llm.is_running:
        await asyncio.sleep(interval)
        snap, now = await llm.call("metrics"), time.monotonic()
        elapsed = now - last_time
        prompt_tps = (snap["prompt_tokens"] - last["prompt_tokens"]) / elapsed
        gen_tps = (snap["generation_tokens"] - last["generation_tokens"]) / elapsed
        if prompt_tps or gen_tps or snap["running"] or snap["waiting"]:
            logger.info("prompt %.1f tok/s, generation %.1f tok/s, running %d, waiting %d, "
                        "KV cache %.1f%%", prompt_tps, gen_tps, snap["running"], snap["waiting"],
                        100 * snap["kv_usage"])
        last, last_time = snap, now


def served_model_name(config: EngineConfig) -> str:
    return config.server.served_model_name or config.model.model


async def run_api_server(llm: AsyncLLM, config: EngineConfig, started: float, engine_s: float,
                         index: Optional[int] = None) -> int:
    """Serve HTTP until SIGINT/SIGTERM (exit code 0) or the engine core's death (1). `index`
    numbers this API server among several (they share the port with SO_REUSEPORT)."""
    server = config.server
    model_name = served_model_name(config)
    llm.start()
    app = build_app(llm, server, model_name, index)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    stop, exit_code = asyncio.Event(), [0]
    loop = asyncio.get_running_loop()

    def engine_died(message: str) -> None:
        if server.exit_on_engine_death:
            exit_code[0] = 1
            # A moment for the streams in flight to send their error events.
            loop.call_later(1.0, stop.set)

    llm.on_dead.append(engine_died)
    stats = None
    try:
        await runner.setup()
        site = web.TCPSite(runner, server.host, server.port, reuse_port=index is not None)
        await site.start()
        logger.info("serving %r on http://%s:%d (engine %.1f s, total %.1f s; max_model_len %d, "
                    "API key %s%s)", model_name, server.host, server.port, engine_s,
                    time.perf_counter() - started, llm.max_model_len,
                    "required" if server.api_key else "off",
                    "" if index is None else f", API server {index}")
        if server.log_stats_interval > 0 and not index:
            stats = asyncio.create_task(log_stats(llm, server.log_stats_interval))
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        logger.info("shutting down" if not exit_code[0] else
                    "shutting down: the engine core died (%s)" % llm.error)
    finally:
        if stats is not None:
            stats.cancel()
        await runner.cleanup()
        llm.shutdown()
    return exit_code[0]


def serve(config: EngineConfig) -> int:
    """`zllm serve`: the engine core and the HTTP server(s); returns the exit code."""
    if config.server.api_server_count > 1:
        from zllm.entrypoints.supervisor import serve_multiprocess

        return serve_multiprocess(config)
    started = time.perf_counter()
    logger.info("starting the engine for model %r (%s executor, device %s)", config.model.model,
                config.executor_backend, config.device.device)
    llm = AsyncLLM(config)
    engine_s = time.perf_counter() - started
    return asyncio.run(run_api_server(llm, config, started, engine_s))
