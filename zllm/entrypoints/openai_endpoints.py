"""The OpenAI endpoints of `zllm serve`: completions, chat completions, models, and vLLM's
/tokenize and /detokenize.

A request is checked whole before anything is queued: every prompt of a batch is tokenized and
validated (length against max_model_len with its max_tokens, token ids, the structured-output
spec), so a bad one gets a 400 that names its field and nothing is half-submitted. Each prompt
then becomes one engine request (the frontend fans out its `n` samples); their outputs are merged
into one response, or one stream of chunks, in OpenAI's choice order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from typing import Any, AsyncIterator, Callable, Optional

from aiohttp import web

import zllm
from zllm.entrypoints import openai_protocol as proto
from zllm.entrypoints.openai_protocol import APIError, GenerateRequest, bad_request
from zllm.entrypoints.openai_responses import Choices, usage
from zllm.entrypoints.tool_calls import pick_parser, prompt_messages
from zllm.entrypoints.tool_parsers import NamedToolParser, ToolCallParser
from zllm.errors import EngineDeadError, RequestError, SlowReaderError
from zllm.frontend.async_llm import AsyncLLM
from zllm.frontend.chat_template import render_chat
from zllm.outputs import RequestOutput

LLM = web.AppKey("llm", AsyncLLM)
MODEL_NAME = web.AppKey("model_name", str)
TOOL_PARSER = web.AppKey("tool_call_parser", str)  # the server's setting: auto, hermes, ...
STREAM_BUFFER_TOKENS = web.AppKey("stream_buffer_tokens", int)  # the server's setting

Checked = tuple[Optional[str], list[int]]  # a prompt's text (or None) and token ids


def check_model(request: web.Request, model: Optional[str]) -> None:
    name = request.app[MODEL_NAME]
    if model is not None and model != name:
        raise APIError(404, f"model {model!r} does not exist; this server serves {name!r}",
                       type="not_found_error", param="model", code="model_not_found")


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{
        "id": request.app[MODEL_NAME], "object": "model", "created": proto.now(),
        "owned_by": "zllm", "max_model_len": request.app[LLM].max_model_len}]})


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": zllm.__version__})


async def completions(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    parsed = proto.parse_completion(body)
    check_model(request, parsed.model)
    llm = request.app[LLM]
    checked = [await _checked(llm, p, parsed, "prompt") for p in parsed.prompts]
    return await generate(request, parsed, checked, f"cmpl-{uuid.uuid4().hex}", chat=False)


async def chat_completions(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    parsed = proto.parse_chat(body)
    check_model(request, parsed.model)
    llm = request.app[LLM]
    fmt = pick_parser(llm.tokenizer, request.app[TOOL_PARSER])
    prompt_ids = _render(llm, parsed, fmt)
    checked = await _checked(llm, prompt_ids, parsed, "messages")
    return await generate(request, parsed, [checked], f"chatcmpl-{uuid.uuid4().hex}", chat=True,
                          parser=_tool_parser(parsed, fmt))


def _render(llm: AsyncLLM, parsed: GenerateRequest, fmt: str) -> list[int]:
    messages, tools = prompt_messages(llm.tokenizer, parsed.messages, parsed.tools, fmt)
    try:
        return render_chat(llm.tokenizer, messages, tools=tools,
                           add_generation_prompt=parsed.add_generation_prompt,
                           continue_final_message=parsed.continue_final_message)
    except ValueError as e:
        raise bad_request(str(e), "messages") from None


def _tool_parser(parsed: GenerateRequest, fmt: str) -> Optional[Callable[[], Any]]:
    """What reads tool calls out of each sample's text, by tool_choice."""
    tools = parsed.tools
    if tools is None or tools.choice == "none":
        return None
    if tools.choice == "function":
        return lambda: NamedToolParser(tools.function)
    return lambda: ToolCallParser("json_array" if tools.choice == "required" else fmt, tools.names)


async def _checked(llm: AsyncLLM, prompt, parsed: GenerateRequest, prompt_param: str) -> Checked:
    """Tokenize and validate one prompt (and the request's priority); a RequestError becomes a
    400 naming the right field."""
    try:
        return await llm.check_request(prompt, parsed.params, parsed.priority)
    except RequestError as e:
        param = {"prompt": prompt_param, "structured_outputs": parsed.constraint_param,
                 "max_tokens": parsed.max_tokens_param}.get(e.param, e.param)
        raise bad_request(str(e), param, e.code) from None


# -- generation -----------------------------------------------------------------------------------

async def generate(request: web.Request, parsed: GenerateRequest, prompts: list[Checked],
                   request_id: str, chat: bool,
                   parser: Optional[Callable[[], Any]] = None) -> web.StreamResponse:
    llm = request.app[LLM]
    if not llm.is_running:
        raise EngineDeadError(llm.error)  # 503: the server is going down
    n = parsed.params.n
    head = {"id": request_id, "object": "chat.completion" if chat else "text_completion",
            "created": proto.now(), "model": request.app[MODEL_NAME]}
    choices = [Choices(llm.tokenizer, n, chat, parsed.params.logprobs, index_base=k * n,
                       echo_text=_echo_text(llm, text, ids) if parsed.echo else None,
                       parser=parser, token_ids=parsed.return_token_ids,
                       prompt_logprobs=parsed.show_prompt_logprobs and not chat)
               for k, (text, ids) in enumerate(prompts)]
    ids = [request_id] if len(prompts) == 1 else [f"{request_id}-{k}" for k in range(len(prompts))]
    limit = request.app[STREAM_BUFFER_TOKENS] if parsed.stream else None
    streams = [llm.generate(rid, text, parsed.params, stream=parsed.stream,
                            priority=parsed.priority, prompt_ids=prompt_ids,
                            max_pending_tokens=limit, on_slow_reader=_closer(request))
               for rid, (text, prompt_ids) in zip(ids, prompts)]
    if not parsed.stream:
        try:
            finals = await asyncio.gather(*[_last(s) for s in streams])
        except EngineDeadError as e:  # the engine core died while this request was in it
            raise APIError(500, str(e), type="internal_server_error") from None
        body = [c for builder, out in zip(choices, finals) for c in builder.full(out)]
        extra = ({"prompt_logprobs": choices[0].prompt_logprobs()}  # vLLM's place for them in chat
                 if chat and parsed.show_prompt_logprobs else {})
        return web.json_response({**head, "choices": body, "usage": _usage(finals, choices),
                                  **extra})
    if chat:
        head["object"] = "chat.completion.chunk"
    return await _stream(request, head, choices, streams, parsed)


def _closer(request: web.Request) -> Callable[[], None]:
    """Close the client's connection: a writer stuck on its full socket then ends, and the
    handler with it."""
    def close() -> None:
        if request.transport is not None:
            request.transport.abort()
    return close


def _echo_text(llm: AsyncLLM, text: Optional[str], ids: list[int]) -> str:
    return text if text is not None else llm.tokenizer.decode(ids)


async def _last(outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
    async with contextlib.aclosing(outputs):
        async for out in outputs:
            last = out
    return last


def _usage(outputs: list[RequestOutput], choices: list[Choices]) -> dict[str, Any]:
    """Every prompt counted once, every sample's tokens, and the prompt tokens found in the
    prefix cache."""
    return usage(sum(len(o.prompt_token_ids) for o in outputs),
                 sum(sum(c.num_tokens) for c in choices),
                 sum(o.num_cached_tokens for o in outputs))


async def _stream(request: web.Request, head: dict[str, Any], choices: list[Choices],
                  streams: list[AsyncIterator[RequestOutput]],
                  parsed: GenerateRequest) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
    await response.prepare(request)

    async def send(payload: Any) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        await response.write(f"data: {data}\n\n".encode())

    latest: list[Optional[RequestOutput]] = [None] * len(streams)
    try:
        async for k, out in _merged(streams):
            latest[k] = out
            delta = choices[k].deltas(out)
            if not delta:
                continue
            chunk = {**head, "choices": delta}
            if parsed.continuous_usage:
                chunk["usage"] = _usage([o for o in latest if o is not None], choices)
            await send(chunk)
        if parsed.include_usage:
            await send({**head, "choices": [], "usage": _usage(latest, choices)})
    except EngineDeadError as e:
        await send(APIError(500, str(e), type="internal_server_error").body())
    except SlowReaderError:  # the request is aborted and the connection closed
        return response
    await send("[DONE]")
    await response.write_eof()
    return response


async def _merged(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from several requests' outputs as they come. Leaving early (a
    client that disconnects) closes every stream, which aborts its request."""
    if len(streams) == 1:  # the common case: no tasks
        async with contextlib.aclosing(streams[0]):
            async for out in streams[0]:
                yield 0, out
        return
    # Bounded: outputs wait in each request's collector (merged, and bounded there) while the
    # consumer is slow, not here.
    queue: asyncio.Queue = asyncio.Queue(maxsize=1)

    async def pump(k: int, outputs: AsyncIterator[RequestOutput]) -> None:
        try:
            async with contextlib.aclosing(outputs):
                async for out in outputs:
                    await queue.put((k, out, None))
        except Exception as e:  # handed to the consumer
            await queue.put((k, None, e))
        await queue.put((k, None, None))

    tasks = [asyncio.create_task(pump(k, s)) for k, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            k, out, error = await queue.get()
            if error is not None:
                raise error
            if out is None:
                running -= 1
            else:
                yield k, out
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# -- tokenizer endpoints ----------------------------------------------------------------------------

async def tokenize(request: web.Request, body: dict[str, Any]) -> web.Response:
    """vLLM's /tokenize: a prompt (or chat messages, through the chat template) -> token ids."""
    check_model(request, proto.json_field(body, "model", "string|null"))
    llm = request.app[LLM]
    if "messages" in body:
        parsed = proto.parse_chat({**body, "model": ""})
        ids = _render(llm, parsed, pick_parser(llm.tokenizer, request.app[TOOL_PARSER]))
    else:
        prompt = proto.json_field(body, "prompt", "string", required=True)
        special = proto.json_field(body, "add_special_tokens", "boolean|null", True)
        ids = llm.tokenizer.encode(prompt, add_special_tokens=special)
    result: dict[str, Any] = {"count": len(ids), "max_model_len": llm.max_model_len,
                              "tokens": ids, "token_strs": None}
    if proto.json_field(body, "return_token_strs", "boolean|null", False):
        result["token_strs"] = llm.tokenizer.convert_ids_to_tokens(ids)
    return web.json_response(result)


async def detokenize(request: web.Request, body: dict[str, Any]) -> web.Response:
    """vLLM's /detokenize: token ids -> text."""
    check_model(request, proto.json_field(body, "model", "string|null"))
    llm = request.app[LLM]
    tokens = proto.json_field(body, "tokens", "array", required=True)
    vocab = llm.processor.vocab_size
    bad = [t for t in tokens if not (proto.is_int(t) and 0 <= t < vocab)]
    if bad:
        raise bad_request(f"'tokens' must be token ids in [0, {vocab}), got {bad[0]!r}", "tokens")
    return web.json_response({"prompt": llm.tokenizer.decode(tokens)})
