"""Benchmark results: the per-mode summary, ``results.json``, ``report.md`` and the PNG plots.

Owns the arithmetic from per-request records and metric deltas to the figures
users compare (requests/s, TTFT/ITL/E2E percentiles, prefix hit rate, requests
per worker) and how they are written. Takes a ``BenchResults`` and never runs
load or starts processes, so a report can be rebuilt from any results object.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvgate.loadtest.cpu import bottleneck
from kvgate.loadtest.scrape import Snapshot, prefix_hit_rate, sample_name, tier_hit_rates
from kvgate.loadtest.stream import RequestRecord
from kvgate.loadtest.sweep import (
    Cell,
    RunFigures,
    aggregate,
    ratios_to_baseline,
    run_figures,
    slo_verdicts,
)

REPORT_MD = "report.md"
RESULTS_JSON = "results.json"
TTFT_PNG = "ttft_cdf.png"
THROUGHPUT_PNG = "throughput_hit_rate.png"
SWEEP_PNG = "sweep.png"
DEFAULT_SLO_TTFT_S = 1.0
BASELINE = "round-robin"


@dataclass
class ModeResult:
    mode: str
    records: list[RequestRecord]
    duration_s: float  # first send to last answer
    gateway_metrics: Snapshot = field(default_factory=dict)  # after - before
    worker_metrics: dict[str, Snapshot] = field(default_factory=dict)  # per worker, after - before
    notes: list[str] = field(default_factory=list)
    rate: float | None = None  # offered requests/s (open-loop sweep); None: the workload's own pace
    repeat: int = 0
    oracle: dict[str, Any] | None = None  # oracle.oracle_summary
    cpu: dict[str, Any] | None = None  # cpu.CpuUsage.to_json
    warmup_s: float = 0.0  # the sweep's figures leave out requests sent before this (bench --warmup)

    @property
    def label(self) -> str:
        if self.rate is None and self.repeat == 0:
            return self.mode
        at = "" if self.rate is None else f" @{self.rate:g}/s"
        return f"{self.mode}{at} #{self.repeat + 1}"

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "rate": self.rate,
            "repeat": self.repeat,
            "oracle": self.oracle,
            "cpu": self.cpu,
            "duration_s": self.duration_s,
            "warmup_s": self.warmup_s,
            "summary": summarize(self),
            "notes": self.notes,
            "gateway_metrics": self.gateway_metrics,
            "worker_metrics": self.worker_metrics,
            "records": [r.to_json() for r in self.records],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModeResult:
        return cls(
            d["mode"],
            [RequestRecord.from_json(r) for r in d["records"]],
            d["duration_s"],
            d.get("gateway_metrics", {}),
            d.get("worker_metrics", {}),
            d.get("notes", []),
            d.get("rate"),
            d.get("repeat", 0),
            d.get("oracle"),
            d.get("cpu"),
            d.get("warmup_s", 0.0),
        )


@dataclass
class BenchResults:
    meta: dict[str, Any]  # workload, knobs, seed, command line: whatever reproduces the run
    modes: list[ModeResult]

    def to_json(self) -> dict[str, Any]:
        return {"meta": self.meta, "modes": [m.to_json() for m in self.modes]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> BenchResults:
        return cls(d["meta"], [ModeResult.from_json(m) for m in d["modes"]])


def _pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) * 1000.0 if values else None


def summarize(result: ModeResult) -> dict[str, Any]:
    ok = [r for r in result.records if r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    itl = [x for r in ok for x in r.itl_s]
    e2e = [r.e2e_s for r in ok if r.e2e_s is not None]
    reported = [r for r in ok if r.cached_tokens is not None and r.prompt_tokens]
    dur = result.duration_s
    return {
        "requests": len(result.records),
        "ok": len(ok),
        "errors": len(result.records) - len(ok),
        "duration_s": dur,
        "requests_per_s": len(ok) / dur if dur > 0 else 0.0,
        "output_tokens_per_s": sum(r.completion_tokens or r.chunks for r in ok) / dur if dur > 0 else 0.0,
        "ttft_ms": {"p50": _pct(ttft, 50), "p90": _pct(ttft, 90), "p99": _pct(ttft, 99)},
        "itl_ms": {"p50": _pct(itl, 50), "p99": _pct(itl, 99)},
        "e2e_ms": {"p50": _pct(e2e, 50), "p99": _pct(e2e, 99)},
        "prefix_hit_rate": _all_tier_hit_rate(result.worker_metrics),
        "tier_hit_rate": tier_hit_rates(result.worker_metrics),
        # What the responses said, where the server fills usage.prompt_tokens_details.
        "cached_token_rate": (
            sum(r.cached_tokens or 0 for r in reported) / sum(r.prompt_tokens or 0 for r in reported)
            if reported
            else None
        ),
        "gateway_overhead_ms": gateway_overhead_ms(result.gateway_metrics),
        "requests_per_worker": dict(sorted(Counter(r.worker for r in result.records if r.worker).items())),
        "error_kinds": dict(Counter((r.error or "")[:80] for r in result.records if not r.ok).most_common(5)),
        "oracle": result.oracle,
        "cpu": result.cpu,
        "cpu_bottleneck": bottleneck(result.cpu),
    }


def figures(result: ModeResult, slo_ttft_s: float) -> RunFigures:
    s = summarize(result)
    return run_figures(
        result.mode,
        result.rate,
        result.repeat,
        result.records,
        result.duration_s,
        slo_ttft_s,
        s["cached_token_rate"],
        result.oracle,
        s["cpu_bottleneck"],
        (result.cpu or {}).get("machine_busy"),
        result.warmup_s,
    )


ROUTING_OVERHEAD = "kvgate_routing_overhead_seconds"


def gateway_overhead_ms(gateway: Snapshot) -> dict[str, float]:
    """Mean gateway time per request by routing stage, from its ``kvgate_routing_overhead_seconds``
    histogram deltas (empty if the gateway does not expose it)."""
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for key, value in gateway.items():
        name = sample_name(key)
        stage = key.partition('stage="')[2].partition('"')[0]
        if stage and name == ROUTING_OVERHEAD + "_sum":
            sums[stage] = value
        elif stage and name == ROUTING_OVERHEAD + "_count":
            counts[stage] = value
    return {stage: 1000.0 * sums[stage] / counts[stage] for stage in sums if counts.get(stage)}


def _ms(v: float | None) -> str:
    return "–" if v is None else f"{v:.1f}"


def _rate(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def _all_tier_hit_rate(worker_metrics: Mapping[str, Snapshot]) -> float | None:
    """Prompt tokens not recomputed: vLLM's own counter covers the GPU tier only, so on
    tiered workers the hit rate is the sum over tiers (a CPU hit is a hit too)."""
    tiers = tier_hit_rates(worker_metrics)
    return sum(tiers.values()) if tiers else prefix_hit_rate(worker_metrics)


def markdown_table(summaries: Sequence[tuple[str, dict[str, Any]]]) -> str:
    head = [
        "mode",
        "requests",
        "errors",
        "req/s",
        "TTFT p50 ms",
        "TTFT p90 ms",
        "TTFT p99 ms",
        "ITL p50 ms",
        "ITL p99 ms",
        "E2E p50 ms",
        "E2E p99 ms",
        "prefix hit rate",
        "requests per worker",
    ]
    rows = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for mode, s in summaries:
        per_worker = ", ".join(f"{w}: {n}" for w, n in s["requests_per_worker"].items()) or "–"
        cells = [
            mode,
            str(s["requests"]),
            str(s["errors"]),
            f"{s['requests_per_s']:.2f}",
            _ms(s["ttft_ms"]["p50"]),
            _ms(s["ttft_ms"]["p90"]),
            _ms(s["ttft_ms"]["p99"]),
            _ms(s["itl_ms"]["p50"]),
            _ms(s["itl_ms"]["p99"]),
            _ms(s["e2e_ms"]["p50"]),
            _ms(s["e2e_ms"]["p99"]),
            _rate(s["prefix_hit_rate"]),
            per_worker,
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def tier_table(summaries: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """Hit rate per cache tier (simulated workers only); empty when no mode has tiers."""
    if not any(s.get("tier_hit_rate") for _, s in summaries):
        return ""
    rows = [
        "| mode | TTFT p50 ms | TTFT p99 ms | req/s | hit GPU | hit CPU | hit disk | hit total |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, s in summaries:
        t = s.get("tier_hit_rate") or {}
        rows.append(
            f"| {mode} | {_ms(s['ttft_ms']['p50'])} | {_ms(s['ttft_ms']['p99'])} | {s['requests_per_s']:.2f} | "
            + " | ".join(_rate(t.get(k)) for k in ("gpu", "cpu", "disk"))
            + f" | {_rate(sum(t.values()) if t else None)} |"
        )
    return "\n".join(rows)


def headline(summaries: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
    """The first mode against every other: TTFT ratios (first / other) and hit rates."""
    if len(summaries) < 2:
        return []
    base_mode, base = summaries[0]
    lines = []
    for mode, s in summaries[1:]:
        parts = []
        for q in ("p50", "p90", "p99"):
            a, b = base["ttft_ms"][q], s["ttft_ms"][q]
            if a is not None and b:
                parts.append(f"TTFT {q} {base_mode}/{mode} = {a / b:.2f}")
        parts.append(f"prefix hit rate {_rate(base['prefix_hit_rate'])} vs {_rate(s['prefix_hit_rate'])}")
        if s["requests_per_s"]:
            parts.append(f"req/s {base_mode}/{mode} = {base['requests_per_s'] / s['requests_per_s']:.2f}")
        lines.append(f"- **{base_mode} vs {mode}**: " + "; ".join(parts))
    return lines


def _cores(cpu: Mapping[str, Any] | None, name: str) -> str:
    c = ((cpu or {}).get("process_cores") or {}).get(name)
    return "–" if c is None else f"{c:.2f}"


def _worker_cores(cpu: Mapping[str, Any] | None) -> str:
    cores = (cpu or {}).get("process_cores") or {}
    ws = [v for k, v in cores.items() if k not in ("gateway", "client")]
    return "–" if not ws else f"{max(ws):.2f}"


def oracle_cpu_table(results: BenchResults) -> str:
    """Per run: the measured cached fraction against the oracles, and CPU use with the flag."""
    rows = [
        "| run | cached (measured) | pooled-LRU oracle | infinite cache | measured / pooled LRU | "
        "machine CPU busy | gateway cores | client cores | busiest worker cores | CPU-bound? |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in results.modes:
        s = summarize(m)
        o = m.oracle or {}
        cpu = m.cpu or {}
        flag = "; ".join(s["cpu_bottleneck"])
        busy = cpu.get("machine_busy")
        rows.append(
            f"| {m.label} | {_rate(s['cached_token_rate'])} | {_rate(o.get('pooled_lru_fraction'))} | "
            f"{_rate(o.get('infinite_fraction'))} | {_rate(o.get('measured_of_pooled'))} | "
            f"{_rate(busy)} | {_cores(cpu, 'gateway')} | {_cores(cpu, 'client')} | {_worker_cores(cpu)} | "
            f"{'**YES**: ' + flag if flag else 'no'} |"
        )
    return "\n".join(rows)


def _fmt_spread(sp: Any, fmt: str) -> str:
    if sp.median is None:
        return "–"

    def one(v: float) -> str:
        return "∞" if v == float("inf") else format(v, fmt)

    if len(sp.values) < 2 or sp.low == sp.high:
        return one(sp.median)
    return f"{one(sp.median)} ({one(sp.low)}–{one(sp.high)})"


def _pct_spread(sp: Any) -> str:
    if sp.median is None:
        return "–"
    scaled = type(sp)(
        *(None if v is None else 100 * v for v in (sp.median, sp.low, sp.high)),
        [None if v is None else 100 * v for v in sp.values],
    )
    return _fmt_spread(scaled, ".1f") + "%"


def sweep_tables(
    cells: Sequence[Cell], slo_ttft_s: float, baseline: str = BASELINE, warmup_s: float = 0.0
) -> list[str]:
    """Markdown: one row per (mode, rate) with medians and spread, the SLO verdict per mode,
    and the ratio table against ``baseline``."""
    slo_ms = 1000.0 * slo_ttft_s
    out = [
        "| mode | rate req/s | runs | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms | goodput req/s | req/s | "
        "cached (measured) | pooled-LRU oracle | measured / oracle | CPU-flagged runs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        mt = c.metrics
        rate = "closed loop" if c.rate is None else f"{c.rate:g}"
        out.append(
            f"| {c.mode} | {rate} | {len(c.runs)} | {_fmt_spread(mt['ttft_p50_ms'], '.1f')} | "
            f"{_fmt_spread(mt['ttft_p90_ms'], '.1f')} | {_fmt_spread(mt['ttft_p99_ms'], '.1f')} | "
            f"{_fmt_spread(mt['goodput'], '.2f')} | {_fmt_spread(mt['requests_per_s'], '.2f')} | "
            f"{_pct_spread(mt['cached_fraction'])} | {_pct_spread(mt['pooled_lru_fraction'])} | "
            f"{_pct_spread(mt['measured_of_pooled'])} | {c.cpu_flagged}/{len(c.runs)} |"
        )
    out += [
        "",
        f"Medians over repeats, (min–max) when they differ. TTFT percentiles count a failed request as "
        f"an infinite TTFT (∞); goodput = requests per second completed with TTFT ≤ {slo_ms:.0f} ms.",
        "",
    ]
    if warmup_s > 0:
        out[-1:] = [
            f"Requests sent in each run's first {warmup_s:g} s (its warm-up) are left out of the TTFT, goodput "
            "and req/s columns; the cached and oracle columns count the whole run.",
            "",
        ]
    verdicts = slo_verdicts(cells, slo_ms)
    if verdicts:
        out.append(
            f"Highest offered rate meeting the SLO (median p90 TTFT ≤ {slo_ms:.0f} ms at it and every lower rate):"
        )
        out.append("")
        for mode, best in verdicts.items():
            out.append(f"- {mode}: " + ("none of the rates tested" if best is None else f"{best:g} req/s"))
        out.append("")
        base_best = verdicts.get(baseline)
        knees = [(mode, best) for mode, best in verdicts.items() if mode != baseline and best is not None]
        top = max((c.rate for c in cells if c.rate is not None), default=None)
        if base_best and knees:
            out.append(
                "The sustainable rate against the baseline's (goodput as the highest rate at which p90 TTFT stays "
                "within the SLO; the grid of rates bounds its precision, and ≥ marks a mode that met it at the "
                "highest rate tested): "
                + ", ".join(
                    f"{mode} / {baseline} **{'≥ ' if best == top else ''}{best / base_best:.2f}x**"
                    for mode, best in knees
                )
                + "."
            )
            out.append("")
    ratios = ratios_to_baseline(cells, baseline)
    if ratios:
        out += [
            f"Each mode against {baseline} (ratio of medians; TTFT below 1 is better, goodput and cached above 1):",
            "",
            "| mode | rate req/s | TTFT p50 | TTFT p90 | TTFT p99 | goodput | cached fraction |",
            "|---|---|---|---|---|---|---|",
        ]
        for mode, rate, r in ratios:
            cells_ = [
                "–" if r[k] is None else f"{r[k]:.2f}"
                for k in ("ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "goodput", "cached_fraction")
            ]
            out.append(f"| {mode} | {'closed loop' if rate is None else f'{rate:g}'} | " + " | ".join(cells_) + " |")
        out.append("")
    return out


def is_sweep(results: BenchResults) -> bool:
    return any(m.rate is not None or m.repeat > 0 for m in results.modes)


def cells_of(results: BenchResults) -> list[Cell]:
    slo = float(results.meta.get("slo_ttft_s") or DEFAULT_SLO_TTFT_S)
    return aggregate([figures(m, slo) for m in results.modes])


def render_markdown(results: BenchResults) -> str:
    summaries = [(m.label, summarize(m)) for m in results.modes]
    meta = results.meta
    slo = float(meta.get("slo_ttft_s") or DEFAULT_SLO_TTFT_S)
    out = [f"# kvgate benchmark: {meta.get('workload', '?')}", ""]
    if meta.get("command"):
        out += ["```", meta["command"], "```", ""]
    flagged = [m.label for m in results.modes if summarize(m)["cpu_bottleneck"]]
    if flagged:
        out += [
            f"**CPU-bound runs** ({len(flagged)} of {len(results.modes)}: {', '.join(flagged)}): the machine's "
            "cores, not the simulated engines, limited them; their latencies measure the machine.",
            "",
        ]
    if is_sweep(results):
        tables = sweep_tables(cells_of(results), slo, warmup_s=meta.get("warmup_s") or 0.0)
        out += ["## Sweep", "", *tables, f"![sweep]({SWEEP_PNG})", ""]
        out += ["## Every run", ""]
    out += [markdown_table(summaries), ""]
    tiers = tier_table(summaries)
    if tiers:
        out += [
            "Prompt tokens found cached, by the tier they came from (Δ`kvgate_sim_cached_tokens_total{tier}` / "
            "Δ`vllm:prefix_cache_queries_total`, summed over the workers):",
            "",
            tiers,
            "",
        ]
    if not is_sweep(results):
        out += headline(summaries)
    out += [
        "",
        "Latencies are client-side (time to the first content token, gaps between content chunks, "
        "whole request). Prefix hit rate = Δ`vllm:prefix_cache_hits_total` / Δ`vllm:prefix_cache_queries_total` "
        "summed over the workers (tokens); on workers with CPU / disk tiers it counts prompt tokens found in "
        "any tier (the tier table splits them). Requests per worker come from the `x-kvgate-worker` header.",
        "",
        "### Cached tokens against the oracle, and CPU use",
        "",
        oracle_cpu_table(results),
        "",
        "Cached (measured) = Σ`usage.prompt_tokens_details.cached_tokens` / Σ`usage.prompt_tokens` over the "
        "successful requests. The oracles replay the same requests, in send order, through one LRU cache of the "
        "fleet's total GPU blocks (pooled LRU) and through an infinite cache (see `oracle.py`). CPU: the machine's "
        "busy share over the run (`/proc/stat`) and each process's use in cores (`/proc/<pid>/stat`); a run is "
        "CPU-bound when the machine is > 90 % busy or one process is above 0.9 of a core.",
        "",
    ]
    for m in results.modes:
        for note in m.notes:
            out.append(f"- {m.label}: {note}")
        overhead = summarize(m)["gateway_overhead_ms"]
        if overhead:
            out.append(
                f"- {m.label}: gateway time per request before forwarding (mean ms): "
                + ", ".join(f"{stage} {ms:.2f}" for stage, ms in overhead.items())
            )
        kinds = summarize(m)["error_kinds"]
        if kinds:
            out.append(f"- {m.label} errors: " + "; ".join(f"{k} (x{n})" for k, n in kinds.items()))
    out += ["", f"![TTFT CDF]({TTFT_PNG})", "", f"![throughput and hit rate]({THROUGHPUT_PNG})", ""]
    out += [
        "## Settings",
        "",
        "```json",
        json.dumps({k: v for k, v in meta.items() if k != "command"}, indent=2, sort_keys=True),
        "```",
        "",
    ]
    return "\n".join(out)


def plot_sweep(cells: Sequence[Cell], out_dir: Path, title: str, slo_ttft_s: float) -> Path | None:
    """TTFT p90 against offered rate per mode (log scale, min–max bars over repeats), and goodput."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    swept = [c for c in cells if c.rate is not None]
    if not swept:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
    modes = list(dict.fromkeys(c.mode for c in swept))
    for i, mode in enumerate(modes):
        mc = sorted((c for c in swept if c.mode == mode), key=lambda c: c.rate or 0.0)
        rates = [c.rate for c in mc]
        for ax, key in ((ax1, "ttft_p90_ms"), (ax2, "goodput")):
            sps = [c.metrics[key] for c in mc]
            cap = 1e6  # an infinite p90 (failures) is drawn at 1e6 ms
            med = [min(sp.median, cap) if sp.median is not None else np.nan for sp in sps]
            lo = [m - min(sp.low, cap) if sp.low is not None else 0.0 for m, sp in zip(med, sps, strict=True)]
            hi = [min(sp.high, cap) - m if sp.high is not None else 0.0 for m, sp in zip(med, sps, strict=True)]
            ax.errorbar(rates, med, yerr=[lo, hi], marker="o", capsize=3, color=f"C{i}", label=mode)
    ax1.axhline(1000.0 * slo_ttft_s, color="grey", linestyle="--", label=f"SLO {1000 * slo_ttft_s:.0f} ms")
    ax1.set_yscale("log")
    ax1.set_xlabel("offered rate (requests/s)")
    ax1.set_ylabel("TTFT p90 (ms, log scale)")
    ax1.set_title("TTFT p90 vs rate")
    all_rates = [c.rate for c in swept if c.rate is not None]
    ax2.plot([0, max(all_rates)], [0, max(all_rates)], color="grey", linestyle=":", label="offered")
    ax2.set_xlabel("offered rate (requests/s)")
    ax2.set_ylabel(f"goodput (req/s with TTFT ≤ {1000 * slo_ttft_s:.0f} ms)")
    ax2.set_title("goodput vs rate")
    for a in (ax1, ax2):
        a.grid(alpha=0.3)
        a.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    path = out_dir / SWEEP_PNG
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(results: BenchResults, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summaries = [(m.label, summarize(m)) for m in results.modes]
    title = results.meta.get("workload", "")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in results.modes:
        ttft = np.sort([r.ttft_s * 1000.0 for r in m.records if r.ok and r.ttft_s is not None])
        if len(ttft):
            ax.step(ttft, np.arange(1, len(ttft) + 1) / len(ttft), where="post", label=f"{m.label} (n={len(ttft)})")
    ax.set_xscale("log")  # the body and the tail of the distribution both stay readable
    ax.set_xlabel("time to first token (ms, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)
    ax.set_title(f"TTFT CDF — {title}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    ttft_path = out_dir / TTFT_PNG
    fig.savefig(ttft_path, dpi=110)
    plt.close(fig)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 4))
    names = [mode for mode, _ in summaries]
    colors = [f"C{i}" for i in range(len(names))]
    ax1.bar(names, [s["requests_per_s"] for _, s in summaries], color=colors)
    ax1.set_ylabel("requests / s")
    ax1.set_title("throughput")
    if any(s.get("tier_hit_rate") for _, s in summaries):
        bottom = np.zeros(len(names))
        for tier, shade in (("gpu", "#2b7bba"), ("cpu", "#f0a030"), ("disk", "#8c8c8c")):
            values = np.array([100 * (s.get("tier_hit_rate") or {}).get(tier, 0.0) for _, s in summaries])
            ax2.bar(names, values, bottom=bottom, color=shade, label=tier.upper())
            bottom += values
        ax2.bar_label(ax2.containers[-1], labels=[f"{v:.1f}" for v in bottom])
        ax2.legend(loc="upper right", fontsize="small")
        ax2.set_title("prompt tokens cached, by tier")
    else:
        ax2.bar(names, [100 * (s["prefix_hit_rate"] or 0.0) for _, s in summaries], color=colors)
        ax2.bar_label(ax2.containers[0], fmt="%.1f")
        ax2.set_title("worker prefix hit rate")
    ax2.set_ylabel("prefix cache hit rate (%)")
    ax2.set_ylim(0, 100)
    ax1.bar_label(ax1.containers[0], fmt="%.2f")
    for a in (ax1, ax2):
        a.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    tp_path = out_dir / THROUGHPUT_PNG
    fig.savefig(tp_path, dpi=110)
    plt.close(fig)
    return [ttft_path, tp_path]


def write_report(results: BenchResults, out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / RESULTS_JSON
    results_path.write_text(json.dumps(results.to_json(), indent=1))
    md_path = out / REPORT_MD
    md_path.write_text(render_markdown(results))
    ttft_png, tp_png = plot(results, out)
    paths = {"results": results_path, "report": md_path, "ttft_cdf": ttft_png, "throughput": tp_png}
    if is_sweep(results):
        slo = float(results.meta.get("slo_ttft_s") or DEFAULT_SLO_TTFT_S)
        sweep_png = plot_sweep(cells_of(results), out, str(results.meta.get("workload", "")), slo)
        if sweep_png is not None:
            paths["sweep"] = sweep_png
    return paths
