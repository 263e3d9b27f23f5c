"""``python -m kvgate.dev.gateway_bench``: what the gateway adds, measured against the worker itself.

One run starts a simulated worker with near-zero engine time (a huge
``--speedup-ratio``) and a gateway process in front of it, then drives the same
streamed chat request at the same concurrency twice: straight at the worker (the
baseline) and through the gateway. It prints time to first token p50 / p99 of both
and their difference (what the gateway adds: body read, validation, chat template,
tokenization, hashing, index match, scoring, one more HTTP hop), sustained streamed
requests/s of both and their ratio, and the gateway process's own CPU time per
request. On a machine whose cores are shared by the load generator and the worker,
the gateway's requests/s is bounded by them, so the CPU time per request also gives
the projection ``1 / cpu_per_request`` = requests/s one dedicated core would sustain.

The load generator is a minimal HTTP/1.1 keep-alive client on raw asyncio streams, so
that it costs far less per request than the gateway it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from kvgate.dev.demo import spawn_workers, stop_workers, wait_healthy
from kvgate.dev.launch import Service, free_port
from kvgate.gateway.config import DEFAULT_MODEL


@dataclass(slots=True)
class RunResult:
    label: str
    ttft: list[float]
    requests: int
    seconds: float
    failures: int
    cpu_seconds: float | None = None

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        if not self.ttft:
            return float("nan")
        ordered = sorted(self.ttft)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Connection:
    """One keep-alive HTTP/1.1 connection that POSTs and reads a (chunked) answer."""

    def __init__(self, host: str, port: int, path: str, body: bytes) -> None:
        self.host, self.port = host, port
        self.request = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def exchange(self) -> tuple[float, int]:
        """(seconds to the first SSE event, HTTP status)."""
        assert self.reader is not None and self.writer is not None
        reader = self.reader
        t0 = time.perf_counter()
        self.writer.write(self.request)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        ttft = 0.0
        if b"transfer-encoding: chunked" in lower:
            while True:
                size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
                if size == 0:
                    await reader.readexactly(2)
                    break
                data = await reader.readexactly(size + 2)
                if not ttft and b"data:" in data:
                    ttft = time.perf_counter() - t0
        else:
            at = lower.find(b"content-length:")
            length = int(lower[at + 15 : lower.find(b"\r\n", at)])
            await reader.readexactly(length)
            ttft = time.perf_counter() - t0
        return ttft, status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def drive(
    label: str,
    port: int,
    body: bytes,
    concurrency: int,
    *,
    requests: int | None = None,
    seconds: float | None = None,
    cpu_pid: int | None = None,
) -> RunResult:
    """``concurrency`` connections in a closed loop, for ``requests`` total or ``seconds``."""
    conns = [Connection("127.0.0.1", port, "/v1/chat/completions", body) for _ in range(concurrency)]
    await asyncio.gather(*(c.open() for c in conns))
    ttfts: list[float] = []
    done = 0
    failures = 0
    budget = requests
    deadline = None

    async def loop(conn: Connection) -> None:
        nonlocal done, failures, budget
        while True:
            if budget is not None:
                if budget <= 0:
                    return
                budget -= 1
            elif time.perf_counter() >= deadline:
                return
            ttft, status = await conn.exchange()
            if status == 200:
                ttfts.append(ttft)
                done += 1
            else:
                failures += 1

    cpu0 = _cpu_seconds(cpu_pid)
    start = time.perf_counter()
    if seconds is not None:
        deadline = start + seconds
    await asyncio.gather(*(loop(c) for c in conns))
    elapsed = time.perf_counter() - start
    cpu = None if cpu_pid is None else _cpu_seconds(cpu_pid) - cpu0
    for c in conns:
        c.close()
    return RunResult(label, ttfts, done, elapsed, failures, cpu)


def _cpu_seconds(pid: int | None) -> float:
    """utime + stime of ``pid`` (all its threads), from /proc."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def bench(args: argparse.Namespace) -> None:
    body = orjson.dumps(
        {
            "model": "kvgate-tiny",
            "stream": True,
            "max_tokens": args.chunks,
            "ignore_eos": True,
            "messages": [
                {"role": "system", "content": "You are a terse benchmark assistant."},
                {"role": "user", "content": "Count from one to forty, one number per line."},
            ],
        }
    )
    log_dir = Path(tempfile.mkdtemp(prefix="kvgate-bench-"))
    workers = spawn_workers(
        1, str(DEFAULT_MODEL), 64, 8192, log_dir, ["--speedup-ratio", str(args.speedup_ratio), "--max-num-seqs", "1024"]
    )
    gateway: Service | None = None
    try:
        wait_healthy(workers)
        worker = workers[0]
        port = free_port()
        gateway = Service(
            "gateway",
            [
                sys.executable,
                "-m",
                "kvgate.gateway",
                "--port",
                port,
                "--log-level",
                "warning",
                # Dev tooling: no second listener whose port + 1 could be taken.
                "--admin-on-public-port",
                f"--worker=url={worker.url},id=w0,kv_events_endpoint=tcp://127.0.0.1:{worker.events_port},"
                f"kv_events_replay_endpoint=tcp://127.0.0.1:{worker.replay_port}",
            ],
            log_dir,
            f"http://127.0.0.1:{port}/health",
        )
        gateway.start()
        gateway.wait_healthy(60)

        # Warm both paths (connections, tokenizer caches, the worker's prefix cache).
        await drive("warmup", worker.port, body, args.concurrency, requests=args.concurrency * 20)
        await drive("warmup", port, body, args.concurrency, requests=args.concurrency * 20)

        lat_direct = await drive("direct", worker.port, body, args.latency_concurrency, requests=args.requests)
        lat_gateway = await drive(
            "gateway", port, body, args.latency_concurrency, requests=args.requests, cpu_pid=gateway.pid
        )
        tput_direct = await drive("direct", worker.port, body, args.concurrency, seconds=args.seconds)
        tput_gateway = await drive("gateway", port, body, args.concurrency, seconds=args.seconds, cpu_pid=gateway.pid)
        report(args, lat_direct, lat_gateway, tput_direct, tput_gateway)
    finally:
        if gateway is not None:
            gateway.stop()
        stop_workers(workers)


def report(
    args: argparse.Namespace,
    lat_direct: RunResult,
    lat_gateway: RunResult,
    tput_direct: RunResult,
    tput_gateway: RunResult,
) -> None:
    ms = 1000.0
    print(
        f"kvgate gateway benchmark: streamed chat, {args.chunks} tokens per answer, "
        f"worker --speedup-ratio {args.speedup_ratio:g}, {os.cpu_count()} CPUs on this machine"
    )
    print(f"\nTTFT at concurrency {args.latency_concurrency} ({args.requests} requests each):")
    print(f"  {'':8} {'p50 ms':>9} {'p99 ms':>9} {'mean ms':>9}")
    for r in (lat_direct, lat_gateway):
        print(f"  {r.label:8} {r.pct(0.5) * ms:9.3f} {r.pct(0.99) * ms:9.3f} {statistics.fmean(r.ttft) * ms:9.3f}")
    print(
        f"  {'added':8} {(lat_gateway.pct(0.5) - lat_direct.pct(0.5)) * ms:9.3f} "
        f"{(lat_gateway.pct(0.99) - lat_direct.pct(0.99)) * ms:9.3f} "
        f"{(statistics.fmean(lat_gateway.ttft) - statistics.fmean(lat_direct.ttft)) * ms:9.3f}"
        f"   (target: added p50 <= 2 ms)"
    )
    print(f"\nSustained streamed requests/s at concurrency {args.concurrency} ({args.seconds:g} s each):")
    for r in (tput_direct, tput_gateway):
        print(f"  {r.label:8} {r.rps:9.0f} req/s   failures {r.failures}")
    print(f"  ratio gateway/direct: {tput_gateway.rps / tput_direct.rps:.2f}")
    for r in (lat_gateway, tput_gateway):
        if r.cpu_seconds and r.requests:
            per = r.cpu_seconds / r.requests
            concurrency = args.latency_concurrency if r is lat_gateway else args.concurrency
            print(
                f"  gateway CPU ({r.label} run at c={concurrency}): "
                f"{per * 1e6:.0f} us/request, {r.cpu_seconds / r.seconds:.2f} cores busy "
                f"-> projected {1 / per:.0f} streamed req/s on one dedicated core (target >= 1000)"
            )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kvgate.dev.gateway_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=32, help="tokens (streamed chunks) per answer")
    parser.add_argument("--speedup-ratio", type=float, default=1e6, help="worker.sim speedup (engine time ~0)")
    parser.add_argument("--latency-concurrency", type=int, default=4, help="concurrency of the TTFT runs")
    parser.add_argument("--requests", type=int, default=2000, help="requests per TTFT run")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrency of the throughput runs")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each throughput run")
    args = parser.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
