"""Clients that stop reading: a stream that falls too far behind is aborted and its KV blocks
freed, and SIGTERM ends the server within shutdown_timeout_s whatever the clients do."""

from __future__ import annotations

import json
import socket
import time
import urllib.parse

from tests.entrypoints.conftest import API_KEY, MODEL_NAME, start_server, wait_until

SHUTDOWN_TIMEOUT_S = 6.0


def _send_only(url: str, body: bytes, complete: bool = True) -> socket.socket:
    """A client that sends a request (all of it, or all but its last byte) and never reads."""
    parsed = urllib.parse.urlparse(url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((parsed.hostname, parsed.port))
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {parsed.hostname}\r\n"
            f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    sock.sendall(head + (body if complete else body[:-1]))
    return sock


def _stream_body(**fields) -> bytes:
    return json.dumps({"model": MODEL_NAME, "prompt": "Hello", "stream": True, "temperature": 0,
                       "ignore_eos": True, **fields}).encode()


def test_a_client_that_stops_reading_is_aborted_and_sigterm_ends_in_time(gqa_model, tmp_path):
    running = start_server(gqa_model, tmp_path, f"  stream_buffer_tokens: 64\n"
                                                f"  shutdown_timeout_s: {SHUTDOWN_TIMEOUT_S}\n")
    server = running.server
    clients = []
    try:
        before = server.metrics()['zllm_request_finished_total{finished_reason="abort"}']
        # 128 samples with 20 log-probabilities each: about 100 KB of events a step, so the
        # socket buffers (a few MB) fill long before the 100 tokens are done.
        clients.append(_send_only(server.url, _stream_body(n=128, max_tokens=100, logprobs=20)))

        def aborted_and_freed() -> bool:
            m = server.metrics()
            return (m['zllm_request_finished_total{finished_reason="abort"}'] == before + 128
                    and m["zllm_num_requests_running"] == 0 and m["zllm_kv_cache_usage_ratio"] == 0)

        wait_until(aborted_and_freed, 120, "the slow reader's 128 samples to be aborted")
        assert m_finished(server, "length") == 0  # none ran to its end
        assert "tokens wait for a client that does not read; aborting it" in open(
            server.log_path).read()

        # A stream still generating (its client is not reading, but its events fit in the
        # socket buffers) and a request whose body never completes: neither holds SIGTERM up.
        clients.append(_send_only(server.url, _stream_body(max_tokens=1500)))
        clients.append(_send_only(server.url, _stream_body(max_tokens=5), complete=False))
        wait_until(lambda: server.metrics()["zllm_num_requests_running"] == 1, 30,
                   "the long stream to run")
        started = time.monotonic()
        running.proc.terminate()
        code = running.proc.wait(timeout=60)
        took = time.monotonic() - started
        assert code == 0
        # (A generous bound: the process also starts and ends Python, on a loaded machine.)
        assert took < SHUTDOWN_TIMEOUT_S + 5, f"SIGTERM took {took:.1f} s"
    finally:
        for sock in clients:
            sock.close()
        running.stop()


def m_finished(server, reason: str) -> float:
    return server.metrics().get(f'zllm_request_finished_total{{finished_reason="{reason}"}}', 0.0)
