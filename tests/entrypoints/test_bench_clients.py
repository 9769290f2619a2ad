"""The streaming clients of `zllm bench serve`, against a real server: every token counted."""

from zllm.bench.stream_clients import drive, summarize

from tests.entrypoints.conftest import API_KEY, MODEL_NAME


def test_bench_clients_in_two_processes_count_every_streamed_token(server):
    requests = [([11 + i, 12, 13, 14], max_tokens, 0.0) for i, max_tokens in enumerate([3, 9, 5])]
    results = drive(server.url, requests, procs=2, model=MODEL_NAME, api_key=API_KEY)

    assert len(results) == 3 and all(r["error"] is None for r in results)
    counted = sorted(sum(n for _, n in r["arrivals"]) for r in results)
    assert counted == [3, 5, 9]
    summary = summarize(results)
    assert summary["errors"] == 0 and summary["output_tokens"] == 17
    assert summary["out_tok_per_s"] > 0 and summary["send_late_max_ms"] >= 0
