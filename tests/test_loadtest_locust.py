"""The locust users, headless for a few seconds against a real gateway and real simulated workers."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from kvgate.loadtest.stack import Stack, StackConfig
from tests.helpers import python_module

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def gateway_url(tmp_path_factory):
    with Stack(StackConfig(workers=2, settle_s=0.5), "kv", tmp_path_factory.mktemp("stack")) as stack:
        yield stack.gateway_url


def test_locust_headless_runs_every_user_class(gateway_url, tmp_path):
    records = tmp_path / "records.jsonl"
    proc = python_module(
        "locust",
        "-f",
        "loadtest/locustfile.py",
        "--headless",
        "-H",
        gateway_url,
        "-u",
        4,
        "-r",
        4,
        "-t",
        "5s",
        "--only-summary",
        "--json-file",
        tmp_path / "stats",
        "--records",
        records,
        "--seed",
        3,
        "--first-turn-tokens",
        200,
        "--turn-tokens",
        16,
        "--max-tokens",
        6,
        "--system-prompt-tokens",
        256,
        "--prompt-tokens",
        100,
        "--max-requests",
        5,
        "--time-scale",
        0.01,
        "--length-scale",
        0.05,
        "--output-scale",
        0.1,
        "MultiTurnUser",
        "SharedPrefixUser",
        "NoSharingUser",
        "TraceReplayUser",
        log_path=tmp_path / "locust.log",
    )
    try:
        assert proc.popen.wait(timeout=90) == 0, proc.log()
    finally:
        proc.stop()

    recs = [json.loads(line) for line in records.read_text().splitlines()]
    by_workload = Counter(r["workload"] for r in recs)
    assert set(by_workload) == {"multi-turn", "shared-prefix", "no-sharing", "trace"}
    # The replay never goes past --max-requests (how many it reaches in 5 s depends on the machine).
    assert 1 <= by_workload["trace"] <= 5
    assert sorted(r["user"] for r in recs if r["workload"] == "trace") == list(range(by_workload["trace"]))
    assert all(r["status"] == 200 and r["error"] is None and r["worker"] in ("w0", "w1") for r in recs)
    assert all(r["ttft_s"] > 0 and r["cached_tokens"] is not None for r in recs)
    chat = [r for r in recs if r["workload"] != "trace"]
    assert all(len(r["itl_s"]) == 5 for r in chat)  # 6 tokens -> 5 gaps
    # Later turns of a conversation find their prefix cached (kv routing, same conversation).
    assert any(r["cached_tokens"] >= 192 for r in recs if r["workload"] == "multi-turn" and r["turn"] > 0)

    # Locust's final stats (--json-file is written after the run; its CSV may lag a second).
    stats = {(e["method"], e["name"]): e["num_requests"] for e in json.loads((tmp_path / "stats.json").read_text())}
    for workload, n in by_workload.items():
        for kind in ("TTFT", "E2E", "CACHED"):
            assert stats[(kind, workload)] == n
        assert stats[("ITL", workload)] == sum(len(r["itl_s"]) for r in recs if r["workload"] == workload)
    workers = {name: n for (kind, name), n in stats.items() if kind == "WORKER"}
    assert workers == Counter(r["worker"] for r in recs)
