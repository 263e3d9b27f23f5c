"""Rate-sweep arithmetic: per-run figures, their spread over repeats, goodput, the SLO verdict.

A sweep runs every mode at each offered rate (open-loop arrivals), ``repeats`` times.
Per run: TTFT percentiles where a failed request counts as an infinite TTFT (it missed
any SLO), and **goodput**, the requests per second that completed with a TTFT within the
SLO. Per (mode, rate): the median over repeats and the spread (min-max). Per mode: the
highest offered rate at which the median p90 TTFT meets the SLO, counting up from the
lowest rate and stopping at the first rate that misses it (a lucky run past the knee
does not count). Then each mode against a baseline (round-robin): ratios of the medians.

Pure: no I/O; the report module renders what this computes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvgate.loadtest.stream import RequestRecord

QUANTILES = (50, 90, 99)
METRICS = ("ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "goodput", "requests_per_s", "cached_fraction")


def ttft_ms_with_failures(records: Iterable[RequestRecord]) -> list[float]:
    """Every request's TTFT in ms; a failed one (or one with no first token) is +inf."""
    return [r.ttft_s * 1000.0 if r.ok and r.ttft_s is not None else math.inf for r in records]


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile, linearly interpolated; with infinities (failed requests) the
    next-higher value instead, so a percentile is infinite only if a failure reaches it.
    None for no values."""
    if not values:
        return None
    arr = np.asarray(values, dtype=float)
    if np.isinf(arr).any():
        return float(np.percentile(arr, q, method="higher"))
    return float(np.percentile(arr, q))


def goodput(records: Iterable[RequestRecord], slo_ttft_s: float, duration_s: float) -> float:
    """Requests per second that succeeded with TTFT <= the SLO, over ``duration_s``."""
    if duration_s <= 0:
        return 0.0
    good = sum(1 for r in records if r.ok and r.ttft_s is not None and r.ttft_s <= slo_ttft_s)
    return good / duration_s


@dataclass
class RunFigures:
    mode: str
    rate: float | None
    repeat: int
    ttft_p50_ms: float | None
    ttft_p90_ms: float | None
    ttft_p99_ms: float | None
    goodput: float
    requests_per_s: float
    cached_fraction: float | None  # measured (usage cached_tokens / prompt_tokens)
    pooled_lru_fraction: float | None = None  # the oracle
    infinite_fraction: float | None = None
    cpu_flags: list[str] = field(default_factory=list)
    machine_busy: float | None = None
    requests: int = 0
    errors: int = 0

    @property
    def measured_of_pooled(self) -> float | None:
        if self.cached_fraction is None or not self.pooled_lru_fraction:
            return None
        return self.cached_fraction / self.pooled_lru_fraction


def run_figures(
    mode: str,
    rate: float | None,
    repeat: int,
    records: Sequence[RequestRecord],
    duration_s: float,
    slo_ttft_s: float,
    cached_fraction: float | None,
    oracle: Mapping[str, Any] | None = None,
    cpu_flags: Sequence[str] = (),
    machine_busy: float | None = None,
    warmup_s: float = 0.0,
) -> RunFigures:
    """One run's figures. With ``warmup_s``, the TTFT percentiles, goodput and requests/s
    count only the requests sent from ``warmup_s`` on, over the rest of the run: a run's
    first seconds start with cold caches and every session on its first turn."""
    if warmup_s > 0:
        records = [r for r in records if r.start_s >= warmup_s]
        duration_s -= warmup_s
    ttft = ttft_ms_with_failures(records)
    ok = sum(1 for r in records if r.ok)
    return RunFigures(
        mode,
        rate,
        repeat,
        percentile(ttft, 50),
        percentile(ttft, 90),
        percentile(ttft, 99),
        goodput(records, slo_ttft_s, duration_s),
        ok / duration_s if duration_s > 0 else 0.0,
        cached_fraction,
        (oracle or {}).get("pooled_lru_fraction"),
        (oracle or {}).get("infinite_fraction"),
        list(cpu_flags),
        machine_busy,
        len(records),
        len(records) - ok,
    )


@dataclass
class Spread:
    median: float | None
    low: float | None
    high: float | None
    values: list[float | None]


def spread(values: Sequence[float | None]) -> Spread:
    known = [v for v in values if v is not None]
    if not known:
        return Spread(None, None, None, list(values))
    arr = np.asarray(known, dtype=float)
    med = float(np.percentile(arr, 50, method="higher")) if np.isinf(arr).any() else float(np.median(arr))
    return Spread(med, float(arr.min()), float(arr.max()), list(values))


@dataclass
class Cell:
    """One (mode, rate) over its repeats."""

    mode: str
    rate: float | None
    runs: list[RunFigures]
    metrics: dict[str, Spread]
    cpu_flagged: int  # repeats with a CPU-bottleneck flag


def aggregate(runs: Sequence[RunFigures]) -> list[Cell]:
    """Cells in first-seen (mode, rate) order."""
    groups: dict[tuple[str, float | None], list[RunFigures]] = {}
    for r in runs:
        groups.setdefault((r.mode, r.rate), []).append(r)
    cells = []
    for (mode, rate), rs in groups.items():
        metrics = {m: spread([getattr(r, m) for r in rs]) for m in METRICS}
        metrics["pooled_lru_fraction"] = spread([r.pooled_lru_fraction for r in rs])
        metrics["infinite_fraction"] = spread([r.infinite_fraction for r in rs])
        metrics["measured_of_pooled"] = spread([r.measured_of_pooled for r in rs])
        cells.append(Cell(mode, rate, list(rs), metrics, sum(1 for r in rs if r.cpu_flags)))
    return cells


def highest_rate_meeting_slo(p90_by_rate: Mapping[float, float | None], slo_ttft_ms: float) -> float | None:
    """The highest rate r such that the p90 TTFT meets the SLO at r and at every lower rate
    tested; None if the lowest rate already misses it (or there is none)."""
    best = None
    for rate in sorted(p90_by_rate):
        p90 = p90_by_rate[rate]
        if p90 is None or p90 > slo_ttft_ms:
            break
        best = rate
    return best


def slo_verdicts(cells: Sequence[Cell], slo_ttft_ms: float) -> dict[str, float | None]:
    by_mode: dict[str, dict[float, float | None]] = {}
    for c in cells:
        if c.rate is not None:
            by_mode.setdefault(c.mode, {})[c.rate] = c.metrics["ttft_p90_ms"].median
    return {mode: highest_rate_meeting_slo(p90s, slo_ttft_ms) for mode, p90s in by_mode.items()}


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b; None when either is unknown, b is 0, or both are infinite."""
    if a is None or b is None or b == 0 or (math.isinf(a) and math.isinf(b)):
        return None
    return a / b


RATIO_METRICS = ("ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "goodput", "cached_fraction")


def ratios_to_baseline(cells: Sequence[Cell], baseline: str) -> list[tuple[str, float | None, dict[str, float | None]]]:
    """(mode, rate, {metric: mode median / baseline median}) for every non-baseline cell
    whose rate the baseline also ran."""
    base = {c.rate: c for c in cells if c.mode == baseline}
    out = []
    for c in cells:
        if c.mode == baseline or c.rate not in base:
            continue
        b = base[c.rate]
        out.append((c.mode, c.rate, {m: ratio(c.metrics[m].median, b.metrics[m].median) for m in RATIO_METRICS}))
    return out
