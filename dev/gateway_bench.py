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

    def __init__(self, host: str, port: int, path: str) -> None:
        self.host, self.port = host, port
        self.head = f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def exchange(self, body: bytes) -> tuple[float, int]:
        """(seconds to the first SSE event, HTTP status)."""
        assert self.reader is not None and self.writer is not None
        reader = self.reader
        request = f"{self.head}Content-Length: {len(body)}\r\n\r\n".encode() + body
        t0 = time.perf_counter()
        self.writer.write(request)
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


class Conversations:
    """The request bodies: multi-turn chats, each turn the previous one plus an answer and a question.

    Every conversation opens with its own system message (so no two share a cached
    prefix beyond the chat template's first tokens) sized so that its last turn holds
    about ``prompt_tokens`` tokens; each connection walks one conversation turn by turn,
    then takes the next. With ``turns=1`` every request is a new first turn. With
    ``prompt_tokens=0`` every request is the same short two-message chat (the old bench).
    """

    WORDS = (
        "cache block prefix token router worker engine stream latency request prompt tier index event "
        "load score batch queue model chat answer memory offload decode prefill gateway metric sample"
    ).split()

    def __init__(self, prompt_tokens: int, turns: int, chunks: int, include_usage: bool) -> None:
        self.turns = max(1, turns)
        self.prompt_tokens = prompt_tokens
        self.common: dict[str, object] = {
            "model": "kvgate-tiny",
            "stream": True,
            "max_tokens": chunks,
            "ignore_eos": True,
        }
        if include_usage:
            self.common["stream_options"] = {"include_usage": True}
        self._next = 0
        self.user_words = 120
        self.answer_words = 60
        self.system_words = 0
        self.measured_tokens: float | None = None
        if prompt_tokens:
            self._calibrate()

    def _filler(self, seed: int, words: int) -> str:
        w = self.WORDS
        return " ".join(w[(seed * 7 + i * (seed % 5 + 1)) % len(w)] for i in range(words))

    def _messages(self, conversation: int, turn: int) -> list[dict[str, str]]:
        messages = [
            {
                "role": "system",
                "content": f"Conversation {conversation}. " + self._filler(conversation, self.system_words),
            }
        ]
        for t in range(turn + 1):
            if t:
                messages.append({"role": "assistant", "content": self._filler(conversation + 3 * t, self.answer_words)})
            messages.append(
                {"role": "user", "content": f"Question {t}: " + self._filler(conversation + t, self.user_words)}
            )
        return messages

    def _calibrate(self) -> None:
        """Size the system message so the last turn has about ``prompt_tokens`` tokens (the real tokenizer)."""
        from kvgate.gateway.tokenization import Preprocessor

        with Preprocessor.load(str(DEFAULT_MODEL)) as pre:
            self.system_words = 100
            base = len(pre.encode_chat(self._messages(0, self.turns - 1)))
            self.system_words = 200
            more = len(pre.encode_chat(self._messages(0, self.turns - 1)))
            per_word = (more - base) / 100
            self.system_words = max(1, int(200 + (self.prompt_tokens - more) / per_word))
            self.measured_tokens = len(pre.encode_chat(self._messages(0, self.turns - 1)))

    def body(self, conversation: int, turn: int) -> bytes:
        if not self.prompt_tokens:
            messages = [
                {"role": "system", "content": "You are a terse benchmark assistant."},
                {"role": "user", "content": "Count from one to forty, one number per line."},
            ]
        else:
            messages = self._messages(conversation, turn)
        return orjson.dumps({**self.common, "messages": messages})

    def walker(self):
        """An endless sequence of bodies: one conversation's turns, then the next conversation's."""
        while True:
            conversation = self._next
            self._next += 1
            for turn in range(self.turns):
                yield self.body(conversation, turn)


async def drive(
    label: str,
    port: int,
    workload: Conversations,
    concurrency: int,
    *,
    requests: int | None = None,
    seconds: float | None = None,
    cpu_pids: Sequence[int] = (),
) -> RunResult:
    """``concurrency`` connections in a closed loop, for ``requests`` total or ``seconds``."""
    conns = [Connection("127.0.0.1", port, "/v1/chat/completions") for _ in range(concurrency)]
    await asyncio.gather(*(c.open() for c in conns))
    ttfts: list[float] = []
    done = 0
    failures = 0
    budget = requests
    deadline = None

    async def loop(conn: Connection) -> None:
        nonlocal done, failures, budget
        bodies = workload.walker()
        while True:
            if budget is not None:
                if budget <= 0:
                    return
                budget -= 1
            elif time.perf_counter() >= deadline:
                return
            ttft, status = await conn.exchange(next(bodies))
            if status == 200:
                ttfts.append(ttft)
                done += 1
            else:
                failures += 1

    cpu0 = sum(_cpu_seconds(pid) for pid in cpu_pids)
    start = time.perf_counter()
    if seconds is not None:
        deadline = start + seconds
    await asyncio.gather(*(loop(c) for c in conns))
    elapsed = time.perf_counter() - start
    cpu = sum(_cpu_seconds(pid) for pid in cpu_pids) - cpu0 if cpu_pids else None
    for c in conns:
        c.close()
    return RunResult(label, ttfts, done, elapsed, failures, cpu)


def _cpu_seconds(pid: int | None) -> float:
    """utime + stime of ``pid`` (all its threads), from /proc."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _family_pids(pid: int) -> list[int]:
    """``pid`` and its child processes (the gateway's ``--processes``)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [pid, *(int(c) for c in children.read_text().split())]
    except OSError:
        return [pid]


async def loop_max_gap(port: int) -> float | None:
    """``kvgate_event_loop_max_gap_seconds`` from the gateway's /metrics (the max since the last scrape)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    for line in data.decode().splitlines():
        if line.startswith("kvgate_event_loop_max_gap_seconds"):
            return float(line.rsplit(" ", 1)[1])
    return None


async def bench(args: argparse.Namespace) -> None:
    workload = Conversations(args.prompt_tokens, args.turns, args.chunks, not args.no_usage)
    log_dir = Path(tempfile.mkdtemp(prefix="kvgate-bench-"))
    max_model_len = max(8192, args.prompt_tokens + args.chunks + 256)
    workers = spawn_workers(
        1,
        str(DEFAULT_MODEL),
        64,
        max_model_len,
        log_dir,
        ["--speedup-ratio", str(args.speedup_ratio or 1), "--max-num-seqs", "1024"],
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
                "--context-length",
                max_model_len,
                f"--worker=url={worker.url},id=w0,kv_events_endpoint=tcp://127.0.0.1:{worker.events_port},"
                f"kv_events_replay_endpoint=tcp://127.0.0.1:{worker.replay_port}",
                *args.gateway_arg,
            ],
            log_dir,
            f"http://127.0.0.1:{port}/health",
        )
        gateway.start()
        gateway.wait_healthy(60)
        pids = _family_pids(gateway.pid)

        # Warm both paths (connections, tokenizer caches, the worker's prefix cache).
        await drive("warmup", worker.port, workload, args.concurrency, requests=args.concurrency * 4)
        await drive("warmup", port, workload, args.concurrency, requests=args.concurrency * 4)

        lat_direct = await drive("direct", worker.port, workload, args.latency_concurrency, requests=args.requests)
        await loop_max_gap(port)  # resets the max
        lat_gateway = await drive(
            "gateway", port, workload, args.latency_concurrency, requests=args.requests, cpu_pids=pids
        )
        lat_gap = await loop_max_gap(port)
        tput_direct = await drive("direct", worker.port, workload, args.concurrency, seconds=args.seconds)
        tput_gateway = await drive("gateway", port, workload, args.concurrency, seconds=args.seconds, cpu_pids=pids)
        tput_gap = await loop_max_gap(port)
        report(args, workload, lat_direct, lat_gateway, tput_direct, tput_gateway, (lat_gap, tput_gap), len(pids))
    finally:
        if gateway is not None:
            gateway.stop()
        stop_workers(workers)


def report(
    args: argparse.Namespace,
    workload: Conversations,
    lat_direct: RunResult,
    lat_gateway: RunResult,
    tput_direct: RunResult,
    tput_gateway: RunResult,
    gaps: tuple[float | None, float | None],
    processes: int,
) -> None:
    ms = 1000.0
    prompt = (
        f"{args.turns}-turn chats, last turn ~{workload.measured_tokens:.0f} prompt tokens"
        if workload.prompt_tokens
        else "one short chat"
    )
    print(
        f"kvgate gateway benchmark: streamed {prompt}, {args.chunks} tokens per answer, "
        f"worker --speedup-ratio {args.speedup_ratio:g}, gateway processes {max(1, processes - 1)} "
        f"(extra flags: {' '.join(args.gateway_arg) or 'none'}), {os.cpu_count()} CPUs on this machine"
    )
    print(f"\nTTFT at concurrency {args.latency_concurrency} ({args.requests} requests each):")
    print(f"  {'':8} {'p50 ms':>9} {'p99 ms':>9} {'mean ms':>9}")
    for r in (lat_direct, lat_gateway):
        print(f"  {r.label:8} {r.pct(0.5) * ms:9.3f} {r.pct(0.99) * ms:9.3f} {statistics.fmean(r.ttft) * ms:9.3f}")
    print(
        f"  {'added':8} {(lat_gateway.pct(0.5) - lat_direct.pct(0.5)) * ms:9.3f} "
        f"{(lat_gateway.pct(0.99) - lat_direct.pct(0.99)) * ms:9.3f} "
        f"{(statistics.fmean(lat_gateway.ttft) - statistics.fmean(lat_direct.ttft)) * ms:9.3f}"
    )
    print(f"\nSustained streamed requests/s at concurrency {args.concurrency} ({args.seconds:g} s each):")
    for r in (tput_direct, tput_gateway):
        print(f"  {r.label:8} {r.rps:9.0f} req/s   failures {r.failures}")
    print(f"  ratio gateway/direct: {tput_gateway.rps / tput_direct.rps:.2f}")
    for r, gap in zip((lat_gateway, tput_gateway), gaps):
        concurrency = args.latency_concurrency if r is lat_gateway else args.concurrency
        if r.cpu_seconds is not None and r.requests:
            per = r.cpu_seconds / r.requests
            print(
                f"  gateway CPU (c={concurrency}): {per * 1e3:.2f} ms/request, "
                f"{r.cpu_seconds / r.seconds:.2f} cores busy -> {1 / per:.0f} req/s per dedicated core"
            )
        if gap is not None:
            print(f"  event loop max gap (c={concurrency}): {gap * ms:.2f} ms")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kvgate.dev.gateway_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=32, help="tokens (streamed chunks) per answer")
    parser.add_argument(
        "--prompt-tokens", type=int, default=2400, help="tokens of a conversation's last turn; 0: one short chat"
    )
    parser.add_argument("--turns", type=int, default=4, help="turns per conversation (1: every request a first turn)")
    parser.add_argument("--no-usage", action="store_true", help="do not ask for the usage chunk (stream_options)")
    parser.add_argument(
        "--speedup-ratio",
        type=float,
        default=1e6,
        help="worker.sim speedup (1e6: engine time ~0; 1: the modelled GPU's speed)",
    )
    parser.add_argument("--latency-concurrency", type=int, default=1, help="concurrency of the TTFT runs")
    parser.add_argument("--requests", type=int, default=400, help="requests per TTFT run")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrency of the throughput runs")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each throughput run")
    parser.add_argument(
        "--gateway-arg",
        action="append",
        default=[],
        help="extra gateway flag, e.g. --gateway-arg=--processes=2 (repeatable)",
    )
    args = parser.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
