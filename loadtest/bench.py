"""One-command benchmark: the same seeded load against each routing mode, then a report.

    python -m kvgate.loadtest.bench --workload multi-turn --workers 2 --modes kv,round-robin --duration 60

For each mode it starts a fresh stack (N ``worker.sim`` processes and a gateway
with ``--router-mode MODE``; or uses ``--gateway-url`` of a running one), scrapes
the gateway's and the workers' ``/metrics``, drives the workload with the
asyncio driver while printing progress, scrapes again, stops everything it
started, and writes ``report.md``, ``results.json`` and the PNG plots to
``--out``. Same seed, same requests, same stack settings for every mode.
Talks to the stack over HTTP only.
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
from kvgate.loadtest.driver import DriverConfig, run_closed_loop, run_open_loop
from kvgate.loadtest.report import BenchResults, ModeResult, markdown_table, summarize, write_report
from kvgate.loadtest.scrape import delta, fetch_all
from kvgate.loadtest.stack import Stack, StackConfig, StackError
from kvgate.loadtest.trace import DEFAULT_TRACE, ReplayConfig, TraceRequest, load_trace
from kvgate.loadtest.workloads import WORKLOADS, WorkloadConfig, make_session, trace_requests

ROUTER_MODES = ("kv", "kv-gpu-only", "round-robin", "random")
# Bench modes that are a router mode plus gateway flags: kv with the CPU / disk tiers
# ignored (RouterConfig.gpu_only), the baseline of the tier benchmark.
_MODE_FLAGS = {"kv-gpu-only": ("kv", ("--kv-gpu-only",))}


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
    ):
        w.add_argument("--" + name.replace("_", "-"), type=int, default=_default(WorkloadConfig, name))

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


async def run_mode(
    mode: str,
    gateway_url: str,
    worker_urls: dict[str, str],
    args: argparse.Namespace,
    vocabulary: Vocabulary,
    trace: list[TraceRequest] | None,
) -> ModeResult:
    workload, _, driver = configs(args)
    driver = DriverConfig(**{**asdict(driver), "base_url": gateway_url, "label": mode})
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
        timed = trace_requests(trace, vocabulary, workload, model) if trace is not None else None
        sessions = (
            None
            if trace is not None
            else [make_session(args.workload, u, vocabulary, workload, model) for u in range(args.users)]
        )
        gw0 = await fetch_all(http, {"gateway": gateway_url})
        w0 = await fetch_all(http, worker_urls)
        load0 = os.getloadavg()[0]
        outcome = (
            await run_open_loop(driver, timed) if timed is not None else await run_closed_loop(driver, sessions or [])
        )
        gw1 = await fetch_all(http, {"gateway": gateway_url})
        w1 = await fetch_all(http, worker_urls)
    notes = [f"no /metrics from {name}" for name, snap in {**gw1, **w1}.items() if not snap]
    # Client, gateway and workers share this machine's cores: say how busy it was.
    notes.append(f"1-min load average {load0:.1f} before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} CPUs")
    return ModeResult(
        mode,
        outcome.records,
        outcome.duration_s,
        delta(gw0["gateway"], gw1["gateway"]),
        {k: delta(w0[k], w1[k]) for k in worker_urls},
        notes,
    )


def _raise_on_sigterm(signum: int, frame: object) -> None:
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
    if args.duration <= 0 or args.users < 1 or args.workers < 1:
        parser.error("--duration, --users and --workers must be positive")
    try:
        workload_cfg, stack_cfg, _ = configs(args)
    except ValueError as err:
        parser.error(str(err))
    out = Path(args.out or f"reports/{args.workload}-{time.strftime('%Y%m%d-%H%M%S')}")
    signal.signal(signal.SIGTERM, _raise_on_sigterm)

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
        "command": "python -m kvgate.loadtest.bench " + shlex.join(argv),
        "workload_config": asdict(workload_cfg),
        "stack": asdict(stack_cfg) if not args.gateway_url else {"gateway_urls": args.gateway_url},
        "trace": args.trace if trace is not None else None,
    }
    results = BenchResults(meta, [])
    try:
        for i, mode in enumerate(modes):
            router_mode, flags = gateway_mode(mode)
            mode_stack = replace(stack_cfg, gateway_args=stack_cfg.gateway_args + flags)
            stack: AbstractContextManager[Any] = (
                nullcontext() if args.gateway_url else Stack(mode_stack, router_mode, out / "logs" / mode)
            )
            print(
                f"[{mode}] starting" + ("" if args.gateway_url else f" {args.workers} workers + gateway"),
                file=sys.stderr,
                flush=True,
            )
            with stack as running:
                gateway_url = args.gateway_url[i] if args.gateway_url else running.gateway_url
                workers = _worker_urls(args.worker_url) if args.gateway_url else running.worker_urls
                result = asyncio.run(run_mode(mode, gateway_url, workers, args, vocabulary, trace))
            results.modes.append(result)
            write_report(results, out)  # after every mode, so an interrupted run keeps what it measured
    except KeyboardInterrupt:
        print("interrupted: every started process was stopped", file=sys.stderr)
        return 130
    except (StackError, aiohttp.ClientError, OSError) as err:
        print(f"error: {err}\nevery started process was stopped; logs in {out / 'logs'}", file=sys.stderr)
        return 1
    print(markdown_table([(m.mode, summarize(m)) for m in results.modes]))
    print(f"\nreport: {out / 'report.md'}", file=sys.stderr)
    return 0 if all(summarize(m)["ok"] for m in results.modes) else 1


if __name__ == "__main__":
    sys.exit(main())
