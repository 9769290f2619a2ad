"""How a frontend reaches the engine core.

- `launch_engine_core` starts it in its own process (the default) or, for a server with
  `engine_process: false`, in a thread; either way it speaks ZeroMQ on an ipc socket in a
  private directory, and `zllm.engine.core_proc` describes the two pipes that carry its
  lifecycle. The core takes seconds to start (Ray, workers, weights, CUDA graphs): a frontend
  loads its tokenizer meanwhile, then calls `CoreHandle.wait_ready`.
- `MPClient` (blocking, for `LLM`) and `AsyncMPClient` (asyncio, for the API server) talk to it.
- `InprocClient` holds the engine core as a plain object in this process, for `LLM` with
  `engine_process: false`: debugging, and tests that look inside the core.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import uuid
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Optional

import zmq
import zmq.asyncio

from zllm.codec import decode, encode
from zllm.config import EngineConfig
from zllm.errors import EngineDeadError
from zllm.protocol import (CORE_OUTPUTS, EngineCoreAbort, EngineCoreCall, EngineCoreDead,
                           EngineCoreOutputs, EngineCoreReply, EngineCoreRequest,
                           EngineCoreRequests, EngineCoreState, FinishedRequest)

logger = logging.getLogger(__name__)

# How long a shut-down core gets to stop its workers before it is killed.
SHUTDOWN_TIMEOUT_S = 30.0
# The most prompt tokens (4 bytes each) and requests one EngineCoreRequests message carries: a
# huge offline batch goes in several, each far more than a step's budget.
BATCH_MESSAGE_TOKENS = 1 << 22
BATCH_MESSAGE_REQUESTS = 4096


@dataclass
class CoreHandle:
    """A started engine core: where it listens, its pipes, and what it reported when ready."""

    address: str
    status_fd: int  # readable at EOF when the core is gone
    parent_pipe: Optional[BinaryIO]  # close it to stop the core (None: another process owns it)
    ready: dict[str, Any]  # empty until wait_ready has read the core's ready message
    process: Optional[subprocess.Popen] = None
    thread: Optional[threading.Thread] = None
    directory: Optional[str] = None
    # Where the ready message arrives: the status pipe for the process that started the core;
    # stdin for an API server process, to which the supervisor passes the message on.
    ready_fd: Optional[int] = None

    def wait_ready(self) -> "CoreHandle":
        """Block until the core is ready; raises ValueError (bad config or model) or RuntimeError
        (anything else) with the core's own message if it failed to start, after stopping it."""
        if self.ready:
            return self
        status = read_line(self.status_fd if self.ready_fd is None else self.ready_fd)
        if not status:
            code = self.stop(timeout=5)
            raise RuntimeError(f"the engine core exited (code {code}) before it was ready; its "
                               f"log above says why")
        message = json.loads(status)
        if "error" in message:
            self.stop(timeout=10)
            raise (ValueError if message["type"] == "ValueError" else RuntimeError)(message["error"])
        self.ready = message["ready"]
        return self

    def is_alive(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return self.thread is not None and self.thread.is_alive()

    def stop(self, timeout: float = SHUTDOWN_TIMEOUT_S) -> Optional[int]:
        """Close the parent pipe and wait for the core to exit; its exit code (process)."""
        if self.parent_pipe is not None:
            self.parent_pipe.close()
        code = None
        if self.process is not None:
            try:
                code = self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("engine core did not stop within %.0f s; killing it", timeout)
                self.process.kill()
                code = self.process.wait()
        elif self.thread is not None:
            self.thread.join(timeout)
        _close(self.status_fd)
        if self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)
        return code


def core_config_dict(config: EngineConfig) -> dict[str, Any]:
    """The config the core gets: everything but the server section (it holds the API key,
    which nothing behind the frontend needs)."""
    values = dataclasses.asdict(config)
    values.pop("server")
    return values


def start_engine_core(config: EngineConfig, in_thread: bool = False) -> CoreHandle:
    """Start an engine core and wait until it is ready (see CoreHandle.wait_ready)."""
    return launch_engine_core(config, in_thread).wait_ready()


def launch_engine_core(config: EngineConfig, in_thread: bool = False) -> CoreHandle:
    """Start an engine core, without waiting for it: call `wait_ready` on the handle."""
    directory = tempfile.mkdtemp(prefix="zllm-")  # mode 0700: only this user reaches the socket
    address = f"ipc://{directory}/core-{uuid.uuid4().hex[:8]}"
    status_r, status_w = os.pipe()
    if in_thread:
        from zllm.engine.core_proc import run_engine_core

        parent_r, parent_w = os.pipe()
        core_config = EngineConfig.from_dict(core_config_dict(config))

        def run() -> None:
            try:
                run_engine_core(core_config, address, status_w, parent_r)
            finally:
                _close(status_w)
                _close(parent_r)

        thread = threading.Thread(target=run, name="zllm-engine-core", daemon=True)
        handle = CoreHandle(address, status_r, os.fdopen(parent_w, "wb"), {}, thread=thread,
                            directory=directory)
        thread.start()
    else:
        level = logging.getLevelName(logging.getLogger("zllm").getEffectiveLevel())
        process = subprocess.Popen(
            [sys.executable, "-m", "zllm.engine.core_proc", "--address", address,
             "--status-fd", str(status_w), "--log-level", str(level)],
            stdin=subprocess.PIPE, pass_fds=(status_w,))
        _close(status_w)
        process.stdin.write(json.dumps(core_config_dict(config)).encode() + b"\n")
        process.stdin.flush()
        handle = CoreHandle(address, status_r, process.stdin, {}, process=process,
                            directory=directory)
    return handle


def read_line(fd: int) -> bytes:
    """One line from a pipe, read a byte at a time so that nothing after it is consumed (an API
    server reads two lines from stdin, seconds apart); b"" at EOF. The lines are a few KB."""
    data = bytearray()
    while not data.endswith(b"\n"):
        byte = os.read(fd, 1)
        if not byte:
            return b""
        data += byte
    return bytes(data)


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


CORE_EXITED = "the engine core exited; requests in flight are lost"
_HELLO_CALL_ID = -1  # the call an AsyncMPClient makes when it connects; no one awaits its reply


class MPClient:
    """A blocking client of an engine core process (or thread)."""

    def __init__(self, handle: CoreHandle) -> None:
        self.handle, self.ready = handle, handle.ready
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDHWM, 0)
        self.socket.setsockopt(zmq.RCVHWM, 0)
        self.socket.connect(handle.address)
        self.poller = zmq.Poller()
        self.poller.register(self.socket, zmq.POLLIN)
        self.poller.register(handle.status_fd, zmq.POLLIN)
        self.pending: collections.deque[EngineCoreOutputs] = collections.deque()
        self.replies: dict[int, EngineCoreReply] = {}
        self.call_ids = itertools.count()
        self.dead: Optional[str] = None
        self.state = EngineCoreState("running", "")

    def add_requests(self, requests: list[EngineCoreRequest]) -> None:
        """Send the requests as one message (several for a batch of more than
        BATCH_MESSAGE_TOKENS prompt tokens or BATCH_MESSAGE_REQUESTS requests), so the core
        admits them before its next step."""
        if len(requests) == 1:
            self._send(requests[0])
            return
        batch, tokens = [], 0
        for request in requests:
            batch.append(request)
            tokens += len(request.prompt_token_ids)
            if tokens >= BATCH_MESSAGE_TOKENS or len(batch) >= BATCH_MESSAGE_REQUESTS:
                self._send(EngineCoreRequests(batch))
                batch, tokens = [], 0
        if batch:
            self._send(EngineCoreRequests(batch))

    def abort(self, request_ids: list[str]) -> None:
        if request_ids and self.dead is None:
            self._send(EngineCoreAbort(request_ids))

    def get_output(self, timeout_s: Optional[float] = None) -> Optional[EngineCoreOutputs]:
        """The next outputs message (blocks; None after timeout_s); EngineDeadError if the core
        is gone."""
        while not self.pending:
            if not self._receive(timeout_s):
                return None
        return self.pending.popleft()

    def call(self, method: str, *args: Any) -> Any:
        call_id = next(self.call_ids)
        self._send(EngineCoreCall(call_id, method, list(args)))
        while call_id not in self.replies:
            self._receive(None)
        reply = self.replies.pop(call_id)
        if reply.error is not None:
            raise RuntimeError(f"engine core call {method!r} failed: {reply.error}")
        return reply.result

    def _send(self, message: Any) -> None:
        if self.dead is not None:
            raise EngineDeadError(self.dead)
        self.socket.send(encode(message), copy=False)

    def _receive(self, timeout_s: Optional[float]) -> bool:
        """Wait for one message and file it; False on timeout."""
        if self.dead is not None:
            raise EngineDeadError(self.dead)
        events = dict(self.poller.poll(None if timeout_s is None else int(timeout_s * 1000)))
        if self.socket in events:
            message = decode(self.socket.recv(), *CORE_OUTPUTS)
            if isinstance(message, EngineCoreOutputs):
                self.pending.append(message)
            elif isinstance(message, EngineCoreReply):
                self.replies[message.call_id] = message
            elif isinstance(message, EngineCoreState):
                self.state = message
            else:
                self.dead = f"the engine core failed: {message.message}"
            return True
        if self.handle.status_fd in events:
            self.dead = CORE_EXITED
            raise EngineDeadError(self.dead)
        return False

    def shutdown(self) -> None:
        self.socket.close()
        self.context.term()
        self.handle.stop()


class InprocClient:
    """The engine core as a plain object in this process (engine_process: false)."""

    def __init__(self, config: EngineConfig) -> None:
        from zllm.engine.core import EngineCore

        self.core = EngineCore(config)
        self.ready = self.core.ready_info()
        self.rejected: list[FinishedRequest] = []

    def add_requests(self, requests: list[EngineCoreRequest]) -> None:
        for request in requests:
            try:
                self.core.add_request(request)
            except ValueError as e:
                self.rejected.append(FinishedRequest(request.request_id, "error", message=str(e)))

    def abort(self, request_ids: list[str]) -> None:
        if request_ids:  # (the frontend asks after every step, mostly for none)
            self.core.abort(request_ids)

    def get_output(self, timeout_s: Optional[float] = None) -> Optional[EngineCoreOutputs]:
        """Run steps until one has outputs; None when the core has nothing to do."""
        if self.rejected:
            rejected, self.rejected = self.rejected, []
            return EngineCoreOutputs.only_finished(rejected)
        while self.core.has_work():
            outputs = self.core.step()
            if outputs is not None:
                return outputs
        return None

    def call(self, method: str, *args: Any) -> Any:
        return self.core.call(method, *args)

    def shutdown(self) -> None:
        self.core.shutdown()


class AsyncMPClient:
    """An asyncio client of an engine core: outputs go to `on_outputs` as they arrive; when the
    core dies, `on_dead(message)` is called once."""

    def __init__(self, address: str, status_fd: int, ready: dict[str, Any]) -> None:
        self.address, self.status_fd, self.ready = address, status_fd, ready
        self.context = zmq.asyncio.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDHWM, 0)
        self.socket.setsockopt(zmq.RCVHWM, 0)
        self.socket.connect(address)
        self.replies: dict[int, asyncio.Future] = {}
        self.call_ids = itertools.count()
        self.dead: Optional[str] = None
        self.state = EngineCoreState("running", "")  # "recovering" while workers are rebuilt
        self._task: Optional[asyncio.Task] = None
        self._on_dead: Optional[Callable[[str], None]] = None
        self._state_waiters: list[asyncio.Future] = []

    def start(self, on_outputs: Callable[[EngineCoreOutputs], None],
              on_dead: Callable[[str], None]) -> None:
        loop = asyncio.get_running_loop()
        self._on_dead = on_dead
        self._task = loop.create_task(self._receive_loop(on_outputs))
        loop.add_reader(self.status_fd, self._status_readable)
        # Say hello, so that the core tells this frontend of state changes (a worker group being
        # rebuilt) even before its first request; the reply updates the state too.
        self.send(EngineCoreCall(_HELLO_CALL_ID, "state", []))

    def send(self, message: Any) -> None:
        if self.dead is not None:
            raise EngineDeadError(self.dead)
        self.socket.send(encode(message), copy=False)

    async def call(self, method: str, *args: Any) -> Any:
        call_id = next(self.call_ids)
        future = asyncio.get_running_loop().create_future()
        self.replies[call_id] = future
        self.send(EngineCoreCall(call_id, method, list(args)))
        reply = await future
        if reply.error is not None:
            raise RuntimeError(f"engine core call {method!r} failed: {reply.error}")
        return reply.result

    def next_state(self) -> asyncio.Future:
        """A future that resolves with the core's next state change (a worker group being
        rebuilt, then running again): a caller waiting on the core while it is busy rebuilding
        hears of it at once."""
        future = asyncio.get_running_loop().create_future()
        self._state_waiters.append(future)
        return future

    async def _receive_loop(self, on_outputs: Callable[[EngineCoreOutputs], None]) -> None:
        """Until the core dies. A frame that does not decode is logged and dropped; if handling
        one raises, the frontend treats the core as lost, so that no request in flight hangs."""
        while True:
            frame = await self.socket.recv()
            try:
                message = decode(frame, *CORE_OUTPUTS)
            except ValueError as e:
                logger.warning("dropped a malformed frame from the engine core: %s", str(e)[:200])
                continue
            try:
                if not self._handle(message, on_outputs):
                    return
            except Exception as e:
                logger.exception("handling the engine core's message failed")
                self._die(f"the frontend failed on the engine core's outputs: "
                          f"{type(e).__name__}: {e}")
                return

    def _handle(self, message: Any, on_outputs: Callable[[EngineCoreOutputs], None]) -> bool:
        """Act on one message from the core; False once the core has said it is dead."""
        if isinstance(message, EngineCoreOutputs):
            on_outputs(message)
        elif isinstance(message, EngineCoreReply):
            if message.call_id == _HELLO_CALL_ID and message.error is None:
                self.state = EngineCoreState(**message.result)
            future = self.replies.pop(message.call_id, None)
            if future is not None and not future.done():
                future.set_result(message)
        elif isinstance(message, EngineCoreState):
            self.state = message
            waiters, self._state_waiters = self._state_waiters, []
            for future in waiters:
                if not future.done():
                    future.set_result(message)
        elif isinstance(message, EngineCoreDead):
            self._die(f"the engine core failed: {message.message}")
            return False
        return True

    def _status_readable(self) -> None:
        try:
            data = os.read(self.status_fd, 4096)
        except OSError:
            data = b""
        if not data:
            self._die(CORE_EXITED)

    def _die(self, message: str) -> None:
        if self.dead is not None:
            return
        self.dead = message
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.status_fd)
        error = EngineDeadError(message)
        for future in self.replies.values():
            if not future.done():
                future.set_exception(error)
        self.replies.clear()
        if self._on_dead is not None:
            self._on_dead(message)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        try:
            asyncio.get_running_loop().remove_reader(self.status_fd)
        except RuntimeError:
            pass
        self.socket.close()
        self.context.term()
