"""Sweep arithmetic (goodput, percentiles with failures, the SLO verdict, ratios), the burst and
Poisson schedules, and the CPU accounting's /proc parsing."""

from __future__ import annotations

import math
import os
import random

import pytest

from kvgate.loadtest.corpus import Vocabulary, load_tokenizer
from kvgate.loadtest.cpu import CpuMeter, CpuSnapshot, bottleneck, parse_pid_stat, parse_proc_stat, usage
from kvgate.loadtest.stream import RequestRecord
from kvgate.loadtest.sweep import (
    aggregate,
    goodput,
    highest_rate_meeting_slo,
    percentile,
    ratios_to_baseline,
    run_figures,
    slo_verdicts,
    ttft_ms_with_failures,
)
from kvgate.loadtest.trace import ReplayConfig, TraceRequest
from kvgate.loadtest.workloads import (
    WorkloadConfig,
    burst_requests,
    burst_schedule,
    poisson_arrivals,
    trace_time_scale,
)
from tests.helpers import TINY_MODEL


def rec(ttft_s: float | None, ok: bool = True) -> RequestRecord:
    r = RequestRecord("w", 0, 0, 0.0, status=200 if ok else 503, ttft_s=ttft_s)
    if not ok:
        r.error = "HTTP 503"
    return r


# -- sweep arithmetic ----------------------------------------------------------------------


def test_goodput_counts_successes_within_the_slo():
    records = [rec(0.1), rec(0.5), rec(1.0), rec(1.5), rec(0.2, ok=False), rec(None)]
    # within 1.0 s: 0.1, 0.5 and exactly 1.0; the failure and the one with no first token do not count
    assert goodput(records, 1.0, 2.0) == pytest.approx(3 / 2.0)
    assert goodput(records, 0.05, 2.0) == 0.0
    assert goodput(records, 1.0, 0.0) == 0.0


def test_a_warm_up_leaves_the_first_requests_out_of_the_figures():
    def at(start_s: float, ttft_s: float, ok: bool = True) -> RequestRecord:
        r = RequestRecord("w", 0, 0, start_s, status=200 if ok else 503, ttft_s=ttft_s)
        if not ok:
            r.error = "HTTP 503"
        return r

    # The first 5 s: slow cold starts and a failure; after them, fast answers.
    records = [at(0.5, 3.0), at(2.0, 4.0), at(4.9, 0.1, ok=False)] + [at(5.0 + i, 0.2) for i in range(5)]
    whole = run_figures("kv", 1.0, 0, records, 10.0, 1.0, None)
    warm = run_figures("kv", 1.0, 0, records, 10.0, 1.0, None, warmup_s=5.0)
    assert whole.requests == 8 and whole.errors == 1 and math.isinf(whole.ttft_p99_ms)
    assert whole.goodput == pytest.approx(5 / 10.0)
    assert warm.requests == 5 and warm.errors == 0
    assert warm.ttft_p50_ms == pytest.approx(200.0) and warm.ttft_p99_ms == pytest.approx(200.0)
    # Goodput and throughput over the 5 s left after the warm-up.
    assert warm.goodput == pytest.approx(5 / 5.0) and warm.requests_per_s == pytest.approx(5 / 5.0)


def test_failed_requests_count_as_infinite_ttft():
    records = [rec(0.1), rec(0.2), rec(0.3), rec(None, ok=False)]
    ttft = ttft_ms_with_failures(records)
    assert ttft[:3] == pytest.approx([100.0, 200.0, 300.0]) and math.isinf(ttft[3])
    assert percentile(ttft, 50) == pytest.approx(300.0)  # next-higher rank when failures are present
    assert math.isinf(percentile(ttft, 99))
    assert percentile([100.0, 200.0], 50) == pytest.approx(150.0)  # linear without failures
    assert percentile([], 50) is None


def test_highest_rate_meeting_the_slo_stops_at_the_first_miss():
    assert highest_rate_meeting_slo({1: 100.0, 2: 500.0, 4: 2000.0, 8: 300.0}, 1000.0) == 2
    assert highest_rate_meeting_slo({1: 100.0, 2: 1000.0}, 1000.0) == 2  # at the SLO meets it
    assert highest_rate_meeting_slo({1: 1500.0, 2: 100.0}, 1000.0) is None
    assert highest_rate_meeting_slo({1: 100.0, 2: None}, 1000.0) == 1
    assert highest_rate_meeting_slo({}, 1000.0) is None


def figures(mode: str, rate: float, repeat: int, ttfts: list[float], cached: float):
    return run_figures(mode, rate, repeat, [rec(t) for t in ttfts], 10.0, 1.0, cached, {"pooled_lru_fraction": 0.5})


def test_repeats_aggregate_to_median_and_spread_and_ratios_use_medians():
    runs = [
        figures("kv", 1, 0, [0.1] * 10, 0.4),
        figures("kv", 1, 1, [0.3] * 10, 0.5),
        figures("kv", 1, 2, [0.2] * 10, 0.45),
        figures("round-robin", 1, 0, [0.4] * 10, 0.2),
        figures("round-robin", 1, 1, [0.4] * 10, 0.3),
        figures("kv", 2, 0, [2.0] * 10, 0.4),
        figures("round-robin", 2, 0, [0.5] * 9 + [3.0], 0.2),
    ]
    cells = aggregate(runs)
    assert [(c.mode, c.rate, len(c.runs)) for c in cells] == [
        ("kv", 1, 3),
        ("round-robin", 1, 2),
        ("kv", 2, 1),
        ("round-robin", 2, 1),
    ]
    kv1 = cells[0].metrics
    assert kv1["ttft_p50_ms"].median == pytest.approx(200.0)
    assert (kv1["ttft_p50_ms"].low, kv1["ttft_p50_ms"].high) == pytest.approx((100.0, 300.0))
    assert kv1["goodput"].median == pytest.approx(1.0)  # 10 requests in 10 s, all within 1 s
    assert kv1["measured_of_pooled"].median == pytest.approx(0.9)
    ratios = {(m, r): x for m, r, x in ratios_to_baseline(cells, "round-robin")}
    assert ratios[("kv", 1)]["ttft_p50_ms"] == pytest.approx(200.0 / 400.0)
    assert ratios[("kv", 1)]["cached_fraction"] == pytest.approx(0.45 / 0.25)
    assert ratios[("kv", 2)]["goodput"] == pytest.approx(0.0 / 0.9)
    # kv misses the 1 s SLO at p90 at rate 2; round-robin's p90 (0.5 s) meets it.
    assert slo_verdicts(cells, 1000.0) == {"kv": 1, "round-robin": 2}


def test_the_report_states_the_sustainable_rate_against_round_robin():
    from kvgate.loadtest.report import sweep_tables

    def runs(kv_p90s: dict[float, float]) -> list:
        out = []
        for rate, rr in ((16, 0.5), (18, 0.9), (20, 1.5), (22, 3.0)):
            out.append(figures("round-robin", rate, 0, [rr] * 10, 0.1))
            out.append(figures("kv", rate, 0, [kv_p90s[rate]] * 10, 0.2))
        return out

    text = "\n".join(sweep_tables(aggregate(runs({16: 0.3, 18: 0.4, 20: 0.8, 22: 1.2})), 1.0))
    assert "kv / round-robin **1.11x**" in text  # 20 vs 18 req/s
    text = "\n".join(sweep_tables(aggregate(runs({16: 0.3, 18: 0.4, 20: 0.8, 22: 0.9})), 1.0))
    assert "kv / round-robin **≥ 1.22x**" in text  # met at the top of the grid: a lower bound
    text = "\n".join(sweep_tables(aggregate(runs({16: 1.3, 18: 0.4, 20: 0.8, 22: 0.9})), 1.0))
    assert "sustainable rate" not in text  # kv met it at no rate from the lowest up


# -- schedules -----------------------------------------------------------------------------


def test_burst_schedule_puts_each_burst_within_its_window():
    sched = burst_schedule(period_s=1.0, size=3, window_s=0.1, duration_s=2.5, seed=7)
    assert len(sched) == 9
    assert [a.offset_s for a in sched] == sorted(a.offset_s for a in sched)
    for b in range(3):
        burst = [a for a in sched if a.burst == b]
        assert sorted(a.index for a in burst) == [0, 1, 2]
        assert min(a.offset_s for a in burst) == pytest.approx(b * 1.0)  # the first at the burst's start
        assert all(b <= a.offset_s < b + 0.1 for a in burst)
    assert sched == burst_schedule(1.0, 3, 0.1, 2.5, seed=7)  # seeded
    assert sched != burst_schedule(1.0, 3, 0.1, 2.5, seed=8)
    assert len(burst_schedule(2.0, 4, 0.0, 2.0, 0)) == 4  # a burst at t = duration is not sent
    with pytest.raises(ValueError):
        burst_schedule(0.0, 3, 0.1, 1.0, 0)


def test_burst_requests_share_their_document_and_only_it():
    vocab = Vocabulary.from_tokenizer(load_tokenizer(str(TINY_MODEL)))
    cfg = WorkloadConfig(burst_doc_tokens=200, burst_size=4, question_tokens=16, seed=3)
    reqs = burst_requests(vocab, cfg, "m", duration_s=2.0, period_s=1.0)
    assert len(reqs) == 8 and all(r.spec.workload == "burst" for r in reqs)
    texts = {(r.spec.user, r.spec.turn): r.spec.body["messages"][0]["content"] for r in reqs}
    words = {k: t.split(" ")[1:] for k, t in texts.items()}  # each word carries its leading space
    assert all(len(w) == 216 for w in words.values())
    doc0, doc1 = words[(0, 0)][:200], words[(1, 0)][:200]
    assert all(w[:200] == doc0 for (b, _), w in words.items() if b == 0)
    assert all(w[:200] == doc1 for (b, _), w in words.items() if b == 1)
    assert doc0[:8] != doc1[:8]
    assert len({tuple(w[200:]) for w in words.values()}) == 8  # every question is fresh
    assert all(r.spec.body["stream"] and r.spec.body["max_tokens"] == cfg.max_tokens for r in reqs)


def test_poisson_arrivals_are_seeded_and_near_the_rate():
    arrivals = poisson_arrivals(20.0, 50.0, seed=1)
    assert arrivals == poisson_arrivals(20.0, 50.0, seed=1) and arrivals != poisson_arrivals(20.0, 50.0, seed=2)
    assert all(0 <= t < 50.0 for t in arrivals) and arrivals == sorted(arrivals)
    assert 900 < len(arrivals) < 1100  # 1000 expected; sd ~32
    with pytest.raises(ValueError):
        poisson_arrivals(0, 1.0, 0)


def test_trace_time_scale_hits_the_rate():
    trace = [TraceRequest(i * 500, 10, 1, (i,)) for i in range(11)]  # 2 req/s natively
    assert trace_time_scale(trace, ReplayConfig(), 4.0) == pytest.approx(0.5)
    assert trace_time_scale(trace, ReplayConfig(skip=5, max_requests=3), 1.0) == pytest.approx(2.0)


# -- CPU accounting ------------------------------------------------------------------------

PROC_STAT = """cpu  100 5 50 800 20 3 2 10 7 0
cpu0 50 2 25 400 10 1 1 5 3 0
intr 12345
"""


def test_proc_stat_busy_and_total():
    busy, total = parse_proc_stat(PROC_STAT)
    assert total == 100 + 5 + 50 + 800 + 20 + 3 + 2 + 10  # guest is already inside user
    assert busy == total - 800 - 20
    with pytest.raises(ValueError):
        parse_proc_stat("intr 1\n")


def test_pid_stat_survives_odd_command_names():
    fields = ["S"] + [str(i) for i in range(4, 14)] + ["250", "75"] + ["0"] * 30
    text = "4242 (my (odd) proc) " + " ".join(fields)
    assert parse_pid_stat(text) == 325


def test_usage_and_the_bottleneck_flag():
    before = CpuSnapshot(10.0, (1000, 2000), {"gateway": 100, "w0": 50, "gone": 5})
    after = CpuSnapshot(12.0, (1300, 2400), {"gateway": 290, "w0": 70, "gone": None})
    u = usage(before, after, ticks_per_s=100.0, cpus=2)
    assert u.machine_busy == pytest.approx(300 / 400)
    assert u.process_cores == pytest.approx({"gateway": 0.95, "w0": 0.1})
    flags = bottleneck(u.to_json())
    assert any(f.startswith("gateway at 0.95 cores") for f in flags)
    calm = usage(CpuSnapshot(0.0, (0, 1000), {"gateway": 0}), CpuSnapshot(1.0, (500, 2000), {"gateway": 30}), 100.0, 2)
    assert calm.machine_busy == pytest.approx(0.5) and bottleneck(calm.to_json()) == []
    busy = usage(CpuSnapshot(0.0, (0, 1000), {}), CpuSnapshot(1.0, (950, 2000), {}), 100.0, 2)
    assert bottleneck(busy.to_json())[0].startswith("machine 95% busy")
    assert bottleneck(None) == []


def test_cpu_meter_reads_this_process():
    meter = CpuMeter({"me": os.getpid()})
    meter.start()
    rng = random.Random(0)
    sum(rng.randrange(3) for _ in range(200_000))  # burn a little CPU
    u = meter.stop()
    assert u.wall_s > 0 and "me" in u.process_cores and u.process_cores["me"] >= 0.0
    assert u.machine_busy is not None and 0.0 <= u.machine_busy <= 1.0
