"""A real `zllm serve` in a subprocess on a free localhost port, shared by the entrypoint tests."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable, Optional

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
    try:
        yield running.server
    finally:
        running.stop()
    log = open(running.server.log_path).read()
    assert re.search(r"serving 'tiny' on http://127.0.0.1:\d+ \(engine [\d.]+ s", log), log
    assert "shutting down" in log, log
    assert re.search(r"generation [\d.]+ tok/s, running \d+, waiting \d+, KV cache", log), log


@pytest.fixture(scope="session")
def openai_client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
