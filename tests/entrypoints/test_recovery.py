"""Recovery from worker death through `zllm serve` (TP=2 on Ray): 16 streaming clients see a
pause, /health says "recovering" (503) and then 200, and every stream's text equals the
undisturbed run's, each token delivered once."""

from __future__ import annotations

import json
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import ray

from tests.conftest import PROMPTS
from tests.entrypoints.conftest import MODEL_NAME, start_server, wait_until

NUM_STREAMS = 16
MAX_TOKENS = 48


def worker_pids() -> list[int]:
    """The pids of the zllm worker actors running in this Ray session (the server's), in rank
    order (their names end in -rank<N>)."""
    actors = sorted((a for a in ray.util.list_named_actors(all_namespaces=True)
                     if a["name"].startswith("zllm-worker-")), key=lambda a: a["name"])
    handles = [ray.get_actor(a["name"], namespace=a["namespace"]) for a in actors]
    return ray.get([h.get_pid.remote() for h in handles])


class Streams:
    """NUM_STREAMS concurrent completion streams; each one's text and usage as chunks arrive."""

    def __init__(self, client) -> None:
        self.client = client
        self.chunks = [0] * NUM_STREAMS
        self.lock = threading.Lock()

    def run_one(self, k: int) -> tuple[str, list[int]]:
        stream = self.client.completions.create(
            model=MODEL_NAME, prompt=f"{PROMPTS[k % len(PROMPTS)]} #{k}", max_tokens=MAX_TOKENS,
            temperature=0, stream=True,
            extra_body={"ignore_eos": True, "stream_options": {"continuous_usage_stats": True}})
        text, counts = "", []
        for chunk in stream:
            assert chunk.choices, chunk  # an error event has none
            text += chunk.choices[0].text
            counts.append(chunk.usage.completion_tokens)
            with self.lock:
                self.chunks[k] += 1
        return text, counts

    def run_all(self) -> list[tuple[str, list[int]]]:
        with ThreadPoolExecutor(NUM_STREAMS) as pool:
            return list(pool.map(self.run_one, range(NUM_STREAMS)))


def test_sixteen_streams_resume_after_a_rank_is_killed(ray_session, gqa_model, tmp_path):
    import openai

    extra = (f"parallel:\n  tensor_parallel_size: 2\n  ray_address: {ray_session}\n"
             "  execute_timeout_s: 30\n")
    running = start_server(gqa_model, tmp_path, extra)
    server = running.server
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="test-key", max_retries=0)
        undisturbed = [text for text, _ in Streams(client).run_all()]

        pids = worker_pids()
        assert len(pids) == 2
        streams = Streams(client)
        results: list = []
        runner = threading.Thread(target=lambda: results.extend(streams.run_all()))
        runner.start()
        wait_until(lambda: min(streams.chunks) >= 2, 60, "every stream's first tokens")
        os.kill(pids[1], signal.SIGKILL)

        health = []

        def health_is(status: int) -> bool:
            code, body = server.request("GET", "/health", api_key=None)
            health.append((code, json.loads(body)))
            return code == status
        wait_until(lambda: health_is(503), 30, "/health to report recovering")
        assert health[-1][1]["status"] == "recovering" and "rank 1" in health[-1][1]["message"], \
            health[-1]
        wait_until(lambda: health_is(200), 120, "/health to be ok again")
        runner.join(120)
        assert not runner.is_alive()

        assert [text for text, _ in results] == undisturbed
        for _, counts in results:  # cumulative token counts: nothing repeated, nothing skipped
            assert counts == sorted(counts) and counts[-1] == MAX_TOKENS
        assert set(worker_pids()).isdisjoint(pids)
        assert server.metrics()["zllm_num_requests_running"] == 0
    finally:
        assert running.stop() == 0
