"""NATS event source: a namespace's ``events.*`` stream into a ``KvIndexer``.

``StreamTracker`` (pure) orders each worker's sidecar session (``epoch``, ``seq``,
``reset``; the contract is in ``kvgate.protocol.messages``) into apply / skip / resync
decisions, and says which streams are in sync and which went silent.
``NatsEventSource`` is the asyncio edge that feeds the index, tells it which workers'
blocks to trust (``set_trusted``: not while a stream is out of sync or silent) and
asks sidecars to restate themselves. Never decodes engine bytes, never routes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from nats.aio.subscription import Subscription

from kvgate.bus import Bus
from kvgate.protocol.events import RouterEvent, WorkerKey
from kvgate.protocol.messages import EventsMessage

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do with one ``EventsMessage``."""

    apply: bool
    reset: bool = False
    request_resync: bool = False


@dataclass(slots=True)
class _WorkerStream:
    epoch: int
    last_seq: int
    last_seen: float
    in_sync: bool
    last_resync_request: float = -math.inf


@dataclass(slots=True)
class StreamStats:
    messages: int = 0
    applied: int = 0
    resets: int = 0
    duplicates: int = 0
    gaps: int = 0
    epochs_changed: int = 0
    not_accepted: int = 0
    resync_requests: int = 0
    bad_ranks: int = 0


class StreamTracker:
    """Per-worker ordering of ``events.<worker_id>``: what to apply, when to ask for a resync.

    A worker's stream is *in sync* from a ``reset`` message of its current epoch until a
    seq gap or an epoch change without a reset. Out of sync, messages are still applied
    (best effort, removals matter) but the worker counts as stale and a resync is asked
    for at most every ``resync_interval`` seconds. Messages from workers ``accept``
    refuses (not in discovery yet, or gone) are not applied, and leave the stream out of
    sync so it resyncs once the worker is accepted. A worker silent for ``stale_after``
    seconds (sidecars heartbeat when idle) is stale too.
    """

    def __init__(
        self, *, stale_after: float = 6.0, resync_interval: float = 1.0, accept: Callable[[str], bool] | None = None
    ) -> None:
        if stale_after <= 0 or resync_interval <= 0:
            raise ValueError("stale_after and resync_interval must be > 0")
        self.stale_after = stale_after
        self.resync_interval = resync_interval
        self.accept = accept
        self.stats = StreamStats()
        self._streams: dict[str, _WorkerStream] = {}

    def observe(self, msg: EventsMessage, now: float) -> Verdict:
        self.stats.messages += 1
        stream = self._streams.get(msg.worker_id)
        accepted = self.accept is None or self.accept(msg.worker_id)
        if stream is None:
            stream = self._streams[msg.worker_id] = _WorkerStream(msg.epoch, msg.seq - 1, now, False)
        stream.last_seen = now
        if msg.epoch != stream.epoch:
            self.stats.epochs_changed += 1
            stream.epoch, stream.in_sync = msg.epoch, False
        elif msg.seq <= stream.last_seq:
            self.stats.duplicates += 1
            return Verdict(apply=False)
        elif msg.seq > stream.last_seq + 1 and stream.in_sync:
            self.stats.gaps += 1
            stream.in_sync = False
        stream.last_seq = msg.seq
        if not accepted:
            self.stats.not_accepted += 1
            stream.in_sync = False
            return Verdict(apply=False)
        if msg.reset:
            self.stats.resets += 1
            self.stats.applied += 1
            stream.in_sync = True
            stream.last_resync_request = -math.inf  # answered: the next gap may ask at once
            return Verdict(apply=True, reset=True)
        self.stats.applied += 1
        if not stream.in_sync and now - stream.last_resync_request >= self.resync_interval:
            stream.last_resync_request = now
            self.stats.resync_requests += 1
            return Verdict(apply=True, request_resync=True)
        return Verdict(apply=True)

    def in_sync(self, worker_id: str) -> bool:
        stream = self._streams.get(worker_id)
        return stream is not None and stream.in_sync

    def silent(self, now: float) -> list[str]:
        """Workers in sync but not heard from within ``stale_after``: stale by silence."""
        return [wid for wid, s in self._streams.items() if s.in_sync and now - s.last_seen > self.stale_after]

    def workers(self) -> list[str]:
        return sorted(self._streams)

    def desync_all(self, now: float) -> list[str]:
        """Mark every stream out of sync (this consumer may have missed anything); returns
        the workers to ask for a resync, counted as asked at ``now``."""
        for stream in self._streams.values():
            stream.in_sync = False
            stream.last_resync_request = now
        self.stats.resync_requests += len(self._streams)
        return self.workers()

    def forget(self, worker_id: str) -> None:
        """The worker left discovery: its next message starts from scratch."""
        self._streams.pop(worker_id, None)


class RouterEventSink(Protocol):
    """What ``NatsEventSource`` feeds; ``KvIndexer`` is one."""

    def apply_router_events(self, key: WorkerKey, events: Sequence[RouterEvent]) -> None: ...

    def remove_worker(self, worker_id: str) -> None: ...

    def set_trusted(self, worker_id: str, trusted: bool) -> None: ...


SWEEPS_PER_STALE_AFTER = 4
"""Silence is noticed within ``stale_after * (1 + 1/4)``: nothing arrives to say so."""


class NatsEventSource:
    """Consumes ``events.*`` of a namespace into a ``RouterEventSink`` (a ``KvIndexer``).

    ``accept(worker_id)`` says whether a worker is currently known (pass the registry's
    ``__contains__``); call ``forget(worker_id)`` when discovery drops a worker and
    ``resync_all()`` from the connection's reconnected callback. ``ranks(worker_id)``
    (the worker's data-parallel size) bounds the ranks applied: events naming a rank the
    worker does not have are counted (``bad_ranks``) and dropped, since index state for
    them would outlive anything that could remove it.

    Trust: after every message of an accepted worker, the sink trusts it exactly while
    its stream is in sync (from a ``reset`` on, until a gap or a new epoch); a sweep
    every ``stale_after / 4`` withdraws trust from streams silent for ``stale_after``
    (sidecars heartbeat when idle), and their next in-order message restores it. A
    worker the tracker never heard from is left as the sink has it (the gateway's
    ``Fleet`` distrusts a NATS-fed worker when it joins).
    """

    def __init__(
        self,
        bus: Bus,
        sink: RouterEventSink,
        *,
        stale_after: float = 6.0,
        resync_interval: float = 1.0,
        accept: Callable[[str], bool] | None = None,
        ranks: Callable[[str], int] | None = None,
        consumer_id: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bus = bus
        self.sink = sink
        self.ranks = ranks
        self.tracker = StreamTracker(stale_after=stale_after, resync_interval=resync_interval, accept=accept)
        self.consumer_id = consumer_id
        self.clock = clock
        self._pending: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._sub: Subscription | None = None

    @property
    def stats(self) -> StreamStats:
        return self.tracker.stats

    async def start(self) -> None:
        self._sub = await self.bus.on_events(self.handle)
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_loop(), name="nats-events-sweep")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._sub is not None:
            await self.bus.unsubscribe(self._sub)
            self._sub = None
        for task in list(self._pending):
            task.cancel()

    def handle(self, msg: EventsMessage) -> None:
        worker_id = msg.worker_id
        verdict = self.tracker.observe(msg, self.clock())
        if verdict.reset:
            self.sink.remove_worker(worker_id)
        if verdict.apply and msg.events:
            if self.ranks is not None and msg.dp_rank >= self.ranks(worker_id):
                self.tracker.stats.bad_ranks += 1
            else:
                self.sink.apply_router_events(msg.key, msg.events)
        in_sync = self.tracker.in_sync(worker_id)
        # Not applied and out of sync: a worker not accepted (the sink holds nothing of it)
        # or a duplicate from one already distrusted.
        if verdict.apply or in_sync:
            self.sink.set_trusted(worker_id, in_sync)
        if verdict.request_resync:
            task = asyncio.get_running_loop().create_task(self._request_resync(worker_id))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    def sweep(self) -> None:
        """Withdraw trust from in-sync streams silent for ``stale_after``."""
        for worker_id in self.tracker.silent(self.clock()):
            self.sink.set_trusted(worker_id, False)

    async def resync_all(self) -> None:
        """After this consumer's own NATS reconnect: ask every known worker to restate itself
        rather than wait for each one's next message to reveal the gap. Until then none of
        them is trusted: anything may have been missed."""
        trusted = [wid for wid in self.tracker.workers() if self.tracker.in_sync(wid)]
        asked = self.tracker.desync_all(self.clock())
        for worker_id in trusted:
            self.sink.set_trusted(worker_id, False)
        for worker_id in asked:
            await self._request_resync(worker_id)

    def forget(self, worker_id: str) -> None:
        self.tracker.forget(worker_id)

    async def _sweep_loop(self) -> None:
        interval = self.tracker.stale_after / SWEEPS_PER_STALE_AFTER
        while True:
            await asyncio.sleep(interval)
            self.sweep()

    async def _request_resync(self, worker_id: str) -> None:
        try:
            await self.bus.request_resync(worker_id, self.consumer_id)
        except Exception as exc:  # disconnected with a full buffer: the next message asks again
            log.info("resync request for %s not sent: %s", worker_id, exc)
