"""`zllm serve` with `api_server_count: N > 1`: one engine core, N HTTP server processes.

The supervisor starts the engine core and, while the core starts, N API server processes
(`zllm.entrypoints.api_server`) that all listen on the port with SO_REUSEPORT, so the kernel
spreads connections over them and HTTP, SSE, tokenization and detokenization spread over N
cores. Each API server watches the core's status pipe itself. The supervisor stays small: on SIGINT/SIGTERM it stops the API servers and then the core; if an API
server exits on its own (the core died, or it crashed), it stops the rest and exits non-zero so
that whatever supervises *it* restarts the service.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import socket
import subprocess
import sys
import time

from zllm.config import EngineConfig
from zllm.frontend.core_client import launch_engine_core
from zllm.model_files import resolve_model

logger = logging.getLogger(__name__)

_POLL_S = 0.2


def serve_multiprocess(config: EngineConfig) -> int:
    server = config.server
    started = time.perf_counter()
    config, _ = resolve_model(config)
    logger.info("starting the engine core for model %r and %d API servers", config.model.model,
                server.api_server_count)
    core = launch_engine_core(config)
    holder = _hold_port(config)
    children = _start_api_servers(config, core, started)
    try:
        core.wait_ready()
    except BaseException:
        for child in children:
            child.kill()
            child.wait()
        holder.close()
        raise
    ready_at = time.perf_counter()
    for child in children:
        child.stdin.write(json.dumps({"ready": core.ready}).encode() + b"\n")
        child.stdin.close()
    code = _watch(children, holder, release_port_at=ready_at + 60)
    # Within shutdown_timeout_s in all: each API server closes its streams within half of it
    # (zllm.entrypoints.server), and the engine core gets what is left.
    deadline = time.monotonic() + server.shutdown_timeout_s
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    holder.close()
    core.stop(timeout=max(1.0, deadline - time.monotonic()))
    return code


def _hold_port(config: EngineConfig) -> socket.socket:
    """Each API server listens on the port with SO_REUSEPORT, so the kernel spreads connections
    over them. This socket only picks the port (if 0) and holds it while they start; it never
    listens, so no connection waits on it. config.server.port becomes the port held."""
    server = config.server
    holder = socket.socket(socket.AF_INET6 if ":" in server.host else socket.AF_INET)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind((server.host, server.port))
    server.port = holder.getsockname()[1]
    return holder


def _start_api_servers(config: EngineConfig, core, started: float) -> list[subprocess.Popen]:
    """The API server processes, started while the core starts (imports, tokenizer). Each gets
    two lines on stdin: its settings now, and the core's ready message once the core sends it."""
    info = {"config": dataclasses.asdict(config), "address": core.address, "started": started}
    children = []
    for index in range(config.server.api_server_count):
        child = subprocess.Popen(
            [sys.executable, "-m", "zllm.entrypoints.api_server", "--index", str(index),
             "--status-fd", str(core.status_fd)], stdin=subprocess.PIPE, pass_fds=(core.status_fd,))
        child.stdin.write(json.dumps(info).encode() + b"\n")
        child.stdin.flush()
        children.append(child)
    return children


def _watch(children: list[subprocess.Popen], holder: socket.socket, release_port_at: float) -> int:
    """Wait for SIGINT or SIGTERM (0) or for an API server to exit (its code, or 1)."""
    stopping = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.append(True))
    while not stopping:
        if time.perf_counter() > release_port_at:
            holder.close()  # the API servers have long bound the port (closing twice is harmless)
        exited = [c for c in children if c.poll() is not None]
        if exited:
            logger.error("API server (pid %d) exited with code %d; stopping the server",
                         exited[0].pid, exited[0].returncode)
            return exited[0].returncode or 1
        time.sleep(_POLL_S)
    return 0
