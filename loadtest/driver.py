"""The bench's load driver: asyncio + aiohttp, one record per request.

Why not locust here: the report needs every request's TTFT, inter-token gaps,
worker and cached tokens (for CDFs and per-worker counts), and trace replay
needs open-loop arrivals at the trace's timestamps. Locust's CSV output only
has aggregated percentiles and its users are closed-loop, so the bench drives
load itself; ``locustfile.py`` sends the same workloads for people who want
locust's UI or distributed runners.

Two shapes of load:
- closed loop (chat workloads): ``users`` sessions, each sending its next
  request when the previous answer is complete, until the duration is over;
- open loop (trace): every request is sent at its scheduled offset whether or
  not earlier ones are done.

This is the asyncio edge; request contents come from ``workloads.py`` and the
measurement from ``stream.py``.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import aiohttp
import numpy as np

from kvgate.loadtest.stream import RequestRecord, StreamObserver
from kvgate.loadtest.workloads import RequestSpec, Session, TimedRequest


@dataclass(frozen=True)
class DriverConfig:
    base_url: str
    duration_s: float = 30.0
    request_timeout_s: float = 300.0
    drain_timeout_s: float = 60.0  # after the last send: how long in-flight requests may finish
    think_time_s: float = 0.0  # closed loop: mean pause between a user's requests
    ramp_up_s: float = 0.0  # closed loop: each user starts after a seeded delay in [0, ramp_up_s)
    seed: int = 0  # think-time jitter
    progress_every_s: float = 2.0
    label: str = ""


@dataclass
class RunOutcome:
    records: list[RequestRecord]
    duration_s: float  # first send to last answer
    sent: list[tuple[RequestRecord, RequestSpec]] = field(default_factory=list)  # what each record sent, in order


class Progress:
    """Counts what the run has done and prints one status line every few seconds."""

    def __init__(self, label: str, duration_s: float, out: Callable[[str], None] | None = None):
        self.label, self.duration_s = label, duration_s
        self.sent = self.done = self.errors = 0
        self._recent_ttft: list[float] = []
        self._out = out or (lambda line: print(line, file=sys.stderr, flush=True))

    def record(self, rec: RequestRecord) -> None:
        self.done += 1
        if rec.ok:
            self._recent_ttft.append(rec.ttft_s or 0.0)
        else:
            self.errors += 1

    def line(self, elapsed: float) -> str:
        ttft = f"{np.percentile(self._recent_ttft, 50) * 1000:.0f}ms" if self._recent_ttft else "–"
        self._recent_ttft = []
        return (
            f"[{self.label}] {elapsed:5.1f}/{self.duration_s:.0f}s sent {self.sent} done {self.done} "
            f"in-flight {self.sent - self.done} errors {self.errors} "
            f"req/s {self.done / elapsed if elapsed > 0 else 0:.1f} TTFT p50(last) {ttft}"
        )

    async def run(self, t0: float, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            self._out(self.line(time.perf_counter() - t0))


def observer(spec: RequestSpec) -> StreamObserver:
    return StreamObserver(RequestRecord(spec.workload, spec.user, spec.turn, 0.0), time.perf_counter())


async def send(
    http: aiohttp.ClientSession, base_url: str, spec: RequestSpec, obs: StreamObserver, t0: float, timeout_s: float
) -> RequestRecord:
    """Send one streaming request and feed ``obs``; the streamed text stays in ``obs.text``."""
    data = json.dumps(spec.body).encode()  # serialized before the clock starts
    obs.sent_at = time.perf_counter()
    obs.record.start_s = obs.sent_at - t0
    try:
        async with http.post(
            base_url.rstrip("/") + spec.path,
            data=data,
            headers={"content-type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as resp:
            obs.on_headers(resp.status, resp.headers)
            if resp.status != 200:
                obs.error_body(await resp.read())
                return obs.finish(time.perf_counter())
            async for chunk in resp.content.iter_any():
                obs.feed(chunk, time.perf_counter())
            return obs.finish(time.perf_counter())
    except TimeoutError:
        return obs.fail(f"timeout after {timeout_s}s", time.perf_counter())
    except (aiohttp.ClientError, OSError) as exc:
        return obs.fail(f"{type(exc).__name__}: {exc}", time.perf_counter())


def _session(limit: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit))


async def _drain(tasks: Sequence[asyncio.Task], timeout_s: float) -> None:
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


def _outcome(records: list[RequestRecord], sent: list[tuple[RequestRecord, RequestSpec]]) -> RunOutcome:
    if not records:
        return RunOutcome([], 0.0)
    first = min(r.start_s for r in records)
    last = max(r.start_s + (r.e2e_s or 0.0) for r in records)
    return RunOutcome(
        sorted(records, key=lambda r: r.start_s), last - first, sorted(sent, key=lambda pair: pair[0].start_s)
    )


async def _send_recorded(
    http: aiohttp.ClientSession,
    config: DriverConfig,
    spec: RequestSpec,
    t0: float,
    records: list[RequestRecord],
    progress: Progress,
    sent: list[tuple[RequestRecord, RequestSpec]],
) -> StreamObserver:
    """Send one request and keep its record, even when the drain timeout cancels it."""
    obs = observer(spec)
    sent.append((obs.record, spec))
    try:
        rec = await send(http, config.base_url, spec, obs, t0, config.request_timeout_s)
    except asyncio.CancelledError:
        records.append(obs.fail("cancelled at drain timeout", time.perf_counter()))
        raise
    records.append(rec)
    progress.record(rec)
    return obs


async def run_closed_loop(config: DriverConfig, sessions: Sequence[Session]) -> RunOutcome:
    records: list[RequestRecord] = []
    sent: list[tuple[RequestRecord, RequestSpec]] = []
    progress = Progress(config.label, config.duration_s)
    t0 = time.perf_counter()
    deadline = t0 + config.duration_s

    async def user(index: int, session_: Session, http: aiohttp.ClientSession) -> None:
        # Uniform jitter around the mean: with a fixed pause, N users over M workers in
        # round-robin settle into a period that pins each user to one worker.
        jitter = random.Random(f"think:{config.seed}:{index}")
        if config.ramp_up_s:
            # Users that all start at t0 move in lockstep: their long late turns arrive
            # together in waves no real fleet sees. A seeded start spreads them out.
            await asyncio.sleep(random.Random(f"ramp:{config.seed}:{index}").uniform(0.0, config.ramp_up_s))
        while time.perf_counter() < deadline:
            spec = session_.next_request()
            progress.sent += 1
            obs = await _send_recorded(http, config, spec, t0, records, progress, sent)
            session_.observe(obs.text)
            if config.think_time_s:
                await asyncio.sleep(jitter.uniform(0.0, 2.0 * config.think_time_s))

    async with _session(len(sessions)) as http:
        ticker = asyncio.create_task(progress.run(t0, config.progress_every_s))
        try:
            tasks = [asyncio.create_task(user(i, s, http)) for i, s in enumerate(sessions)]
            await _drain(tasks, config.duration_s + config.drain_timeout_s)
        finally:
            ticker.cancel()
    return _outcome(records, sent)


async def run_open_loop(config: DriverConfig, requests: Sequence[TimedRequest]) -> RunOutcome:
    records: list[RequestRecord] = []
    sent: list[tuple[RequestRecord, RequestSpec]] = []
    progress = Progress(config.label, max((r.offset_s for r in requests), default=0.0))

    async def one(spec: RequestSpec, http: aiohttp.ClientSession, t0: float) -> None:
        await _send_recorded(http, config, spec, t0, records, progress, sent)

    async with _session(0) as http:
        t0 = time.perf_counter()
        ticker = asyncio.create_task(progress.run(t0, config.progress_every_s))
        tasks: list[asyncio.Task] = []
        try:
            for timed in requests:
                delay = t0 + timed.offset_s - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                progress.sent += 1
                tasks.append(asyncio.create_task(one(timed.spec, http, t0)))
            await _drain(tasks, config.drain_timeout_s)
        finally:
            ticker.cancel()
    return _outcome(records, sent)


async def run_open_loop_sessions(
    config: DriverConfig, arrivals: Sequence[float], new_session: Callable[[int], Session], users: int
) -> RunOutcome:
    """Open-loop arrivals (seconds after the start) served by chat sessions.

    Each arrival is sent at its time by an idle session (its reply is in, so the request
    extends that conversation), picked at random (seeded): taking them in a fixed order
    would give each session a period that pins it to one worker under round-robin. When
    every session is waiting for a reply, a new one (a new user) is started, so an arrival
    never waits. ``users`` sessions exist from the start."""
    records: list[RequestRecord] = []
    sent: list[tuple[RequestRecord, RequestSpec]] = []
    progress = Progress(config.label, max(arrivals, default=0.0))
    sessions = [new_session(u) for u in range(users)]
    idle = list(range(users))
    pick = random.Random(f"pick:{config.seed}")

    async def one(index: int, http: aiohttp.ClientSession, t0: float) -> None:
        spec = sessions[index].next_request()
        obs = await _send_recorded(http, config, spec, t0, records, progress, sent)
        sessions[index].observe(obs.text)
        idle.append(index)

    async with _session(0) as http:
        t0 = time.perf_counter()
        ticker = asyncio.create_task(progress.run(t0, config.progress_every_s))
        tasks: list[asyncio.Task] = []
        try:
            for offset in arrivals:
                delay = t0 + offset - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if not idle:
                    sessions.append(new_session(len(sessions)))
                    idle.append(len(sessions) - 1)
                progress.sent += 1
                chosen = idle.pop(pick.randrange(len(idle)))
                tasks.append(asyncio.create_task(one(chosen, http, t0)))
            await _drain(tasks, config.drain_timeout_s)
        finally:
            ticker.cancel()
    return _outcome(records, sent)
