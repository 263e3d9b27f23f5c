"""One-command benchmark: the same seeded load against each routing mode, then a report.

    python -m kvgate.loadtest.bench --workload multi-turn --workers 2 --modes kv,round-robin --duration 60

For each mode it starts a fresh stack (N ``worker.sim`` processes and a gateway
with ``--router-mode MODE``; or uses ``--gateway-url`` of a running one), scrapes
the gateway's and the workers' ``/metrics``, drives the workload with the
asyncio driver while printing progress, scrapes again, stops everything it
started, and writes ``report.md``, ``results.json`` and the PNG plots to
``--out``. Same seed, same requests, same stack settings for every mode.
Talks to the stack over HTTP only.

With ``--rates`` it sweeps: open-loop arrivals at each rate (Poisson for the chat
workloads, the trace's or the bursts' own schedule stretched to the rate), every mode,
``--repeats`` times each, a fresh stack per run; the report adds TTFT percentiles and
goodput per (mode, rate) with their spread, the highest rate meeting ``--slo-ttft`` and
ratios to round-robin. Every run also reports the cached fraction of prompt tokens
against two oracles (``oracle.py``; the block hashes come from the gateway's
``/debug/route``) and the CPU use of the machine and of each process (``cpu.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import aiohttp

from kvgate.loadtest.corpus import DEFAULT_MODEL, Vocabulary, load_tokenizer
from kvgate.loadtest.cpu import CpuMeter
from kvgate.loadtest.driver import (
    DriverConfig,
    RunOutcome,
    run_closed_loop,
    run_open_loop,
    run_open_loop_sessions,
)
from kvgate.loadtest.oracle import OracleRequest, oracle_summary
from kvgate.loadtest.report import (
    DEFAULT_SLO_TTFT_S,
    BenchResults,
    ModeResult,
    cells_of,
    markdown_table,
    summarize,
    sweep_tables,
    write_report,
)
from kvgate.loadtest.scrape import delta, fetch_all
from kvgate.loadtest.stack import Stack, StackConfig, StackError, repo_relative
from kvgate.loadtest.stream import RequestRecord
from kvgate.loadtest.trace import DEFAULT_TRACE, ReplayConfig, TraceRequest, load_trace
from kvgate.loadtest.workloads import (
    WORKLOADS,
    RequestSpec,
    TimedRequest,
    WorkloadConfig,
    burst_requests,
    make_session,
    poisson_arrivals,
    trace_requests,
    trace_time_scale,
)

ROUTER_MODES = ("kv", "kv-gpu-only", "kv-approx", "kv-no-memory-wait", "round-robin", "random")
# Bench modes that are a router mode plus gateway flags: kv with the CPU / disk tiers
# ignored (RouterConfig.gpu_only), the baseline of the tier benchmark; kv routing on the
# router's own predictions only, the workers' KV events ignored; kv without the wait for
# room in a full KV pool (RouterConfig.memory_wait), that term's baseline.
_MODE_FLAGS = {
    "kv-gpu-only": ("kv", ("--kv-gpu-only",)),
    "kv-approx": ("kv", ("--kv-events", "off")),
    "kv-no-memory-wait": ("kv", ("--no-kv-memory-wait",)),
}
OPEN_LOOP_WORKLOADS = ("trace", "burst")  # their own schedule; the others are chat sessions


def gateway_mode(mode: str) -> tuple[str, tuple[str, ...]]:
    """The gateway's ``--router-mode`` and extra flags for a bench mode."""
    return _MODE_FLAGS.get(mode, (mode, ()))


def _default(cls: type, name: str) -> Any:
    return {f.name: f.default for f in fields(cls)}[name]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kvgate.loadtest.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", required=True, choices=WORKLOADS)
    p.add_argument("--modes", default="kv,round-robin", help="comma-separated router modes, run in this order")
    p.add_argument("--workers", type=int, default=_default(StackConfig, "workers"), help="simulated workers")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load per mode (trace: replay window)")
    p.add_argument(
        "--warmup",
        type=float,
        default=0.0,
        help="seconds at the start of each run whose requests are sent but left out of the sweep's TTFT, "
        "goodput and req/s (caches and sessions start cold)",
    )
    p.add_argument("--users", type=int, default=8, help="concurrent users (closed-loop workloads)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="report directory (default: reports/<workload>-<time>)")
    p.add_argument(
        "--model", default=str(DEFAULT_MODEL), help="tokenizer for exact prompt lengths, and the workers' --model-dir"
    )
    p.add_argument(
        "--gateway-url",
        action="append",
        default=[],
        help="use a running gateway instead of starting one; repeat once per mode, in --modes order",
    )
    p.add_argument(
        "--worker-url",
        action="append",
        default=[],
        help="with --gateway-url: a worker to scrape, as ID=URL or URL (repeatable)",
    )
    p.add_argument(
        "--reset-prefix-cache",
        action="store_true",
        help="with --worker-url: POST /reset_prefix_cache to each worker before each mode",
    )
    p.add_argument(
        "--rates",
        help="sweep: comma-separated offered rates in requests/s (open loop), or 'auto' (double from "
        "--auto-start-rate until every mode misses the SLO, at most --auto-max-rates rates)",
    )
    p.add_argument("--auto-start-rate", type=float, default=1.0)
    p.add_argument("--auto-max-rates", type=int, default=6)
    p.add_argument("--repeats", type=int, default=1, help="runs of each (mode, rate), a fresh stack each")
    p.add_argument(
        "--slo-ttft",
        type=float,
        default=DEFAULT_SLO_TTFT_S,
        help="TTFT SLO in seconds: goodput counts requests within it",
    )
    p.add_argument("--no-oracle", action="store_true", help="skip the oracle (no /debug/route queries after a run)")
    p.add_argument(
        "--admin-url",
        action="append",
        default=[],
        help="with --gateway-url: the gateway's admin listener for /debug/route, once per mode "
        "(default: the gateway's port + 1, or its own port with --admin-on-public-port)",
    )
    p.add_argument("--admin-on-public-port", action="store_true", help="with --gateway-url: see --admin-url")
    p.add_argument(
        "--fleet-gpu-blocks",
        type=int,
        help="the pooled-LRU oracle's size in blocks (default: --workers x --num-gpu-blocks)",
    )
    p.add_argument("--request-timeout", type=float, default=_default(DriverConfig, "request_timeout_s"))
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=_default(DriverConfig, "drain_timeout_s"),
        help="seconds in-flight requests may take to finish once the load stops",
    )
    p.add_argument(
        "--think-time",
        type=float,
        default=_default(DriverConfig, "think_time_s"),
        help="closed loop: mean seconds a user waits between requests (uniform 0..2x, seeded)",
    )
    p.add_argument(
        "--ramp-up",
        type=float,
        default=_default(DriverConfig, "ramp_up_s"),
        help="closed loop: each user starts after a seeded delay in [0, RAMP_UP) seconds",
    )

    s = p.add_argument_group("simulated workers (ignored with --gateway-url)")
    for name in ("num_gpu_blocks", "max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size"):
        s.add_argument("--" + name.replace("_", "-"), type=int, default=_default(StackConfig, name))
    s.add_argument(
        "--speedup-ratio",
        type=float,
        default=_default(StackConfig, "speedup_ratio"),
        help="engine time divided by this (see worker/sim/timing.py)",
    )
    s.add_argument(
        "--cpu-blocks",
        type=int,
        default=_default(StackConfig, "cpu_blocks"),
        help="each worker's CPU KV tier in blocks (0: none)",
    )
    s.add_argument(
        "--disk-blocks",
        type=int,
        default=_default(StackConfig, "disk_blocks"),
        help="each worker's disk KV tier in blocks (0: none)",
    )
    s.add_argument("--gateway-arg", action="append", default=[], help="extra flag for the gateway (repeatable)")

    w = p.add_argument_group("workloads")
    for name in (
        "max_tokens",
        "turns",
        "first_turn_tokens",
        "turn_tokens",
        "conversations_per_user",
        "tenants",
        "system_prompt_tokens",
        "question_tokens",
        "prompt_tokens",
        "burst_doc_tokens",
        "burst_size",
    ):
        w.add_argument("--" + name.replace("_", "-"), type=int, default=_default(WorkloadConfig, name))
    w.add_argument(
        "--burst-window",
        type=float,
        default=_default(WorkloadConfig, "burst_window_s"),
        help="burst: seconds over which a burst's requests arrive",
    )
    w.add_argument(
        "--burst-period",
        type=float,
        default=_default(WorkloadConfig, "burst_period_s"),
        help="burst: seconds between documents (a sweep sets it to burst-size / rate)",
    )

    t = p.add_argument_group("trace replay")
    t.add_argument("--trace", default=str(DEFAULT_TRACE), help="Mooncake-format JSONL")
    t.add_argument(
        "--time-scale",
        type=float,
        default=_default(ReplayConfig, "time_scale"),
        help="multiply the gaps between arrivals (0.5: twice as fast)",
    )
    t.add_argument(
        "--length-scale",
        type=float,
        default=_default(ReplayConfig, "length_scale"),
        help="scale prompt lengths: each 512-token block becomes round(512*x) tokens",
    )
    t.add_argument(
        "--output-scale",
        type=float,
        default=_default(ReplayConfig, "output_scale"),
        help="scale output lengths (max_tokens)",
    )
    t.add_argument("--max-requests", type=int, default=None, help="replay at most this many requests")
    t.add_argument("--skip", type=int, default=0, help="start at this request of the trace")
    return p


def configs(args: argparse.Namespace) -> tuple[WorkloadConfig, StackConfig, DriverConfig]:
    replay = ReplayConfig(
        time_scale=args.time_scale,
        length_scale=args.length_scale,
        output_scale=args.output_scale,
        max_requests=args.max_requests,
        max_duration_s=args.duration,
        skip=args.skip,
    )
    workload = WorkloadConfig(
        seed=args.seed,
        max_tokens=args.max_tokens,
        turns=args.turns,
        first_turn_tokens=args.first_turn_tokens,
        turn_tokens=args.turn_tokens,
        conversations_per_user=args.conversations_per_user,
        tenants=args.tenants,
        system_prompt_tokens=args.system_prompt_tokens,
        question_tokens=args.question_tokens,
        prompt_tokens=args.prompt_tokens,
        burst_doc_tokens=args.burst_doc_tokens,
        burst_size=args.burst_size,
        burst_window_s=args.burst_window,
        burst_period_s=args.burst_period,
        replay=replay,
    )
    stack = StackConfig(
        workers=args.workers,
        model=args.model,
        block_size=args.block_size,
        num_gpu_blocks=args.num_gpu_blocks,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        speedup_ratio=args.speedup_ratio,
        cpu_blocks=args.cpu_blocks,
        disk_blocks=args.disk_blocks,
        seed=args.seed,
        gateway_args=tuple(args.gateway_arg),
    )
    driver = DriverConfig(
        base_url="",
        duration_s=args.duration,
        request_timeout_s=args.request_timeout,
        drain_timeout_s=args.drain_timeout,
        think_time_s=args.think_time,
        ramp_up_s=args.ramp_up,
        seed=args.seed,
    )
    return workload, stack, driver


def _worker_urls(specs: Sequence[str]) -> dict[str, str]:
    out = {}
    for i, spec in enumerate(specs):
        name, sep, url = spec.partition("=")
        if sep and "://" not in name:
            out[name] = url
        else:
            out[f"w{i}"] = spec
    return out


async def _served_model(http: aiohttp.ClientSession, gateway_url: str) -> str:
    async with http.get(gateway_url.rstrip("/") + "/v1/models") as resp:
        resp.raise_for_status()
        return (await resp.json())["data"][0]["id"]


def build_open_loop(
    args: argparse.Namespace,
    workload: WorkloadConfig,
    vocabulary: Vocabulary,
    model: str,
    trace: list[TraceRequest] | None,
    rate: float | None,
) -> list[TimedRequest]:
    """The trace's or the bursts' requests; at ``rate`` when sweeping."""
    if args.workload == "trace":
        assert trace is not None
        if rate is not None:
            scale = trace_time_scale(trace, workload.replay, rate)
            workload = replace(workload, replay=replace(workload.replay, time_scale=scale))
        return trace_requests(trace, vocabulary, workload, model)
    period = workload.burst_size / rate if rate is not None else workload.burst_period_s
    return burst_requests(vocabulary, workload, model, args.duration, period)


async def _route_info(
    http: aiohttp.ClientSession, admin_url: str, spec: RequestSpec, limit: asyncio.Semaphore
) -> dict[str, Any]:
    async with limit, http.post(admin_url.rstrip("/") + "/debug/route", json=spec.body) as resp:
        resp.raise_for_status()
        body: dict[str, Any] = await resp.json()
        return body


async def oracle_for(
    http: aiohttp.ClientSession,
    admin_url: str,
    sent: list[tuple[RequestRecord, RequestSpec]],
    pooled_blocks: int,
) -> tuple[dict[str, Any] | None, str | None]:
    """The oracle figures for the successful requests of a run, in send order (None and why, if not)."""
    done = [(rec, spec) for rec, spec in sent if rec.ok]
    if not done:
        return None, "oracle: no successful request"
    limit = asyncio.Semaphore(4)
    try:
        infos = await asyncio.gather(*(_route_info(http, admin_url, spec, limit) for _, spec in done))
    except (aiohttp.ClientError, OSError, ValueError) as err:
        return None, f"oracle: /debug/route failed ({type(err).__name__}: {err})"
    if any("block_hashes" not in info for info in infos):
        return None, "oracle: the gateway's /debug/route gives no block_hashes"
    requests = [OracleRequest([int(h) for h in info["block_hashes"]], int(info["prompt_tokens"])) for info in infos]
    reported = [rec for rec, _ in done if rec.cached_tokens is not None and rec.prompt_tokens]
    measured = (
        sum(r.cached_tokens or 0 for r in reported) / sum(r.prompt_tokens or 0 for r in reported) if reported else None
    )
    block_size = int(infos[0].get("block_size") or 64)
    summary = oracle_summary(requests, block_size, pooled_blocks, measured)
    mismatched = sum(1 for (rec, _), req in zip(done, requests, strict=True) if rec.prompt_tokens != req.prompt_tokens)
    notes = None
    if mismatched:
        notes = f"oracle: {mismatched} requests' prompt tokens differ between the gateway and the worker's usage"
    return {**summary, "block_size": block_size}, notes


async def run_mode(
    mode: str,
    gateway_url: str,
    worker_urls: dict[str, str],
    args: argparse.Namespace,
    vocabulary: Vocabulary,
    trace: list[TraceRequest] | None,
    rate: float | None = None,
    repeat: int = 0,
    admin_url: str | None = None,
    pids: dict[str, int] | None = None,
) -> ModeResult:
    workload, stack_cfg, driver = configs(args)
    label = mode if rate is None else f"{mode} @{rate:g}/s #{repeat + 1}"
    driver = DriverConfig(**{**asdict(driver), "base_url": gateway_url, "label": label})
    async with aiohttp.ClientSession() as http:
        if args.reset_prefix_cache:
            for url in worker_urls.values():
                async with http.post(url.rstrip("/") + "/reset_prefix_cache") as resp:
                    resp.raise_for_status()
                    # vLLM answers 200 {"success": false} when requests still hold blocks.
                    if not (await resp.json()).get("success"):
                        raise RuntimeError(f"{url} refused to reset its prefix cache")
        model = await _served_model(http, gateway_url)
        # Requests are built before the first scrape so building them never overlaps the measured window.
        timed = (
            build_open_loop(args, workload, vocabulary, model, trace, rate)
            if args.workload in OPEN_LOOP_WORKLOADS
            else None
        )
        arrivals = poisson_arrivals(rate, args.duration, args.seed) if rate is not None and timed is None else None
        gw0 = await fetch_all(http, {"gateway": gateway_url})
        w0 = await fetch_all(http, worker_urls)
        load0 = os.getloadavg()[0]
        meter = CpuMeter({"client": os.getpid(), **(pids or {})})
        meter.start()
        outcome: RunOutcome
        if timed is not None:
            outcome = await run_open_loop(driver, timed)
        elif arrivals is not None:

            def new_session(user: int) -> Any:
                return make_session(args.workload, user, vocabulary, workload, model)

            outcome = await run_open_loop_sessions(driver, arrivals, new_session, args.users)
        else:
            sessions = [make_session(args.workload, u, vocabulary, workload, model) for u in range(args.users)]
            outcome = await run_closed_loop(driver, sessions)
        cpu = meter.stop()
        gw1 = await fetch_all(http, {"gateway": gateway_url})
        w1 = await fetch_all(http, worker_urls)
        notes = [f"no /metrics from {name}" for name, snap in {**gw1, **w1}.items() if not snap]
        oracle = None
        if admin_url and not args.no_oracle:
            pooled = args.fleet_gpu_blocks or stack_cfg.workers * stack_cfg.num_gpu_blocks
            oracle, why = await oracle_for(http, admin_url, outcome.sent, pooled)
            if why:
                notes.append(why)
    # Client, gateway and workers share this machine's cores: say how busy it was.
    notes.append(f"1-min load average {load0:.1f} before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} CPUs")
    if rate is not None and arrivals is not None:
        notes.append(f"{len(arrivals)} Poisson arrivals at {rate:g}/s over {args.duration:g} s")
    return ModeResult(
        mode,
        outcome.records,
        outcome.duration_s,
        delta(gw0["gateway"], gw1["gateway"]),
        {k: delta(w0[k], w1[k]) for k in worker_urls},
        notes,
        rate=rate,
        repeat=repeat,
        oracle=oracle,
        cpu=cpu.to_json(),
        warmup_s=args.warmup,
    )


def parse_rates(text: str | None) -> list[float] | None:
    """``--rates``: None (no sweep), [] for 'auto', or the rates ascending."""
    if text is None:
        return None
    if text.strip() == "auto":
        return []
    rates = sorted({float(r) for r in text.split(",") if r.strip()})
    if not rates or any(r <= 0 for r in rates):
        raise ValueError("--rates: give positive rates, e.g. 1,2,4,8, or 'auto'")
    return rates


def _admin_url(gateway_url: str, public: bool) -> str:
    if public:
        return gateway_url
    head, _, port = gateway_url.rstrip("/").rpartition(":")
    return f"{head}:{int(port) + 1}"


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ROUTER_MODES]
    if bad or not modes:
        parser.error(f"--modes: unknown mode(s) {bad} (choose from {', '.join(ROUTER_MODES)})")
    if args.gateway_url and len(args.gateway_url) != len(modes):
        parser.error(f"--gateway-url given {len(args.gateway_url)} times for {len(modes)} modes")
    if args.admin_url and len(args.admin_url) != len(modes):
        parser.error(f"--admin-url given {len(args.admin_url)} times for {len(modes)} modes")
    if args.duration <= 0 or args.users < 1 or args.workers < 1 or args.repeats < 1 or args.slo_ttft <= 0:
        parser.error("--duration, --users, --workers, --repeats and --slo-ttft must be positive")
    if not 0 <= args.warmup < args.duration:
        parser.error("--warmup must be at least 0 and shorter than --duration")
    try:
        workload_cfg, stack_cfg, _ = configs(args)
        rates = parse_rates(args.rates)
    except ValueError as err:
        parser.error(str(err))
    out = Path(args.out or f"reports/{args.workload}-{time.strftime('%Y%m%d-%H%M%S')}")
    # SIGINT too, not asyncio.run's own handling: that cancels the running task, and a cancellation landing
    # inside a timeout's context can be taken for the timeout and swallowed (a CI run went on for 60 s after
    # Ctrl-C); an exception raised in the loop's thread ends the run wherever it is, and `Stack` stops it all.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _raise_interrupt)

    try:
        vocabulary = Vocabulary.from_tokenizer(load_tokenizer(args.model))
        trace = load_trace(args.trace) if args.workload == "trace" else None
    except (OSError, ValueError) as err:  # unreadable tokenizer or trace, VocabularyError, TraceError
        print(f"error: {err}", file=sys.stderr)
        return 2
    meta = {
        "workload": args.workload,
        "modes": modes,
        "duration_s": args.duration,
        "users": args.users,
        "seed": args.seed,
        "rates": args.rates,
        "repeats": args.repeats,
        "slo_ttft_s": args.slo_ttft,
        "warmup_s": args.warmup,
        "command": "python -m kvgate.loadtest.bench " + shlex.join(argv),
        "workload_config": asdict(workload_cfg),
        "stack": (
            {**asdict(stack_cfg), "model": repo_relative(stack_cfg.model)}
            if not args.gateway_url
            else {"gateway_urls": args.gateway_url}
        ),
        "trace": repo_relative(args.trace) if trace is not None else None,
    }
    results = BenchResults(meta, [])
    failed: dict[str, str] = {}  # mode -> why its stack did not start

    def one_run(mode: str, rate: float | None, repeat: int) -> None:
        i = modes.index(mode)
        router_mode, flags = gateway_mode(mode)
        mode_stack = replace(stack_cfg, gateway_args=stack_cfg.gateway_args + flags)
        log_dir = out / "logs" / (mode if rate is None and args.repeats == 1 else f"{mode}-{rate or 0:g}-{repeat + 1}")
        stack: AbstractContextManager[Any] = (
            nullcontext() if args.gateway_url else Stack(mode_stack, router_mode, log_dir)
        )
        label = mode if rate is None else f"{mode} @{rate:g}/s"
        print(
            f"[{label} #{repeat + 1}] starting" + ("" if args.gateway_url else f" {args.workers} workers + gateway"),
            file=sys.stderr,
            flush=True,
        )
        try:
            with stack as running:
                if args.gateway_url:
                    gateway_url = args.gateway_url[i]
                    workers = _worker_urls(args.worker_url)
                    admin = args.admin_url[i] if args.admin_url else _admin_url(gateway_url, args.admin_on_public_port)
                    pids: dict[str, int] = {}
                else:
                    gateway_url, workers = running.gateway_url, running.worker_urls
                    admin, pids = gateway_url, running.named_pids()  # the bench's gateway serves admin publicly
                result = asyncio.run(
                    run_mode(mode, gateway_url, workers, args, vocabulary, trace, rate, repeat, admin, pids)
                )
        except StackError as err:
            failed[mode] = str(err).splitlines()[0][:300]
            print(f"[{mode}] did not start: {failed[mode]}; logs in {log_dir}", file=sys.stderr, flush=True)
            return
        results.modes.append(result)
        write_report(results, out)  # after every run, so an interrupted run keeps what it measured

    def all_miss_slo(rate: float) -> bool:
        cells = [c for c in cells_of(results) if c.rate == rate]
        slo_ms = 1000.0 * args.slo_ttft
        return bool(cells) and all((c.metrics["ttft_p90_ms"].median or 0.0) > slo_ms for c in cells)

    try:
        plan: list[float | None] = [None] if rates is None else list(rates)
        auto = rates == []
        if auto:
            plan = [args.auto_start_rate * 2**k for k in range(args.auto_max_rates)]
        for rate in plan:
            for repeat in range(args.repeats):
                for mode in modes:
                    if mode not in failed:
                        one_run(mode, rate, repeat)
            if auto and rate is not None and all_miss_slo(rate):
                print(f"auto: every mode misses the SLO at {rate:g} req/s; stopping the sweep", file=sys.stderr)
                break
    except KeyboardInterrupt:
        print("interrupted: every started process was stopped", file=sys.stderr)
        return 130
    except (aiohttp.ClientError, OSError, RuntimeError) as err:
        print(f"error: {err}\nevery started process was stopped; logs in {out / 'logs'}", file=sys.stderr)
        return 1
    if failed:
        results.meta["failed_modes"] = failed
    if results.modes:
        write_report(results, out)
        print(markdown_table([(m.label, summarize(m)) for m in results.modes]))
        if rates is not None or args.repeats > 1:
            print("\n".join(["", *sweep_tables(cells_of(results), args.slo_ttft, warmup_s=args.warmup)]))
    for mode, why in failed.items():
        print(f"mode {mode} did not start: {why}", file=sys.stderr)
    print(f"\nreport: {out / 'report.md'}", file=sys.stderr)
    return 0 if results.modes and not failed and all(summarize(m)["ok"] for m in results.modes) else 1


if __name__ == "__main__":
    sys.exit(main())
