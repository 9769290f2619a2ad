"""The frontend engine for a server: asyncio in front, the engine core in its own process.

    llm = AsyncLLM(config)                 # starts the engine core (or connects to a running one)
    async for out in llm.generate("req-1", "Hello", SamplingParams(), stream=True):
        ...                                # delta outputs (stream=True) or only the final one

Tokenization, chat templates, detokenization and stop strings run here, in the API server's
process; the engine core sees token ids only. Outputs reach each request through a collector
that merges deltas, so a consumer that falls behind gets one larger delta, never a growing
queue; a consumer that falls further behind than `max_pending_tokens` (a client that stopped
reading) has its request aborted, its KV blocks freed and SlowReaderError raised. Leaving the
`async for` early (a client that disconnects, a cancelled task) aborts the
request in the core and frees its KV blocks. If the core dies, every request in flight and every
later call raises EngineDeadError.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any, AsyncIterator, Callable, Optional

from zllm.config import EngineConfig
from zllm.errors import EngineDeadError, SlowReaderError
from zllm.frontend.core_client import AsyncMPClient, CoreHandle, launch_engine_core
from zllm.frontend.llm_engine import load_tokenizer_beside
from zllm.frontend.output_processor import OutputProcessor
from zllm.frontend.processor import Processor, Prompt
from zllm.model_files import resolve_model
from zllm.outputs import CompletionOutput, RequestOutput
from zllm.protocol import EngineCoreAbort, EngineCoreOutputs, EngineCoreRequests
from zllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


def merge_deltas(old: RequestOutput, new: RequestOutput) -> RequestOutput:
    """One delta output that says what `old` and then `new` said."""
    merged = []
    for a, b in zip(old.outputs, new.outputs):
        logprobs = None if a.logprobs is None else a.logprobs + (b.logprobs or [])
        merged.append(CompletionOutput(a.index, a.text + b.text, a.token_ids + b.token_ids,
                                       b.finish_reason, b.stop_reason, logprobs))
    # The prompt's logprobs come once, in a stream's first update.
    return dataclasses.replace(new, outputs=merged,
                               prompt_logprobs=old.prompt_logprobs or new.prompt_logprobs,
                               prompt_token_ranks=old.prompt_token_ranks or new.prompt_token_ranks)


class _Collector:
    """The outputs of one request waiting for its consumer: at most one (merged) output, of at
    most `max_pending_tokens` tokens (None: no bound)."""

    def __init__(self, max_pending_tokens: Optional[int] = None) -> None:
        self.output: Optional[RequestOutput] = None
        self.error: Optional[BaseException] = None
        self.ready = asyncio.Event()
        self.max_pending_tokens = max_pending_tokens

    def put(self, output: RequestOutput) -> bool:
        """Hold `output` for the consumer; False if that makes more tokens wait than allowed."""
        pending = self.output
        self.output = merge_deltas(pending, output) if pending is not None and output.delta else output
        self.ready.set()
        limit = self.max_pending_tokens
        return limit is None or sum(len(c.token_ids) for c in self.output.outputs) <= limit

    def fail(self, error: BaseException) -> None:
        """End the consumer's iteration with `error` (what is pending is dropped)."""
        self.output, self.error = None, error
        self.ready.set()

    async def get(self) -> RequestOutput:
        await self.ready.wait()
        output, self.output = self.output, None
        if output is None:
            raise self.error
        if self.error is None:
            self.ready.clear()
        return output


class AsyncLLM:
    def __init__(self, config: EngineConfig, core: Optional[CoreHandle] = None) -> None:
        """Start an engine core for `config` or, given `core`, use that running one (several
        API server processes share one core; the one that started it stops it)."""
        config, self.arch = resolve_model(config)
        self.config = config
        self.owns_core = core is None
        self.core = core or launch_engine_core(config, in_thread=not config.parallel.engine_process)
        self.tokenizer = load_tokenizer_beside(self.core, config)
        self.max_model_len: int = self.core.wait_ready().ready["max_model_len"]
        self.processor = Processor(self.tokenizer, self.arch, self.max_model_len,
                                   config.scheduler.max_n, config.scheduler.policy)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.client: Optional[AsyncMPClient] = None
        self.collectors: dict[str, _Collector] = {}
        self.slow_reader_callbacks: dict[str, Optional[Callable[[], None]]] = {}
        self.error: Optional[str] = None
        self.on_dead: list[Callable[[str], None]] = []  # called once if the engine core dies

    def start(self) -> None:
        """Connect to the core; call once, on the event loop that will use this object."""
        self.client = AsyncMPClient(self.core.address, self.core.status_fd, self.core.ready)
        self.client.start(self._on_outputs, self._on_dead)

    @property
    def is_running(self) -> bool:
        return self.error is None

    @property
    def recovering(self) -> Optional[str]:
        """Why the engine core is rebuilding its worker group (requests wait meanwhile), or None."""
        state = self.client.state if self.client is not None else None
        return state.message if state is not None and state.state == "recovering" else None

    async def tokenize(self, prompt: Prompt) -> tuple[Optional[str], list[int]]:
        """Tokenize off the event loop when the prompt is long, so other streams keep flowing."""
        if isinstance(prompt, str) and len(prompt) > 4096:
            return await asyncio.to_thread(self.processor.tokenize, prompt)
        return self.processor.tokenize(prompt)

    async def check_request(self, prompt: Prompt, params: SamplingParams,
                            priority: int = 0) -> tuple[Optional[str], list[int]]:
        """Tokenize and validate; (text or None, token ids), or RequestError (a ValueError). A
        structured-output spec is parsed off the event loop (a large schema takes a while)."""
        text, prompt_ids = await self.tokenize(prompt)
        if params.structured_outputs is not None:
            await asyncio.to_thread(self.processor.check, prompt_ids, params, priority)
        else:
            self.processor.check(prompt_ids, params, priority)
        return text, prompt_ids

    async def generate(self, request_id: str, prompt: Prompt, params: SamplingParams,
                       stream: bool = False, priority: int = 0,
                       prompt_ids: Optional[list[int]] = None,
                       max_pending_tokens: Optional[int] = None,
                       on_slow_reader: Optional[Callable[[], None]] = None,
                       ) -> AsyncIterator[RequestOutput]:
        """Add a request and yield its outputs; raises ValueError (bad request), EngineDeadError
        or SlowReaderError. Given `prompt_ids`, the request has passed `check_request` (`prompt`
        is its text or None) and is queued as it is. When more than `max_pending_tokens` tokens
        wait for the consumer, the request is aborted at once and `on_slow_reader` is called
        (the server closes the connection, whose writer may be stuck on a full socket)."""
        if self.error is not None:
            raise EngineDeadError(self.error)
        if prompt_ids is None:
            text, prompt_ids = await self.check_request(prompt, params, priority)
        else:
            text = prompt if isinstance(prompt, str) else None
        if request_id in self.collectors:
            raise ValueError(f"request id {request_id!r} is already in use")
        requests = self.processor.make_requests(request_id, prompt_ids, params, priority)
        collector = self.collectors[request_id] = _Collector(max_pending_tokens)
        self.slow_reader_callbacks[request_id] = on_slow_reader
        self.output_processor.add_request(request_id, text, prompt_ids, params,
                                          [r.request_id for r in requests], stream)
        finished = False
        try:
            # n samples travel in one message, so the core admits them in the same step.
            self.client.send(requests[0] if len(requests) == 1 else EngineCoreRequests(requests))
            while not finished:
                output = await collector.get()
                finished = output.finished
                yield output
        finally:
            self.collectors.pop(request_id, None)
            self.slow_reader_callbacks.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request (no-op if it is unknown or finished)."""
        core_ids = self.output_processor.abort_request(request_id)
        if core_ids and self.error is None:
            self.client.send(EngineCoreAbort(core_ids))

    def next_state(self) -> asyncio.Future:
        """Resolves at the core's next state change (see `recovering`)."""
        return self.client.next_state()

    async def call(self, method: str, *args: Any) -> Any:
        """An engine core control call ("stats", "metrics", ...)."""
        if self.error is not None:
            raise EngineDeadError(self.error)
        return await self.client.call(method, *args)

    def _on_outputs(self, outputs: EngineCoreOutputs) -> None:
        results, stopped = self.output_processor.process(outputs)
        if stopped:
            self.client.send(EngineCoreAbort(stopped))
        for output in results:
            collector = self.collectors.get(output.request_id)
            if collector is not None and not collector.put(output):
                self._drop_slow_reader(output.request_id, collector)

    def _drop_slow_reader(self, request_id: str, collector: _Collector) -> None:
        """A consumer that stopped reading: abort its request (freeing its KV blocks) rather
        than buffer a whole generation for it."""
        logger.warning("request %s: more than %d tokens wait for a client that does not read; "
                       "aborting it", request_id, collector.max_pending_tokens)
        self.abort(request_id)
        collector.fail(SlowReaderError(
            f"the client fell more than {collector.max_pending_tokens} tokens behind"))
        callback = self.slow_reader_callbacks.get(request_id)
        if callback is not None:
            callback()

    def _on_dead(self, message: str) -> None:
        logger.error("%s", message)
        self.error = message
        error = EngineDeadError(message)
        for collector in self.collectors.values():
            collector.fail(error)
        for callback in self.on_dead:
            callback(message)

    def shutdown(self, timeout: Optional[float] = None) -> None:
        """Disconnect, and stop the core if this object started it (killing it after
        `timeout` seconds; default: core_client's SHUTDOWN_TIMEOUT_S)."""
        # Handlers still ending (cancelled streams) abort nothing on a closed socket.
        self.error = self.error or "the server is shutting down"
        if self.client is not None:
            self.client.close()
        if self.owns_core:
            self.core.stop() if timeout is None else self.core.stop(timeout)
