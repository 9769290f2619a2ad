"""/health tells the truth: it turns 503 when a worker dies, even with no request in flight to
notice it, and the group found dead is rebuilt before the next request comes."""

from __future__ import annotations

import json
import os
import signal
import time

from tests.entrypoints.conftest import MODEL_NAME, start_server, wait_until
from tests.entrypoints.test_lifecycle import cmdline, descendants


def test_health_turns_503_when_an_idle_ray_worker_is_killed(gqa_model, tmp_path):
    running = start_server(gqa_model, tmp_path, "parallel:\n  distributed_executor_backend: ray\n")
    server = running.server
    try:
        status, body = server.post_json("/v1/completions", {
            "model": MODEL_NAME, "prompt": "Hello", "max_tokens": 4, "temperature": 0})
        assert status == 200, body
        (worker,) = [p for p in descendants(running.proc.pid) if "ray::RayWorker" in cmdline(p)]
        assert server.request("GET", "/health", api_key=None)[0] == 200
        assert server.metrics()["zllm_data_plane_rejected_frames_total"] == 0
        os.kill(worker, signal.SIGKILL)
        killed = time.monotonic()
        last: list[tuple[int, bytes]] = []

        def unhealthy() -> bool:
            last[:] = [server.request("GET", "/health", api_key=None)]
            return last[0][0] == 503

        wait_until(unhealthy, 30, "/health to answer 503 after the worker was killed")
        print(f"/health turned 503 {time.monotonic() - killed:.2f} s after SIGKILL")
        reply = json.loads(last[0][1])
        assert reply["status"] == "recovering" and "rank 0" in reply["message"], reply
        # Found dead while idle, the group is rebuilt at once, not at the next request.
        wait_until(lambda: server.request("GET", "/health", api_key=None)[0] == 200, 120,
                   "/health to answer 200 once the worker group is rebuilt")
        status, again = server.post_json("/v1/completions", {
            "model": MODEL_NAME, "prompt": "Hello", "max_tokens": 4, "temperature": 0})
        assert status == 200 and again["choices"][0]["text"] == body["choices"][0]["text"]
    finally:
        running.stop()
