"""GET /metrics: Prometheus' text exposition format (0.0.4), read by a strict parser written here
from the format's specification (prometheus_client is not a dependency), and the values it carries:
the running/waiting gauges against a queue the test builds, and the latency histograms' counts and
buckets against what the client saw."""

from __future__ import annotations

import math
import re
import time

from tests.entrypoints.conftest import (FIRST_TOKENS, MAX_TOKENS, join_all, queue_behind_one,
                                        wait_until)

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"^({_NAME})(?:\{{(.*)\}})? (\S+)(?: -?\d+)?$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(?:,|$)')
_SUFFIXES = {"counter": ("", "_total"), "gauge": ("",), "untyped": ("",),
             "histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count")}


def parse_prometheus(text: str) -> dict[str, dict]:
    """{family: {"type", "samples": {(name, labels): value}}}; AssertionError on anything the
    format does not allow: unknown lines, samples before or outside their family's TYPE, a TYPE
    or HELP given twice, duplicate samples, bad label syntax, or histograms whose buckets are not
    cumulative, sorted and closed by +Inf == _count."""
    families: dict[str, dict] = {}
    current = None
    assert text.endswith("\n"), "the exposition ends with a line feed"
    for line in text[:-1].split("\n"):
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                assert re.fullmatch(_NAME, parts[2]), line
                family = families.setdefault(parts[2], {"samples": {}})
                assert parts[1].lower() not in family, f"second {parts[1]}: {line}"
                if parts[1] == "TYPE":
                    assert not family["samples"], f"TYPE after samples: {line}"
                    assert len(parts) == 4 and parts[3] in _SUFFIXES, line
                family[parts[1].lower()] = parts[3] if len(parts) == 4 else ""
                current = parts[2]
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name, labels_text, value = match.groups()
        family = families.get(current)
        assert family is not None and "type" in family, f"sample before its TYPE: {line}"
        assert any(name == current + s for s in _SUFFIXES[family["type"]]), \
            f"{name} outside family {current}"
        labels = _labels(labels_text or "")
        key = (name, labels)
        assert key not in family["samples"], f"duplicate sample: {line}"
        family["samples"][key] = float(value)  # float() reads +Inf, -Inf and NaN as well
    for name, family in families.items():
        if family.get("type") == "histogram":
            _check_histogram(name, family["samples"])
    return families


def _labels(text: str) -> tuple:
    pairs, pos = [], 0
    while pos < len(text):
        match = _LABEL.match(text, pos)
        assert match, f"bad labels: {text!r}"
        pairs.append(match.groups())
        pos = match.end()
    names = [k for k, _ in pairs]
    assert len(set(names)) == len(names), f"repeated label: {text!r}"
    return tuple(pairs)


def _check_histogram(name: str, samples: dict) -> None:
    buckets = [(float(dict(labels)["le"]), v) for (n, labels), v in samples.items()
               if n == name + "_bucket"]
    bounds, counts = [b for b, _ in buckets], [c for _, c in buckets]
    assert bounds == sorted(bounds) and len(set(bounds)) == len(bounds), name
    assert bounds and math.isinf(bounds[-1]), f"{name}: no +Inf bucket"
    assert all(a <= b for a, b in zip(counts, counts[1:])), f"{name}: buckets not cumulative"
    assert counts[-1] == samples[(name + "_count", ())], f"{name}: +Inf bucket != _count"
    assert (name + "_sum", ()) in samples, f"{name}: no _sum"


def histogram(families: dict, name: str) -> tuple[dict[float, float], float, float]:
    """(cumulative count per upper bound, _count, _sum) of one histogram."""
    samples = families[name]["samples"]
    buckets = {float(dict(labels)["le"]): v for (n, labels), v in samples.items()
               if n == name + "_bucket"}
    return buckets, samples[(name + "_count", ())], samples[(name + "_sum", ())]


def scrape(server) -> dict:
    status, raw = server.request("GET", "/metrics")
    assert status == 200
    return parse_prometheus(raw.decode())


def test_metrics_gauges_and_histograms_against_a_queue_the_test_builds(short_cache_server):
    server = short_cache_server
    wait_until(lambda: server.queue_sizes() == (0, 0), 60, "an idle server")
    before = scrape(server)
    assert before["zllm_num_requests_waiting"]["type"] == "gauge"
    started, finished = time.monotonic(), []
    # The cache holds one request: the gauges must say 1 running and 0, 1, 2 waiting in turn
    # (queue_behind_one waits for each).
    threads = queue_behind_one(server, [0, 0, 0], finished)
    join_all(threads)
    elapsed = time.monotonic() - started
    wait_until(lambda: server.queue_sizes() == (0, 0), 60, "the queue to empty")
    after = scrape(server)

    ttft_before, ttft_count_before, _ = histogram(before, "zllm_time_to_first_token_seconds")
    ttft, ttft_count, ttft_sum = histogram(after, "zllm_time_to_first_token_seconds")
    assert ttft_count - ttft_count_before == 3
    # Every first token came within the client's own wall time: every bucket bounding that
    # holds all three new observations.
    for bound, count in ttft.items():
        if bound >= elapsed:
            assert count - ttft_before[bound] == 3, bound
    itl_before, itl_count_before, itl_sum_before = histogram(before,
                                                             "zllm_inter_token_latency_seconds")
    itl, itl_count, itl_sum = histogram(after, "zllm_inter_token_latency_seconds")
    assert itl_count - itl_count_before == (FIRST_TOKENS - 1) + 2 * (MAX_TOKENS - 1)
    assert 0 < itl_sum - itl_sum_before < elapsed
    for bound, count in itl.items():
        if bound >= elapsed:
            assert count - itl_before[bound] == itl_count - itl_count_before, bound
