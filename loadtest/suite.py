"""The benchmark suite: every workload swept over rates for the routing modes, one summary.

    python -m kvgate.loadtest.suite [--out DIR] [--duration 10] [--repeats 2] [--speedup-ratio 0.1]

Runs ``python -m kvgate.loadtest.bench`` (in this process, one workload after another)
for ``multi-turn``, ``shared-prefix``, ``trace``, ``returning`` (workers with a CPU tier,
plus mode ``kv-gpu-only``) and ``burst``, each at its preset rates with modes ``kv``,
``kv-approx`` and ``round-robin`` and ``--repeats`` runs per (mode, rate), a fresh stack
per run. Each workload's full report lands in ``DIR/<workload>/``; ``DIR/summary.md``
holds, per workload, the sweep table (medians and spread), the highest rate meeting the
SLO per mode, the ratios to round-robin, cached tokens against the pooled-LRU oracle and
the CPU-bound flags. A mode whose gateway does not start (``kv-approx`` before the
gateway has ``--kv-events``) is listed as such and the rest goes on.

The simulated engines run ``--speedup-ratio`` 0.1 by default (ten times slower than the
timing model): the engines then saturate at a few requests per second, a load the two
cores of the development machine carry, so the engines, not the cores, are the
bottleneck. Check the CPU-bound column before trusting a row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kvgate.loadtest import bench
from kvgate.loadtest.report import BenchResults, cells_of, sweep_tables


@dataclass(frozen=True)
class SuiteEntry:
    name: str  # report directory and summary heading
    workload: str
    modes: tuple[str, ...]
    rates: tuple[float, ...]
    args: tuple[str, ...]  # bench flags for this workload
    workers: int | None = None  # simulated workers, when this workload needs its own count (else --workers)


BASE_MODES = ("kv", "kv-approx", "round-robin")

SUITE: tuple[SuiteEntry, ...] = (
    SuiteEntry(
        "multi-turn",
        "multi-turn",
        BASE_MODES,
        (2.0, 5.0),
        # Open loop: 16 conversations to start with (more only when all 16 await a reply), so turns keep
        # returning as the rate rises. (With 4, every conversation was awaiting a reply from about 2 req/s
        # up, so each arrival opened a new one: nothing left to reuse, and no rate sweep could show what
        # reuse buys in capacity.)
        ("--users", "16", "--turns", "8", "--first-turn-tokens", "2048", "--turn-tokens", "64", "--max-tokens", "32"),
    ),
    SuiteEntry(
        "shared-prefix",
        "shared-prefix",
        BASE_MODES,
        (2.0, 5.0),
        ("--users", "8", "--tenants", "8", "--system-prompt-tokens", "2048", "--question-tokens", "64"),
    ),
    SuiteEntry(
        "trace",
        "trace",
        BASE_MODES,
        (2.0, 5.0),
        # The synthetic trace reuses more later on; a 1/8-length replay makes one trace block one KV block.
        ("--skip", "2000", "--length-scale", "0.125", "--output-scale", "0.1"),
    ),
    SuiteEntry(
        "tier-overflow",
        "returning",
        ("kv", "kv-gpu-only", "kv-approx", "round-robin"),
        (1.0, 2.0),
        # Long conversations (4k-token openings) on 4 workers whose GPU pools (256 blocks, 16k tokens) hold
        # about three of them: 32 conversations (~150k tokens with their turns, 2.3x the fleet's GPU blocks)
        # overflow into the CPU tiers, which hold them all, so most returning turns find their conversation
        # only in a CPU tier. Prefill, not the engine's fixed step time, dominates a 4k-token first token
        # here, so what the tiers save shows in TTFT; with 4 workers a router blind to the tiers finds the
        # right one a quarter of the time. (With 16 conversations, 1.25x the GPU blocks, most returns still
        # found their blocks in GPU memory and the tiers barely mattered.)
        (
            "--users",
            "16",
            "--conversations-per-user",
            "2",
            "--turns",
            "6",
            "--first-turn-tokens",
            "4096",
            "--turn-tokens",
            "200",
            "--max-tokens",
            "8",
            "--num-gpu-blocks",
            "256",
            "--cpu-blocks",
            "4096",
            "--max-model-len",
            "16384",
        ),
        workers=4,
    ),
    SuiteEntry(
        "burst",
        "burst",
        BASE_MODES,
        (4.0, 8.0),
        ("--burst-doc-tokens", "4096", "--burst-size", "8", "--burst-window", "0.1", "--max-tokens", "16"),
    ),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kvgate.loadtest.suite", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="directory (default: reports/suite-<time>)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of arrivals per run")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--speedup-ratio", type=float, default=0.1, help="the simulated engines' speedup (0.1: 10x slower)")
    p.add_argument("--slo-ttft", type=float, default=2.0, help="TTFT SLO in seconds")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workloads", help="comma-separated subset of: " + ", ".join(e.name for e in SUITE))
    p.add_argument("--modes", help="override every workload's modes (comma-separated)")
    p.add_argument("--rates", help="override every workload's rates (comma-separated req/s)")
    p.add_argument("--extra", action="append", default=[], help="extra bench flag for every run (repeatable)")
    return p


def bench_argv(entry: SuiteEntry, args: argparse.Namespace, out: Path) -> list[str]:
    modes = args.modes or ",".join(entry.modes)
    rates = args.rates or ",".join(f"{r:g}" for r in entry.rates)
    return [
        "--workload",
        entry.workload,
        "--modes",
        modes,
        "--rates",
        rates,
        "--repeats",
        str(args.repeats),
        "--duration",
        str(args.duration),
        "--slo-ttft",
        str(args.slo_ttft),
        "--speedup-ratio",
        str(args.speedup_ratio),
        "--workers",
        str(entry.workers or args.workers),
        "--seed",
        str(args.seed),
        "--drain-timeout",
        "30",
        *entry.args,
        *args.extra,
        "--out",
        str(out / entry.name),
    ]


def summary_section(entry: SuiteEntry, results: BenchResults, slo_ttft_s: float, elapsed_s: float) -> list[str]:
    out = [f"## {entry.name} (`{entry.workload}`)", ""]
    out += ["```", results.meta.get("command", ""), "```", ""]
    failed = results.meta.get("failed_modes") or {}
    for mode, why in failed.items():
        out.append(f"- **{mode} did not start**: {why}")
    if failed:
        out.append("")
    if results.modes:
        out += sweep_tables(cells_of(results), slo_ttft_s, warmup_s=results.meta.get("warmup_s") or 0.0)
    else:
        out += ["No run completed.", ""]
    out += [f"Full report: [{entry.name}/report.md]({entry.name}/report.md); {elapsed_s:.0f} s.", ""]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    chosen = [e for e in SUITE if not args.workloads or e.name in args.workloads.split(",")]
    if not chosen:
        print(f"--workloads: choose from {', '.join(e.name for e in SUITE)}", file=sys.stderr)
        return 2
    out = Path(args.out or f"reports/suite-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    own = ", ".join(f"{e.name}: {e.workers}" for e in chosen if e.workers)
    sections = [
        "# kvgate benchmark suite",
        "",
        f"{args.workers} simulated workers per run{f' ({own})' if own else ''}, "
        f"`--speedup-ratio {args.speedup_ratio:g}`, {args.duration:g} s of "
        f"arrivals per run, {args.repeats} repeats per (mode, rate), TTFT SLO {1000 * args.slo_ttft:.0f} ms, seed "
        f"{args.seed}; a fresh stack per run. Command: `python -m kvgate.loadtest.suite "
        + " ".join(argv if argv is not None else sys.argv[1:])
        + "`.",
        "",
    ]
    code = 0
    for entry in chosen:
        t0 = time.monotonic()
        print(f"=== suite: {entry.name} ===", file=sys.stderr, flush=True)
        rc = bench.main(bench_argv(entry, args, out))
        if rc == 130:
            return 130
        code = code or rc
        results_path = out / entry.name / "results.json"
        if results_path.exists():
            results = BenchResults.from_json(json.loads(results_path.read_text()))
        else:
            results = BenchResults({"command": "", "failed_modes": {"all": f"bench exited {rc}"}}, [])
        sections += summary_section(entry, results, args.slo_ttft, time.monotonic() - t0)
        (out / "summary.md").write_text("\n".join(sections))  # after every workload
    sections.append(f"Suite wall time: {time.monotonic() - started:.0f} s.")
    (out / "summary.md").write_text("\n".join(sections) + "\n")
    print(f"summary: {out / 'summary.md'}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
