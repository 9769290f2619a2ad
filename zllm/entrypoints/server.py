"""`zllm serve`: an OpenAI-compatible HTTP server on aiohttp in front of the engine core.

Endpoints (zllm/entrypoints/openai_endpoints.py): POST /v1/completions, POST /v1/chat/completions
(both stream as server-sent events ending with `data: [DONE]`), GET /v1/models, POST /tokenize,
POST /detokenize; here: GET /health, GET /metrics (Prometheus text), GET /version.
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
import hmac
import json
import logging
import signal
import time
from typing import Any, Awaitable, Callable, Optional

from aiohttp import web

from zllm.config import EngineConfig, ServerConfig
from zllm.entrypoints import openai_endpoints as openai
from zllm.entrypoints.openai_endpoints import LLM, MODEL_NAME, STREAM_BUFFER_TOKENS, TOOL_PARSER
from zllm.entrypoints.openai_protocol import APIError
from zllm.errors import EngineDeadError
from zllm.frontend.async_llm import AsyncLLM
from zllm.metrics import render_prometheus

logger = logging.getLogger(__name__)

# How long /health waits for the engine core (busy with a step, at most) before answering 503.
HEALTH_TIMEOUT_S = 5.0

SERVER_CONFIG = web.AppKey("server_config", ServerConfig)

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
            if not authorized(request.headers.get("Authorization", ""), config.api_key):
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


def authorized(header: str, api_key: str) -> bool:
    """`Bearer KEY`, the scheme in any case (RFC 9110: schemes are case-insensitive)."""
    scheme, _, given = header.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(errors="replace"),
                                                              api_key.encode())


async def read_json(request: web.Request) -> dict[str, Any]:
    limit = request.app[SERVER_CONFIG].max_request_bytes
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    raw = await request.read()  # aiohttp enforces client_max_size when there is no length
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(body).__name__}",
                       code="invalid_json")
    return body


def parse_json(raw: bytes) -> Any:
    """Strict JSON, or a 400 that says why: not NaN or Infinity (not JSON), not an integer of
    more than 4300 digits (Python's limit), not nested deeper than the parser's recursion, not a
    lone UTF-16 surrogate ("\\ud800": no tokenizer takes it) in any string."""
    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON value")
    try:
        body = json.loads(raw, parse_constant=no_constant)
    except RecursionError:
        raise APIError(400, "request body is not valid JSON: it is nested too deeply",
                       code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, too many digits, NaN
        raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    if b"\\ud" in raw.lower():  # only a \u escape can make a surrogate: skip the walk otherwise
        try:
            _reject_surrogates(body, "")
        except RecursionError:
            raise APIError(400, "request body is nested too deeply", code="invalid_json") from None
    return body


def _reject_surrogates(value: Any, where: str) -> None:
    """400 naming the field (`messages[0].content`) of the first string with a lone surrogate."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, f"'{where}' holds a lone UTF-16 surrogate (\\ud800-\\udfff), "
                                f"which is not a character", param=where or None,
                           code="invalid_value") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _reject_surrogates(key, where)
            _reject_surrogates(item, f"{where}.{key}" if where else key)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _reject_surrogates(item, f"{where}[{i}]")


def with_json(handler: Callable[[web.Request, dict[str, Any]], Awaitable[web.StreamResponse]]):
    """An endpoint that takes the request's JSON body (checked to be an object)."""
    async def endpoint(request: web.Request) -> web.StreamResponse:
        return await handler(request, await read_json(request))
    return endpoint


async def health(request: web.Request) -> web.Response:
    """200 only while the engine core answers and every worker is alive (the core asks the
    executor at most once a second, so polling this is cheap); 503 "recovering" while a lost
    worker group is rebuilt, 503 "error" once the engine cannot go on."""
    llm = request.app[LLM]
    if not llm.is_running:
        return web.json_response({"status": "error", "error": llm.error}, status=503)
    if llm.recovering is not None:  # requests wait, and resume once the workers are back
        return web.json_response({"status": "recovering", "message": llm.recovering}, status=503)
    # The core answers between steps; while it rebuilds a worker group it cannot, but it says
    # so first: stop waiting at a state change.
    loop = asyncio.get_running_loop()
    call, deadline = asyncio.ensure_future(llm.call("health")), loop.time() + HEALTH_TIMEOUT_S
    while not call.done() and llm.recovering is None and loop.time() < deadline:
        changed = llm.next_state()
        try:
            await asyncio.wait({call, changed}, timeout=deadline - loop.time(),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            changed.cancel()
    if llm.recovering is not None:
        state = {"status": "recovering", "message": llm.recovering}
    elif not call.done():
        state = {"status": "error",
                 "error": f"the engine core did not answer within {HEALTH_TIMEOUT_S:.0f} s"}
    elif call.exception() is not None:
        state = {"status": "error", "error": str(call.exception())}
    else:
        state = call.result()
    call.cancel()  # still waiting only if the core is busy; its late reply is dropped
    return web.json_response(state, status=200 if state["status"] == "ok" else 503)


async def metrics(request: web.Request) -> web.Response:
    text = render_prometheus(await request.app[LLM].call("metrics"))
    return web.Response(text=text, content_type="text/plain", charset="utf-8",
                        headers={"X-Prometheus-Format": "0.0.4"})


# -- the application -----------------------------------------------------------------------------

def build_app(llm: AsyncLLM, config: ServerConfig, model_name: str,
              index: Optional[int] = None) -> web.Application:
    app = web.Application(middlewares=[errors_and_auth], client_max_size=config.max_request_bytes)
    app[LLM], app[SERVER_CONFIG], app[MODEL_NAME] = llm, config, model_name
    app[TOOL_PARSER] = config.tool_call_parser
    app[STREAM_BUFFER_TOKENS] = config.stream_buffer_tokens
    if index is not None:  # say which of several API servers answered (debugging, tests)
        async def name_server(request: web.Request, response: web.StreamResponse) -> None:
            response.headers["X-Zllm-Api-Server"] = str(index)
        app.on_response_prepare.append(name_server)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/version", openai.version)
    app.router.add_get("/v1/models", openai.models)
    app.router.add_post("/v1/completions", with_json(openai.completions))
    app.router.add_post("/v1/chat/completions", with_json(openai.chat_completions))
    app.router.add_post("/tokenize", with_json(openai.tokenize))
    app.router.add_post("/detokenize", with_json(openai.detokenize))
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


async def close_http(runner: web.AppRunner, timeout: float) -> None:
    """Stop listening, let streams end, then cancel those still running (a client that stopped
    reading holds its handler in a write): all within `timeout` seconds, whatever the handlers
    do (aiohttp waits its shutdown_timeout for them to end, and as long again once cancelled)."""
    try:
        await asyncio.wait_for(runner.cleanup(), timeout)
    except asyncio.TimeoutError:
        logger.warning("HTTP connections still open after %.1f s; exiting anyway", timeout)


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
    # SIGTERM: streams get a quarter of shutdown_timeout_s to end, then aiohttp cancels them
    # (and waits as long again at most); the engine core gets the other half.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                           shutdown_timeout=server.shutdown_timeout_s / 4)
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
        deadline = loop.time() + server.shutdown_timeout_s
        await close_http(runner, server.shutdown_timeout_s / 2)
        llm.shutdown(timeout=max(1.0, deadline - loop.time()))
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
