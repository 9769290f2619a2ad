"""`zllm serve`: an OpenAI-compatible HTTP server on aiohttp in front of the async engine.

Endpoints: POST /v1/completions, POST /v1/chat/completions (both stream as server-sent events
ending with `data: [DONE]`), GET /v1/models, GET /health, GET /metrics (Prometheus text).
Every endpoint but /health needs `Authorization: Bearer KEY` when an api_key is set. Errors are
OpenAI's JSON body `{"error": {"message", "type", "param", "code"}}`.

A client that disconnects cancels its handler (aiohttp's handler_cancellation), which leaves the
engine's output generator early and so aborts the request and frees its KV blocks.
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
from zllm.engine.async_engine import AsyncLLMEngine, EngineDeadError
from zllm.entrypoints import openai_protocol as proto
from zllm.entrypoints.openai_protocol import APIError, GenerateRequest
from zllm.outputs import RequestOutput
from zllm.tokenizer import apply_chat_template

logger = logging.getLogger(__name__)

ENGINE = web.AppKey("engine", AsyncLLMEngine)
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
    engine = request.app[ENGINE]
    if not engine.is_running:
        return web.json_response({"status": "error", "error": repr(engine.error)}, status=503)
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    text = request.app[ENGINE].metrics.render(request.app[MODEL_NAME])
    return web.Response(text=text, content_type="text/plain", charset="utf-8",
                        headers={"X-Prometheus-Format": "0.0.4"})


async def models(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    return web.json_response({"object": "list", "data": [{
        "id": request.app[MODEL_NAME], "object": "model", "created": proto.now(),
        "owned_by": "zllm", "max_model_len": engine.max_model_len}]})


async def completions(request: web.Request) -> web.StreamResponse:
    parsed = proto.parse_completion(await read_json(request))
    check_model(request, parsed.model)
    return await generate(request, parsed, f"cmpl-{uuid.uuid4().hex}", chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    parsed = proto.parse_chat(await read_json(request), engine.max_model_len)
    check_model(request, parsed.model)
    try:  # the tokenizer belongs to the engine thread
        parsed.prompt = await engine.call(lambda e: apply_chat_template(e.tokenizer, parsed.messages))
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from None
    return await generate(request, parsed, f"chatcmpl-{uuid.uuid4().hex}", chat=True)


class _Choices:
    """Turns cumulative RequestOutputs into OpenAI choices and deltas (what was not sent yet)."""

    def __init__(self, engine: AsyncLLMEngine, parsed: GenerateRequest, chat: bool) -> None:
        self.tokenizer, self.parsed, self.chat = engine.tokenizer, parsed, chat
        n = parsed.params.n
        self.sent_text, self.sent_tokens, self.done = [0] * n, [0] * n, [False] * n

    def logprobs(self, c, start: int, text_offset: int) -> Optional[dict[str, Any]]:
        if c.logprobs is None:
            return None
        ids, lps = c.token_ids[start:], c.logprobs[start:]
        if self.chat:
            return proto.chat_logprobs(self.tokenizer, ids, lps, self.parsed.params.logprobs)
        return proto.completion_logprobs(self.tokenizer, ids, lps, text_offset)

    def full(self, out: RequestOutput) -> list[dict[str, Any]]:
        choices = []
        for c in out.outputs:
            choice: dict[str, Any] = {"index": c.index, "finish_reason": c.finish_reason,
                                      "logprobs": self.logprobs(c, 0, 0)}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": c.text}
            else:
                choice["text"] = c.text
            choices.append(choice)
        return choices

    def deltas(self, out: RequestOutput) -> list[dict[str, Any]]:
        choices = []
        for c in out.outputs:
            i = c.index
            if self.done[i]:
                continue
            text = c.text[self.sent_text[i]:]
            if not text and not c.finished and self.sent_tokens[i] > 0:
                continue  # a token that is not text yet (half a character)
            choice: dict[str, Any] = {"index": i, "finish_reason": c.finish_reason,
                                      "logprobs": self.logprobs(c, self.sent_tokens[i], self.sent_text[i])}
            if self.chat:
                delta = {"content": text}
                if self.sent_tokens[i] == 0:
                    delta["role"] = "assistant"
                choice["delta"] = delta
            else:
                choice["text"] = text
            choices.append(choice)
            self.sent_text[i], self.sent_tokens[i] = len(c.text), len(c.token_ids)
            self.done[i] = c.finished
        return choices


async def generate(request: web.Request, parsed: GenerateRequest, request_id: str,
                   chat: bool) -> web.StreamResponse:
    engine = request.app[ENGINE]
    head = {"id": request_id, "object": "chat.completion" if chat else "text_completion",
            "created": proto.now(), "model": request.app[MODEL_NAME]}
    choices = _Choices(engine, parsed, chat)
    outputs = engine.generate(request_id, parsed.prompt, parsed.params, stream=parsed.stream)
    async with contextlib.aclosing(outputs):
        try:
            first = await anext(outputs)
        except ValueError as e:  # rejected by the engine: too long, bad token ids
            raise APIError(400, str(e), param="messages" if chat else "prompt",
                           code="invalid_prompt") from None
        if not parsed.stream:
            final = first
            async for final in outputs:
                pass
            completion_tokens = sum(len(c.token_ids) for c in final.outputs)
            return web.json_response({**head, "choices": choices.full(final),
                                      "usage": proto.usage(len(final.prompt_token_ids),
                                                           completion_tokens)})

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
            if parsed.include_usage:
                completion_tokens = sum(len(c.token_ids) for c in out.outputs)
                await send({**head, "choices": [],
                            "usage": proto.usage(len(out.prompt_token_ids), completion_tokens)})
        except EngineDeadError as e:
            await send(APIError(500, str(e), type="internal_server_error").body())
        await send("[DONE]")
        await response.write_eof()
        return response


# -- the application -----------------------------------------------------------------------------

def build_app(engine: AsyncLLMEngine, config: ServerConfig, model_name: str) -> web.Application:
    app = web.Application(middlewares=[errors_and_auth], client_max_size=config.max_request_bytes)
    app[ENGINE], app[SERVER_CONFIG], app[MODEL_NAME] = engine, config, model_name
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    return app


async def log_stats(engine: AsyncLLMEngine, interval: float) -> None:
    """One log line of throughput and KV usage every `interval` seconds while there is work."""
    last = engine.metrics.snapshot()
    last_time = time.monotonic()
    while True:
        await asyncio.sleep(interval)
        snap, now = engine.metrics.snapshot(), time.monotonic()
        elapsed = now - last_time
        prompt_tps = (snap["prompt_tokens"] - last["prompt_tokens"]) / elapsed
        gen_tps = (snap["generation_tokens"] - last["generation_tokens"]) / elapsed
        if prompt_tps or gen_tps or snap["running"] or snap["waiting"]:
            logger.info("prompt %.1f tok/s, generation %.1f tok/s, running %d, waiting %d, "
                        "KV cache %.1f%%", prompt_tps, gen_tps, snap["running"], snap["waiting"],
                        100 * snap["kv_usage"])
        last, last_time = snap, now


async def serve(config: EngineConfig) -> None:
    """Start the engine and the HTTP server; run until SIGINT or SIGTERM."""
    server = config.server
    model_name = server.served_model_name or config.model.model
    t0 = time.perf_counter()
    logger.info("starting the engine for model %r (%s executor, device %s)", config.model.model,
                config.executor_backend, config.device.device)
    engine = AsyncLLMEngine(config)
    t_engine = time.perf_counter() - t0
    app = build_app(engine, server, model_name)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    stats = None
    try:
        await runner.setup()
        site = web.TCPSite(runner, server.host, server.port)
        await site.start()
        logger.info("serving %r on http://%s:%d (engine %.1f s, total %.1f s; max_model_len %d, "
                    "API key %s)", model_name, server.host, server.port, t_engine,
                    time.perf_counter() - t0, engine.max_model_len,
                    "required" if server.api_key else "off")
        if server.log_stats_interval > 0:
            stats = asyncio.create_task(log_stats(engine, server.log_stats_interval))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        logger.info("shutting down")
    finally:
        if stats is not None:
            stats.cancel()
        await runner.cleanup()
        engine.shutdown()
