"""The engine core's busy loop, in its own process (`python -m zllm.engine.core_proc`) or thread.

Frontends connect DEALER sockets to the core's ROUTER socket (ipc, in a private directory) and send
typed msgpack messages (`zllm.protocol.CORE_INPUTS`); the core answers each frontend with the
outputs of its own requests and with replies to its calls. The socket's directory (mode 0700) is
its access control. A frame that does not decode is dropped, counted and logged (rate-limited);
a request the core cannot serve ends with finish reason "error".

Lifecycle, with no polling of pids:
- the frontend reads one line from the *status pipe*: `{"ready": {...}}` or `{"error": ...}`;
  the core keeps its end open until it exits, so EOF on the pipe tells every frontend that the
  core is gone;
- the core reads its *parent pipe* (stdin of the process); EOF means the frontend died or shut
  it down, and the core stops its workers and exits.
If a worker dies, the core rebuilds the worker group (telling every frontend it has heard from
`EngineCoreState("recovering")`, then "running") and resumes. If a step fails for good (a
worker raised, or the restarts are used up), the core tells every frontend (`EngineCoreDead`),
stops its workers and exits non-zero.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from typing import Any, Optional

import zmq

from zllm.codec import decode, encode
from zllm.config import EngineConfig
from zllm.executor.data_plane import RejectLog
from zllm.protocol import (CORE_INPUTS, EngineCoreAbort, EngineCoreCall, EngineCoreDead,
                           EngineCoreOutputs, EngineCoreReply, EngineCoreRequest,
                           EngineCoreRequests, EngineCoreState, FinishedRequest)

logger = logging.getLogger(__name__)


class EngineCoreProc:
    """Runs an EngineCore behind a ROUTER socket until the parent pipe closes."""

    def __init__(self, config: EngineConfig, address: str, status_fd: int, parent_fd: int) -> None:
        self.config, self.address = config, address
        self.status_fd, self.parent_fd = status_fd, parent_fd
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDHWM, 0)  # never drop a frontend's outputs
        self.socket.setsockopt(zmq.RCVHWM, 0)
        self.socket.bind(address)
        self.owners: dict[str, bytes] = {}  # request id -> the frontend that sent it
        self.frontends: set[bytes] = set()
        self.rejects = RejectLog("engine core")
        self.core = None

    # -- start and run -------------------------------------------------------------------------------

    def run(self) -> int:
        """Build the core, report on the status pipe, serve until told to stop; the exit code."""
        from zllm.engine.core import EngineCore

        try:
            self.core = EngineCore(self.config, on_state=self._broadcast_state)
        except Exception as e:
            logger.exception("engine core failed to start")
            self._status({"error": str(e), "type": type(e).__name__})
            return 2 if isinstance(e, ValueError) else 1
        self._status({"ready": self.core.ready_info()})
        try:
            self._loop()
            return 0
        except Exception as e:
            logger.exception("engine core failed; stopping")
            for frontend in self.frontends:
                self._send(frontend, EngineCoreDead(f"{type(e).__name__}: {e}"))
            return 1
        finally:
            self.core.shutdown()
            self.socket.close()
            self.context.term()

    def _status(self, message: dict[str, Any]) -> None:
        os.write(self.status_fd, (json.dumps(message) + "\n").encode())

    def _loop(self) -> None:
        core, socket = self.core, self.socket
        poller = zmq.Poller()
        poller.register(socket, zmq.POLLIN)
        poller.register(self.parent_fd, zmq.POLLIN)
        while True:
            events = dict(poller.poll(0 if core.has_work() else None))
            if self.parent_fd in events and not os.read(self.parent_fd, 4096):
                logger.info("engine core: the frontend closed its pipe; shutting down")
                return
            if socket in events:
                while self._handle_one():
                    pass
            if core.has_work():
                outputs = core.step()
                if outputs is not None:
                    t0 = time.perf_counter()
                    self._route(outputs)
                    core.charge_host_time(time.perf_counter() - t0)

    # -- input -------------------------------------------------------------------------------------------

    def _handle_one(self) -> bool:
        """Handle one waiting message; False when none is waiting."""
        try:
            frames = self.socket.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return False
        if len(frames) != 2:
            return self._reject(f"{len(frames)} frames")
        frontend, data = frames
        self.frontends.add(frontend)
        try:
            message = decode(data, *CORE_INPUTS)
        except ValueError as e:
            return self._reject(str(e))
        if isinstance(message, EngineCoreRequest):
            self._add(frontend, message)
        elif isinstance(message, EngineCoreRequests):
            for request in message.requests:
                self._add(frontend, request)
        elif isinstance(message, EngineCoreAbort):
            self.core.abort(message.request_ids)
            for req_id in message.request_ids:
                self.owners.pop(req_id, None)
        else:
            self._send(frontend, self._call(message))
        return True

    def _reject(self, why: str) -> bool:
        self.rejects.reject(why)
        return True

    def _add(self, frontend: bytes, request: EngineCoreRequest) -> None:
        try:
            self.core.add_request(request)
        except ValueError as e:
            finished = FinishedRequest(request.request_id, "error", message=str(e))
            self._send(frontend, EngineCoreOutputs.only_finished([finished]))
            return
        self.owners[request.request_id] = frontend

    def _call(self, call: EngineCoreCall) -> EngineCoreReply:
        if call.method == "rejected_frames":
            return EngineCoreReply(call.call_id, self.rejects.count)
        try:
            return EngineCoreReply(call.call_id, self.core.call(call.method, *call.args))
        except Exception as e:
            return EngineCoreReply(call.call_id, None, f"{type(e).__name__}: {e}")

    # -- output ------------------------------------------------------------------------------------------

    def _route(self, outputs: EngineCoreOutputs) -> None:
        """Send each frontend the outputs of its own requests."""
        if len(self.frontends) == 1:
            (frontend,) = self.frontends
            self._send(frontend, outputs)
        else:
            for frontend, part in outputs.split_by(self.owners).items():
                self._send(frontend, part)
        for finished in outputs.finished:
            self.owners.pop(finished.request_id, None)

    def _broadcast_state(self, state: str, message: str) -> None:
        """Tell every frontend (they say hello when they connect) that the core is recovering
        from a lost worker, or running again."""
        for frontend in self.frontends:
            self._send(frontend, EngineCoreState(state, message))

    def _send(self, frontend: bytes, message: Any) -> None:
        self.socket.send_multipart([frontend, encode(message)], copy=False)


def run_engine_core(config: EngineConfig, address: str, status_fd: int, parent_fd: int) -> int:
    return EngineCoreProc(config, address, status_fd, parent_fd).run()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="zllm engine core (started by a frontend)")
    parser.add_argument("--address", required=True)
    parser.add_argument("--status-fd", type=int, required=True)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Ctrl+C reaches the whole process group; the frontend decides when the core stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    config_line = sys.stdin.buffer.readline()
    config = EngineConfig.from_dict(json.loads(config_line))
    started = time.perf_counter()
    code = run_engine_core(config, args.address, args.status_fd, sys.stdin.fileno())
    logger.info("engine core exits (code %d) after %.0f s", code, time.perf_counter() - started)
    return code


if __name__ == "__main__":
    sys.exit(main())
