"""Report generation from a small results object, and the metric arithmetic behind it."""

from __future__ import annotations

import itertools
import json
import random

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from kvgate.loadtest.report import BenchResults, ModeResult, render_markdown, summarize, write_report
from kvgate.loadtest.scrape import PREFIX_HITS, PREFIX_QUERIES, delta, parse_metrics, prefix_hit_rate, tier_hit_rates
from kvgate.loadtest.stream import RequestRecord

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def worker_exposition(queries: float, hits: float, running: int) -> str:
    """What a vLLM-shaped worker exposes, produced by prometheus_client itself."""
    reg = CollectorRegistry()
    q = Counter("vllm:prefix_cache_queries", "prefix cache queries (tokens)", ["model_name"], registry=reg)
    h = Counter("vllm:prefix_cache_hits", "prefix cache hits (tokens)", ["model_name"], registry=reg)
    g = Gauge("vllm:num_requests_running", "running", ["model_name"], registry=reg)
    q.labels("m").inc(queries)
    h.labels("m").inc(hits)
    g.labels("m").set(running)
    return generate_latest(reg).decode()


def records(n: int, ttft_ms: float, workers: list[str], seed: int) -> list[RequestRecord]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ttft = ttft_ms / 1000 * rng.uniform(0.5, 1.5)
        itl = [rng.uniform(0.004, 0.006) for _ in range(7)]
        out.append(
            RequestRecord(
                "multi-turn",
                i % 3,
                i // 3,
                i * 0.1,
                status=200,
                worker=workers[i % len(workers)],
                ttft_s=ttft,
                e2e_s=ttft + sum(itl),
                itl_s=itl,
                chunks=8,
                prompt_tokens=500,
                completion_tokens=8,
                cached_tokens=400,
            )
        )
    out.append(RequestRecord("multi-turn", 0, 99, 5.0, status=503, error="HTTP 503: no worker", e2e_s=0.01))
    return out


def test_prometheus_parsing_and_hit_rate():
    before = parse_metrics(worker_exposition(1000, 250, 3))
    after = parse_metrics(worker_exposition(3000, 1250, 5))
    assert before[f'{PREFIX_QUERIES}{{model_name="m"}}'] == 1000
    assert not any(k.endswith("_created") or "_created{" in k for k in before)
    d = delta(before, after)
    assert d[f'{PREFIX_HITS}{{model_name="m"}}'] == 1000
    other = delta(parse_metrics(worker_exposition(0, 0, 0)), parse_metrics(worker_exposition(1000, 0, 0)))
    assert prefix_hit_rate({"w0": d, "w1": other}) == pytest.approx(1000 / 3000)
    assert prefix_hit_rate({"w0": {}}) is None


def small_results() -> BenchResults:
    kv_metrics = delta(parse_metrics(worker_exposition(0, 0, 0)), parse_metrics(worker_exposition(1000, 800, 0)))
    rr_metrics = delta(parse_metrics(worker_exposition(0, 0, 0)), parse_metrics(worker_exposition(1000, 400, 0)))
    kv = ModeResult(
        "kv",
        records(30, 40, ["w0", "w1"], 1),
        3.0,
        {
            "kvgate_requests_total": 31.0,
            'kvgate_routing_overhead_seconds_sum{stage="tokenize"}': 0.31,
            'kvgate_routing_overhead_seconds_count{stage="tokenize"}': 31.0,
            'kvgate_routing_overhead_seconds_bucket{le="0.01",stage="tokenize"}': 30.0,
        },
        {"w0": kv_metrics, "w1": kv_metrics},
    )
    rr = ModeResult(
        "round-robin",
        records(20, 80, ["w0", "w1"], 2),
        3.0,
        {},
        {"w0": rr_metrics, "w1": {}},
        notes=["no /metrics from w1"],
    )
    return BenchResults(
        {"workload": "multi-turn", "command": "python -m kvgate.loadtest.bench --workload multi-turn", "seed": 0},
        [kv, rr],
    )


def test_summary_figures():
    s = summarize(small_results().modes[0])
    assert (s["requests"], s["ok"], s["errors"]) == (31, 30, 1)
    assert s["requests_per_s"] == pytest.approx(10.0)
    assert 20 <= s["ttft_ms"]["p50"] <= 60 <= s["ttft_ms"]["p99"] + 20
    assert 4 <= s["itl_ms"]["p50"] <= 6
    assert s["prefix_hit_rate"] == pytest.approx(0.8)
    assert s["cached_token_rate"] == pytest.approx(0.8)
    assert s["requests_per_worker"] == {"w0": 15, "w1": 15}
    assert list(s["error_kinds"]) == ["HTTP 503: no worker"]


def test_report_files_are_written_and_well_formed(tmp_path):
    results = small_results()
    paths = write_report(results, tmp_path / "rep")
    for p in paths.values():
        assert p.exists() and p.stat().st_size > 0
    for key in ("ttft_cdf", "throughput"):
        data = paths[key].read_bytes()
        assert data.startswith(PNG_MAGIC)
        import matplotlib.image

        img = matplotlib.image.imread(paths[key])
        assert img.shape[0] > 100 and img.shape[1] > 100

    md = paths["report"].read_text()
    lines = md.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = list(itertools.takewhile(lambda line: line.startswith("|"), lines[first:]))
    assert len(table) == 4  # header, separator, two modes
    widths = {line.count("|") for line in table}
    assert len(widths) == 1
    assert set(table[1].strip("|").split("|")) == {"---"}
    kv_row = [c.strip() for c in table[2].strip("|").split("|")]
    assert kv_row[0] == "kv" and kv_row[1] == "31" and kv_row[2] == "1" and kv_row[3] == "10.00"
    assert kv_row[-2] == "80.0%" and kv_row[-1] == "w0: 15, w1: 15"
    assert "TTFT p50 kv/round-robin = " in md
    assert "prefix hit rate 80.0% vs 40.0%" in md
    assert "no /metrics from w1" in md
    assert "kv: gateway time per request before forwarding (mean ms): tokenize 10.00" in md
    assert "![TTFT CDF](ttft_cdf.png)" in md

    again = BenchResults.from_json(json.loads(paths["results"].read_text()))
    assert render_markdown(again) == md
    stored = json.loads(paths["results"].read_text())
    assert stored["modes"][0]["summary"]["ok"] == 30


def test_report_with_one_mode_and_no_successes(tmp_path):
    failed = ModeResult("kv", [RequestRecord("trace", 0, 0, 0.0, status=0, error="ClientConnectorError")], 0.0)
    paths = write_report(BenchResults({"workload": "trace"}, [failed]), tmp_path)
    md = paths["report"].read_text()
    assert "| kv | 1 | 1 | 0.00 | – |" in md
    assert paths["ttft_cdf"].read_bytes().startswith(PNG_MAGIC)


def test_hit_rate_per_tier_from_simulated_workers():
    workers = {
        "w0": {
            f'{PREFIX_QUERIES}{{engine="0"}}': 1000.0,
            "vllm:external_prefix_cache_queries_total": 1000.0,
            'kvgate_sim_cached_tokens_total{tier="gpu"}': 100.0,
            'kvgate_sim_cached_tokens_total{tier="cpu"}': 500.0,
            'kvgate_sim_cached_tokens_total{tier="disk"}': 0.0,
        },
        "w1": {f'{PREFIX_QUERIES}{{engine="0"}}': 1000.0, 'kvgate_sim_cached_tokens_total{tier="cpu"}': 300.0},
    }
    assert tier_hit_rates(workers) == {"gpu": 0.05, "cpu": 0.4, "disk": 0.0}
    assert tier_hit_rates({"w": {f'{PREFIX_QUERIES}{{engine="0"}}': 10.0}}) is None  # a real vLLM: no tiers
    untiered = {"w": {f'{PREFIX_QUERIES}{{engine="0"}}': 10.0, 'kvgate_sim_cached_tokens_total{tier="gpu"}': 5.0}}
    assert tier_hit_rates(untiered) is None  # a simulated worker without CPU / disk tiers


def test_tiered_workers_count_lower_tier_hits_in_the_headline_hit_rate():
    # vLLM's prefix counter sees the GPU tier only; a CPU hit is a prompt not recomputed too.
    tiered = {
        'vllm:prefix_cache_queries_total{engine="0"}': 1000.0,
        'vllm:prefix_cache_hits_total{engine="0"}': 50.0,
        "vllm:external_prefix_cache_queries_total": 950.0,
        'kvgate_sim_cached_tokens_total{tier="gpu"}': 50.0,
        'kvgate_sim_cached_tokens_total{tier="cpu"}': 600.0,
    }
    mode = ModeResult("kv", records(10, 50, ["w0"], 3), 1.0, {}, {"w0": tiered})
    assert summarize(mode)["prefix_hit_rate"] == pytest.approx(0.65)
    plain = {'vllm:prefix_cache_queries_total{engine="0"}': 1000.0, 'vllm:prefix_cache_hits_total{engine="0"}': 50.0}
    assert summarize(ModeResult("kv", records(10, 50, ["w0"], 3), 1.0, {}, {"w0": plain}))["prefix_hit_rate"] == 0.05


def test_a_sweep_report_has_the_sweep_the_oracle_and_the_cpu_flag(tmp_path):
    runs = []
    for rate in (1.0, 2.0):
        for repeat in (0, 1):
            for mode, ttft_ms in (("kv", 100 * rate), ("round-robin", 300 * rate)):
                recs = records(10, ttft_ms, ["w0", "w1"], 0)
                for r in recs:  # exact TTFTs and cached tokens
                    r.ttft_s, r.prompt_tokens, r.cached_tokens = ttft_ms / 1000, 100, 40 if mode == "kv" else 20
                busy = 0.95 if (mode, rate, repeat) == ("kv", 2.0, 1) else 0.3
                runs.append(
                    ModeResult(
                        mode,
                        recs,
                        5.0,
                        rate=rate,
                        repeat=repeat,
                        oracle={"pooled_lru_fraction": 0.5, "infinite_fraction": 0.6, "measured_of_pooled": None},
                        cpu={"wall_s": 5.0, "machine_busy": busy, "cpus": 2, "process_cores": {"gateway": 0.2}},
                    )
                )
    results = BenchResults({"workload": "burst", "slo_ttft_s": 0.5}, runs)
    paths = write_report(results, tmp_path / "rep")
    assert paths["sweep"].read_bytes().startswith(PNG_MAGIC)
    md = paths["report"].read_text()
    assert "## Sweep" in md and "| kv | 1 | 2 | 100.0 |" in md
    # kv's TTFT (100 ms x rate) meets a 500 ms SLO at both rates, round-robin's (300 ms x rate) at 1/s only.
    assert "- kv: 2 req/s" in md and "- round-robin: 1 req/s" in md
    # records() adds one failed request per run: p99 is infinite for both (no ratio), as is
    # the ratio to round-robin's zero goodput at 2/s (its TTFT, 600 ms, misses the SLO).
    assert "| kv | 1 | 2 | 100.0 | 100.0 | ∞ | 2.00 | 2.00 | 40.0% | 50.0% | 80.0% | 0/2 |" in md
    assert "| round-robin | 2 | 2 | 600.0 | 600.0 | ∞ | 0.00 | 2.00 | 20.0% | 50.0% | 40.0% | 0/2 |" in md
    assert "| kv | 1 | 0.33 | 0.33 | – | 1.00 | 2.00 |" in md  # ratios to round-robin
    assert "| kv | 2 | 0.33 | 0.33 | – | – | 2.00 |" in md
    assert "CPU-bound runs** (1 of 8: kv @2/s #2)" in md
    assert "| kv @2/s #2 | 40.0% | 50.0% | 60.0% |" in md
    again = BenchResults.from_json(json.loads(paths["results"].read_text()))
    assert [(m.mode, m.rate, m.repeat) for m in again.modes] == [(m.mode, m.rate, m.repeat) for m in runs]
    assert render_markdown(again) == md


def test_a_sweep_with_a_warm_up_counts_only_the_requests_after_it(tmp_path):
    runs = []
    for mode in ("kv", "round-robin"):
        recs = [r for r in records(20, 100, ["w0"], 0) if r.ok]  # sent at 0.0, 0.1, ... 1.9 s
        for r in recs:
            r.ttft_s = 2.0 if r.start_s < 1.0 else 0.1  # slow while cold, fast after the first second
        runs.append(ModeResult(mode, recs, 2.0, rate=1.0, warmup_s=1.0))
    results = BenchResults({"workload": "multi-turn", "slo_ttft_s": 0.5, "warmup_s": 1.0}, runs)
    md = write_report(results, tmp_path / "rep")["report"].read_text()
    # 10 requests after the warm-up, all within the SLO, over the 1 s left: p50 100 ms, goodput 10/s.
    assert "| kv | 1 | 1 | 100.0 | 100.0 | 100.0 | 10.00 | 10.00 |" in md
    assert "first 1 s (its warm-up) are left out" in md
    assert BenchResults.from_json(json.loads((tmp_path / "rep" / "results.json").read_text())).modes[0].warmup_s == 1.0
