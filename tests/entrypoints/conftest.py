"""A real `zllm serve` in a subprocess on a free localhost port, shared by the entrypoint tests."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable, Optional

import openai
import pytest

API_KEY = "test-key"
MODEL_NAME = "tiny"
MAX_MODEL_LEN = 2048
MAX_REQUEST_BYTES = 65536


@dataclass
class Server:
    url: str
    log_path: str

    def request(self, method: str, path: str, body: Optional[bytes] = None,
                api_key: Optional[str] = API_KEY,
                headers: Optional[dict[str, str]] = None) -> tuple[int, bytes]:
        """(status, body) of a raw HTTP request; never raises for HTTP errors."""
        headers = {"Content-Type": "application/json", **(headers or {})}
        if api_key is not None:
            headers["Authorization"] = f"Bearer {api_key}"
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=60) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def post_json(self, path: str, payload: dict, **kwargs) -> tuple[int, dict]:
        status, raw = self.request("POST", path, json.dumps(payload).encode(), **kwargs)
        return status, json.loads(raw)

    def queue_sizes(self) -> tuple[float, float]:
        """The engine's (running, waiting) request gauges."""
        m = self.metrics()
        return m["zllm_num_requests_running"], m["zllm_num_requests_waiting"]

    def metrics(self) -> dict[str, float]:
        status, raw = self.request("GET", "/metrics")
        assert status == 200
        values = {}
        for line in raw.decode().splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition` until it holds, failing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    server: Server
    proc: subprocess.Popen

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def start_server(model: str, tmp, extra_yaml: str = "", *args: str) -> ServerProcess:
    """`zllm serve` on the tiny model in a subprocess, once /health answers 200."""
    config = tmp / "serve.yaml"
    config.write_text(
        f"model:\n  model: {model}\n  max_model_len: {MAX_MODEL_LEN}\n"
        "cache:\n  num_kv_blocks: 1024\n  block_size: 16\n"
        "scheduler:\n  max_num_seqs: 64\n  max_num_batched_tokens: 2048\n"
        "device:\n  device: cpu\n"
        f"server:\n  served_model_name: {MODEL_NAME}\n  max_request_bytes: {MAX_REQUEST_BYTES}\n"
        "  log_stats_interval: 1.0\n" + extra_yaml)
    port = _free_port()
    log_path = str(tmp / "server.log")
    env = {**os.environ, "ZLLM_API_KEY": API_KEY}  # the key comes from the environment
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "zllm", "serve", str(config),
                                 "--port", str(port), *args], stdout=log,
                                stderr=subprocess.STDOUT, env=env)
    running = ServerProcess(Server(f"http://127.0.0.1:{port}", log_path), proc)
    deadline = time.monotonic() + 120
    while True:
        try:
            if running.server.request("GET", "/health", api_key=None)[0] == 200:
                return running
        except (urllib.error.URLError, ConnectionError):
            pass
        if time.monotonic() > deadline:
            running.stop()
            raise AssertionError("server did not become healthy:\n" + open(log_path).read())
        try:  # a bounded wait that also notices a server that died at start-up
            proc.wait(timeout=0.2)
            raise AssertionError("server exited at start-up:\n" + open(log_path).read())
        except subprocess.TimeoutExpired:
            pass


@pytest.fixture(scope="session")
def server(gqa_model, tmp_path_factory) -> Server:
    running = start_server(gqa_model, tmp_path_factory.mktemp("server"))
    stats_line = r"generation [\d.]+ tok/s, running \d+, waiting \d+, KV cache"
    try:
        yield running.server
        # The server logs its stats every second: a short session (one test file) waits for
        # the first line rather than stopping the server before it.
        wait_until(lambda: re.search(stats_line, open(running.server.log_path).read()), 10,
                   "the server's first stats line")
    finally:
        running.stop()
    log = open(running.server.log_path).read()
    assert re.search(r"serving 'tiny' on http://127.0.0.1:\d+ \(engine [\d.]+ s", log), log
    assert "shutting down" in log, log
    assert re.search(stats_line, log), log


@pytest.fixture(scope="session")
def openai_client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


# A server whose KV cache admits one request at a time (policy: priority). Each prompt fills 20
# blocks (block_size 16); the first request of a test grows by 8 more (it runs long enough for
# others to queue behind it), the others by 1: 28 blocks hold any one request to its end, but
# never a second prompt beside it. Its worker paces every step (tests/entrypoints/paced_worker.py),
# so that the first request outlasts the test's sending of the others on any machine.
PROMPT_LEN, FIRST_TOKENS, MAX_TOKENS, NUM_KV_BLOCKS = 320, 120, 8, 28


def long_prompt(i: int) -> list[int]:
    """A prompt whose first block differs from every other's: no prefix-cache sharing."""
    return [100 + i] + [7] * (PROMPT_LEN - 1)


@pytest.fixture(scope="session")
def short_cache_server(gqa_model, tmp_path_factory) -> Server:
    running = start_server(gqa_model, tmp_path_factory.mktemp("short-cache-server"), "",
                           "--policy", "priority", "--num-kv-blocks", str(NUM_KV_BLOCKS),
                           "--max-model-len", str(NUM_KV_BLOCKS * 16),
                           "--worker-cls", "tests.entrypoints.paced_worker.PacedWorker")
    try:
        yield running.server
    finally:
        running.stop()


def send_long(server: Server, i: int, priority: int, finished: list[str]) -> threading.Thread:
    """A thread sending long_prompt(i) to a short_cache_server with the openai client (request 0
    generates FIRST_TOKENS, others MAX_TOKENS); it appends f"r{i}" to `finished` when done."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)

    def send() -> None:
        max_tokens = FIRST_TOKENS if i == 0 else MAX_TOKENS
        out = client.completions.create(model=MODEL_NAME, prompt=long_prompt(i),
                                        max_tokens=max_tokens, temperature=0,
                                        extra_body={"ignore_eos": True, "priority": priority})
        assert out.usage.completion_tokens == max_tokens
        finished.append(f"r{i}")  # (list.append is atomic)

    thread = threading.Thread(target=send)
    thread.start()
    return thread


def queue_behind_one(server: Server, priorities: list[int],
                     finished: list[str]) -> list[threading.Thread]:
    """Requests 0, 1, ... sent one by one, each once the one before is in the queue: request 0
    runs, the others wait for its blocks (the gauges show it)."""
    threads = []
    for i, priority in enumerate(priorities):
        threads.append(send_long(server, i, priority, finished))
        wait_until(lambda: server.queue_sizes() == (1, i), 60, f"request {i} in the queue")
    return threads


def join_all(threads: list[threading.Thread]) -> None:
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
