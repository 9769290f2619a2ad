"""Processes live and die together: the engine core's death ends the server (non-zero, so that a
supervisor restarts it), the frontend's death ends the core and its workers, and two API server
processes share one engine core."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

from zllm import LLM, SamplingParams
from tests.conftest import PROMPTS
from tests.entrypoints.conftest import API_KEY, MODEL_NAME, start_server, wait_until


def _ppids() -> dict[int, int]:
    ppid = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            ppid[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return ppid


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for child, parent in _ppids().items():
        children.setdefault(parent, []).append(child)
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def cmdline(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped counts as gone)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _post(url: str, body: dict) -> http.client.HTTPResponse:
    parsed = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=120)
    conn.request("POST", "/v1/completions", json.dumps({"model": MODEL_NAME, **body}),
                 {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    return conn.getresponse()


def test_killing_the_engine_core_fails_requests_and_the_server_exits_nonzero(gqa_model, tmp_path):
    running = start_server(gqa_model, tmp_path)
    server = running.server
    try:
        (core_pid,) = [p for p in descendants(running.proc.pid) if "zllm.engine.core_proc" in cmdline(p)]
        long = {"prompt": "Hello", "max_tokens": 1500, "temperature": 0, "ignore_eos": True}
        results = {}
        plain = threading.Thread(target=lambda: results.update(
            plain=(lambda r: (r.status, json.loads(r.read())))(_post(server.url, long))))
        plain.start()
        stream = _post(server.url, {**long, "stream": True})
        assert stream.status == 200 and stream.readline().startswith(b"data: ")
        wait_until(lambda: server.metrics()["zllm_num_requests_running"] == 2, 30, "both requests")
        os.kill(core_pid, signal.SIGKILL)
        health, metrics = set(), set()
        while running.proc.poll() is None:
            try:
                health.add(server.request("GET", "/health", api_key=None)[0])
                metrics.add(server.request("GET", "/metrics")[0])
            except OSError:
                pass
            wait_until(lambda: True, 0.05, "")
        assert running.proc.returncode != 0
        assert 503 in health
        assert metrics <= {503}, metrics  # no stale gauge of the dead core's running requests
        events = [line for line in stream.read().split(b"\n") if line.startswith(b"data: ")]
        assert b'"error"' in events[-2] and events[-1] == b"data: [DONE]"
        plain.join(30)
        status, body = results["plain"]
        assert status == 500 and "engine core" in body["error"]["message"]
    finally:
        running.stop()


def test_killing_the_frontend_takes_the_core_and_its_ray_workers_down(gqa_model):
    script = (f"from zllm import LLM\n"
              f"llm = LLM({gqa_model!r}, device='cpu', tensor_parallel_size=2, num_kv_blocks=64)\n"
              f"print('ready', flush=True)\n"
              f"import time; time.sleep(600)\n")
    frontend = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert frontend.stdout.readline() == b"ready\n"
        tree = descendants(frontend.pid)
        names = [cmdline(p) for p in tree]
        assert any("zllm.engine.core_proc" in n for n in names)
        assert sum("ray::RayWorker" in n for n in names) == 2, names
        frontend.kill()
        frontend.wait()
        wait_until(lambda: not any(alive(p) for p in tree), 10,
                   "the engine core and every Ray process to exit")
    finally:
        if frontend.poll() is None:
            frontend.kill()


def test_two_api_servers_serve_one_engine_core(gqa_model, tmp_path):
    prompts = [f"{p} #{i}" for i, p in enumerate(PROMPTS * 3)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    with LLM(gqa_model, device="cpu") as llm:
        expected = [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]
    running = start_server(gqa_model, tmp_path, "  api_server_count: 2\n")
    server = running.server
    try:
        processes = descendants(running.proc.pid)
        assert sum("zllm.engine.core_proc" in cmdline(p) for p in processes) == 1
        assert sum("zllm.entrypoints.api_server" in cmdline(p) for p in processes) == 2
        seen = set()

        def both_listening() -> bool:  # fresh connections spread over both (SO_REUSEPORT)
            parsed = urllib.parse.urlparse(server.url)
            conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=10)
            conn.request("GET", "/health")
            seen.add(conn.getresponse().getheader("X-Zllm-Api-Server"))
            return seen == {"0", "1"}

        wait_until(both_listening, 60, "both API servers to answer")
        before = server.metrics()

        def complete(prompt: str) -> tuple[str, str]:
            response = _post(server.url, {"prompt": prompt, "max_tokens": 8, "temperature": 0,
                                          "ignore_eos": True, "stream": prompt.endswith("0")})
            body = response.read().decode()
            if body.startswith("data: "):
                chunks = [json.loads(line[6:]) for line in body.split("\n")
                          if line.startswith("data: {")]
                text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
            else:
                text = json.loads(body)["choices"][0]["text"]
            return text, response.getheader("X-Zllm-Api-Server")

        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(complete, prompts))
        assert [text for text, _ in results] == expected
        assert {index for _, index in results} == {"0", "1"}  # both answered
        # The core keeps the metrics, so either API server reports all requests.
        after = server.metrics()
        assert after["zllm_generation_tokens_total"] - before["zllm_generation_tokens_total"] == \
            8 * len(prompts)
        assert running.stop() == 0
        assert not any(alive(p) for p in processes)
    finally:
        running.stop()


def test_a_core_that_fails_at_start_up_ends_the_api_servers_started_beside_it(gqa_model, tmp_path):
    # The API servers start while the core does; the core then refuses the config. zllm serve
    # must exit non-zero with the core's own message and leave no process behind.
    config = tmp_path / "serve.yaml"
    config.write_text(f"model:\n  model: {gqa_model}\n  max_model_len: 999999\n"
                      "device:\n  device: cpu\nserver:\n  api_server_count: 2\n")
    proc = subprocess.Popen([sys.executable, "-m", "zllm", "serve", str(config), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen: set[int] = set()

    def exited() -> bool:  # noting every process it starts, until it exits
        seen.update(descendants(proc.pid))
        return proc.poll() is not None

    try:
        wait_until(exited, 60, "zllm serve to exit")
    finally:
        proc.kill()
    output = proc.stdout.read().decode()
    assert proc.returncode != 0
    assert "'max_model_len' = 999999" in output and "max_position_embeddings" in output
    wait_until(lambda: not any(alive(p) for p in seen), 10, "every process it started to exit")
