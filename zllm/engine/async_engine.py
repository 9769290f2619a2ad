"""The engine for a server: a step loop that never stops, fed from asyncio.

`LLMEngine` is not thread-safe, so one background thread owns it. Everything else (the HTTP
handlers on the asyncio loop) talks to it through a command queue: a command is a function of the
engine that the loop thread runs between two steps, and its result or exception comes back on an
asyncio future. Outputs go to one asyncio queue per request through `loop.call_soon_threadsafe`.

    async for out in engine.generate("req-1", "Hello", SamplingParams(), stream=True):
        ...  # a RequestOutput per step (stream=True) or only the final one

Leaving the `async for` early (a client that disconnects, a cancelled task) aborts the request
and frees its KV blocks. If the loop thread raises, every request in flight gets the error and
later calls raise it at once, so nothing waits forever.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Optional

from zllm.config import EngineConfig
from zllm.engine.llm_engine import LLMEngine, Prompt
from zllm.engine.metrics import EngineMetrics
from zllm.errors import EngineDeadError
from zllm.outputs import RequestOutput
from zllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class _Stream:
    """Where one request's outputs go, and its latency bookkeeping (loop thread only)."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    stream: bool
    arrival: float
    num_tokens: int = 0
    last_token_time: Optional[float] = None
    last_output: Optional[RequestOutput] = None

    def put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the consumer's event loop is closed; nobody is listening
            pass


def _resolve(future: asyncio.Future, result: Any, error: Optional[BaseException]) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class AsyncLLMEngine:
    """An `LLMEngine` stepping in a background thread, with an asyncio front."""

    def __init__(self, config: EngineConfig) -> None:
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer  # read-only use (decode) outside the loop thread
        self.max_model_len = self.engine.max_model_len
        self.metrics = EngineMetrics()
        self.metrics.set_state(0, 0, self.engine.block_manager.usage)
        self._wakeup = threading.Condition()
        self._commands: deque[tuple[Callable[[LLMEngine], Any], Callable]] = deque()
        self._streams: dict[str, _Stream] = {}  # loop thread only
        self._stopping = False
        self.error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="zllm-engine-loop", daemon=True)
        self._thread.start()

    # -- the asyncio side ------------------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        return self.error is None and not self._stopping and self._thread.is_alive()

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run `fn(engine)` on the loop thread between steps; returns its result or raises."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def done(result: Any, error: Optional[BaseException]) -> None:
            try:
                loop.call_soon_threadsafe(_resolve, future, result, error)
            except RuntimeError:
                pass

        self._submit(fn, done)
        return await future

    def abort(self, request_id: str) -> None:
        """Abort a request (no-op if it is unknown or finished); its consumer gets a final output."""
        try:
            self._submit(lambda engine: self._abort(engine, request_id), lambda *_: None)
        except EngineDeadError:
            pass

    async def generate(self, request_id: str, prompt: Prompt, params: SamplingParams,
                       stream: bool = False) -> AsyncIterator[RequestOutput]:
        """Add a request and yield its outputs; raises ValueError (bad request) or EngineDeadError."""
        loop = asyncio.get_running_loop()
        target = _Stream(loop, asyncio.Queue(), stream, time.monotonic())
        finished = False
        try:
            await self.call(lambda engine: self._add(engine, request_id, prompt, params, target))
            while True:
                item = await target.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        except ValueError:
            finished = True  # rejected by add_request: nothing was queued
            raise
        finally:
            if not finished:
                # Cancelled or closed early; commands run in order, so this follows the add.
                self.abort(request_id)

    def shutdown(self) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        self._thread.join()
        self.engine.shutdown()

    def _submit(self, fn: Callable[[LLMEngine], Any], done: Callable) -> None:
        with self._wakeup:
            if self.error is not None:
                raise EngineDeadError(f"the engine loop failed: {self.error!r}") from self.error
            if self._stopping:
                raise EngineDeadError("the engine is shutting down")
            self._commands.append((fn, done))
            self._wakeup.notify()

    # -- the loop thread -------------------------------------------------------------------------

    def _add(self, engine: LLMEngine, request_id: str, prompt: Prompt, params: SamplingParams,
             target: _Stream) -> None:
        # Always stream inside the engine, so that first-token and inter-token times are seen
        # for every request; `target.stream` decides what reaches the consumer.
        engine.add_request(request_id, prompt, params, stream=True)
        self._streams[request_id] = target

    def _abort(self, engine: LLMEngine, request_id: str) -> None:
        engine.abort_request(request_id)
        target = self._streams.pop(request_id, None)
        if target is None:
            return
        self.metrics.count_finished("abort")
        last = target.last_output or RequestOutput(request_id, None, [], [])
        outputs = [dataclasses.replace(c, finish_reason=c.finish_reason or "abort")
                   for c in last.outputs]
        target.put(dataclasses.replace(last, outputs=outputs))

    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                with self._wakeup:
                    while not (self._commands or self._stopping or engine.has_unfinished_requests()):
                        self._wakeup.wait()
                    if self._stopping:
                        break
                    commands = list(self._commands)
                    self._commands.clear()
                for fn, done in commands:
                    try:
                        result = fn(engine)
                    except Exception as e:  # a bad request must not stop the loop
                        done(None, e)
                    else:
                        done(result, None)
                if engine.has_unfinished_requests():
                    outputs = engine.step()
                    now = time.monotonic()
                    for out in outputs:
                        self._deliver(out, now)
                self.metrics.set_state(len(engine.scheduler.running), len(engine.scheduler.waiting),
                                       engine.block_manager.usage)
        except BaseException as e:
            logger.exception("the engine loop failed; failing every request in flight")
            self._fail_everything(e)
            return
        self._fail_everything(EngineDeadError("the engine is shutting down"), record=False)

    def _deliver(self, out: RequestOutput, now: float) -> None:
        target = self._streams.get(out.request_id)
        if target is None:
            return
        num_tokens = sum(len(c.token_ids) for c in out.outputs)
        if num_tokens > target.num_tokens:
            if target.last_token_time is None:
                self.metrics.count_first_token(len(out.prompt_token_ids), now - target.arrival)
                self.metrics.count_tokens(num_tokens - target.num_tokens, None)
            else:
                self.metrics.count_tokens(num_tokens - target.num_tokens,
                                          now - target.last_token_time)
            target.num_tokens, target.last_token_time = num_tokens, now
        target.last_output = out
        if out.finished:
            del self._streams[out.request_id]
            for c in out.outputs:
                self.metrics.count_finished(c.finish_reason)
            target.put(out)
        elif target.stream:
            target.put(out)

    def _fail_everything(self, error: BaseException, record: bool = True) -> None:
        with self._wakeup:
            if record:
                self.error = error
            commands = list(self._commands)
            self._commands.clear()
        dead = error if isinstance(error, EngineDeadError) else \
            EngineDeadError(f"the engine loop failed: {error!r}")
        for _, done in commands:
            done(None, dead)
        for target in self._streams.values():
            if record:
                self.metrics.count_finished("error")
            target.put(dead)
        self._streams.clear()
