"""The NATS event bus: subjects, message codec, and the consumer that feeds an index.

Subjects of a namespace (``kvgate.<ns>.`` — see ARCHITECTURE.md):

* ``events.<worker_id>``  ``EventsMessage``: router-native events of one worker, already
  translated by its sidecar (block hashes are router sequence hashes);
* ``load.<worker_id>``    ``LoadMessage``: running / waiting requests and KV usage;
* ``active.<router_id>``  ``ActiveMessage``: a gateway replica's in-flight requests;
* ``resync.<worker_id>``  ``ResyncRequest``: a consumer that lost track of a worker's
  stream asks its sidecar to restate everything (an addition to the three subjects of
  ARCHITECTURE.md: core NATS delivers at most once, so a late-joining or gapped
  consumer needs a way back).

Ordering contract of ``events.<worker_id>`` (one publisher, the worker's sidecar): each
sidecar process picks a random ``epoch`` and numbers its messages ``seq`` 0, 1, 2, …
across all dp ranks. A message with ``reset=True`` starts a full restatement: every
rank of the worker is void before it, and it plus the messages after it describe the
worker's whole cache. Every sidecar session starts with one, sends one again after a
NATS reconnect and when asked on ``resync``, and sends an empty message as a heartbeat
when idle. ``StreamTracker`` (pure) turns that into apply / skip / resync decisions
and a staleness verdict; ``NatsEventSource`` (asyncio) is the edge that feeds a
``KvIndexer``. Payloads are msgspec msgpack; malformed ones raise ``BusDecodeError``
(``kind`` is a metric label), counted and dropped by the consumers.

Never decides routes and never decodes engine bytes (``indexer.wire`` does that).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Literal, Protocol

import msgspec
import nats

from indexer.events import RouterCleared, RouterEvent, RouterRemoved, RouterStored, Tier, WorkerKey

log = logging.getLogger(__name__)

SUBJECT_ROOT = "kvgate"
_FORBIDDEN_IN_TOKEN = frozenset(".*> \t\r\n")


class BusDecodeError(ValueError):
    """A bus payload that is not a valid message; ``kind`` labels the cause."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


def check_token(what: str, value: str) -> str:
    """``value`` as one NATS subject token (no dots, wildcards or whitespace)."""
    if not isinstance(value, str) or not value or any(c in _FORBIDDEN_IN_TOKEN for c in value):
        raise ValueError(f"{what} must be a non-empty string without '.', '*', '>' or whitespace, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class Subjects:
    """The subjects of one namespace."""

    namespace: str = "default"

    def __post_init__(self) -> None:
        check_token("namespace", self.namespace)

    @property
    def prefix(self) -> str:
        return f"{SUBJECT_ROOT}.{self.namespace}"

    def events(self, worker_id: str) -> str:
        return f"{self.prefix}.events.{check_token('worker id', worker_id)}"

    def load(self, worker_id: str) -> str:
        return f"{self.prefix}.load.{check_token('worker id', worker_id)}"

    def active(self, router_id: str) -> str:
        return f"{self.prefix}.active.{check_token('router id', router_id)}"

    def resync(self, worker_id: str) -> str:
        return f"{self.prefix}.resync.{check_token('worker id', worker_id)}"

    @property
    def all_events(self) -> str:
        return f"{self.prefix}.events.*"

    @property
    def all_load(self) -> str:
        return f"{self.prefix}.load.*"

    @property
    def all_active(self) -> str:
        return f"{self.prefix}.active.*"


# --- messages -----------------------------------------------------------------------

# msgpack integers stop at 2**64 - 1, so non-negative is the whole u64 check.
_U64 = Annotated[int, msgspec.Meta(ge=0)]
_Count = Annotated[int, msgspec.Meta(ge=0)]
_TierNo = Annotated[int, msgspec.Meta(ge=0, le=len(Tier) - 1)]
_Token = Annotated[str, msgspec.Meta(min_length=1, pattern=r"^[^.*>\s]+$")]


@dataclass(slots=True)
class EventsMessage:
    """Router-native events of one worker rank, numbered within a sidecar session."""

    worker_id: str
    dp_rank: int
    seq: int
    epoch: int
    events: list[RouterEvent] = field(default_factory=list)
    reset: bool = False

    @property
    def key(self) -> WorkerKey:
        return WorkerKey(self.worker_id, self.dp_rank)


class LoadMessage(msgspec.Struct, frozen=True, kw_only=True):
    """A worker rank's engine load, scraped from its ``/metrics``; ``ts`` is wall-clock seconds."""

    worker_id: _Token
    dp_rank: _Count = 0
    running: _Count
    waiting: _Count
    kv_usage: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
    ts: float

    @property
    def key(self) -> WorkerKey:
        return WorkerKey(self.worker_id, self.dp_rank)


ActiveOp = Literal["add", "prefill_done", "finish", "leave", "alive", "sync"]


class ActiveMessage(msgspec.Struct, frozen=True, kw_only=True):
    """One change to a gateway replica's in-flight requests.

    ``add``: routed to (worker_id, dp_rank) with ``new_prefill_tokens`` still to prefill
    and ``blocks`` KV blocks to hold; ``prefill_done``: its first token came (sent with
    the same worker and ``blocks`` and ``new_prefill_tokens=0``, so a replica that missed
    the ``add`` still counts it); ``finish``: completed or cancelled; ``leave``: drop all
    of the replica's requests (it shuts down, or restates them: ``leave`` then one
    ``add`` / ``prefill_done`` per request still in flight); ``alive``: a heartbeat, so
    a replica that died without ``leave`` is forgotten after a timeout; ``sync``: ask
    every other replica to restate (the sender just joined or reconnected and may have
    missed messages). Only ``add`` / ``prefill_done`` / ``finish`` use the request fields.
    Receivers skip their own ``router_id``.
    """

    router_id: _Token
    op: ActiveOp
    request_id: str = ""
    worker_id: str = ""
    dp_rank: _Count = 0
    prompt_tokens: _Count = 0
    new_prefill_tokens: _Count = 0
    blocks: _Count = 0
    ts: float = 0.0

    @property
    def key(self) -> WorkerKey:
        return WorkerKey(self.worker_id, self.dp_rank)


class ResyncRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Ask a worker's sidecar for a ``reset`` restatement of its whole cache."""

    worker_id: _Token
    requester: str = ""


class _Stored(msgspec.Struct, tag=0, array_like=True, gc=False):
    hashes: list[_U64]
    tier: _TierNo = 0


class _Removed(msgspec.Struct, tag=1, array_like=True, gc=False):
    hashes: list[_U64]
    tier: _TierNo = 0


class _Cleared(msgspec.Struct, tag=2, array_like=True, gc=False):
    pass


class _EventsWire(msgspec.Struct, array_like=True, gc=False):
    worker_id: _Token
    dp_rank: _Count
    seq: _Count
    epoch: _U64
    events: list[_Stored | _Removed | _Cleared]
    reset: bool = False


_encoder = msgspec.msgpack.Encoder()
_events_decoder = msgspec.msgpack.Decoder(_EventsWire)
_load_decoder = msgspec.msgpack.Decoder(LoadMessage)
_active_decoder = msgspec.msgpack.Decoder(ActiveMessage)
_resync_decoder = msgspec.msgpack.Decoder(ResyncRequest)


def encode_events(msg: EventsMessage) -> bytes:
    wire: list[_Stored | _Removed | _Cleared] = []
    for event in msg.events:
        if isinstance(event, RouterStored):
            wire.append(_Stored(event.hashes, int(event.tier)))
        elif isinstance(event, RouterRemoved):
            wire.append(_Removed(event.hashes, int(event.tier)))
        elif isinstance(event, RouterCleared):
            wire.append(_Cleared())
        else:
            raise TypeError(f"not a router event: {event!r}")
    return _encoder.encode(_EventsWire(msg.worker_id, msg.dp_rank, msg.seq, msg.epoch, wire, msg.reset))


def decode_events(payload: bytes) -> EventsMessage:
    wire = _decode(_events_decoder, payload)
    events: list[RouterEvent] = []
    for e in wire.events:
        if type(e) is _Stored:
            events.append(RouterStored(e.hashes, Tier(e.tier)))
        elif type(e) is _Removed:
            events.append(RouterRemoved(e.hashes, Tier(e.tier)))
        else:
            events.append(RouterCleared())
    return EventsMessage(wire.worker_id, wire.dp_rank, wire.seq, wire.epoch, events, wire.reset)


def encode_load(msg: LoadMessage) -> bytes:
    return _encoder.encode(msg)


def decode_load(payload: bytes) -> LoadMessage:
    return _decode(_load_decoder, payload)


def encode_active(msg: ActiveMessage) -> bytes:
    return _encoder.encode(msg)


def decode_active(payload: bytes) -> ActiveMessage:
    return _decode(_active_decoder, payload)


def encode_resync(msg: ResyncRequest) -> bytes:
    return _encoder.encode(msg)


def decode_resync(payload: bytes) -> ResyncRequest:
    return _decode(_resync_decoder, payload)


def _decode(decoder: msgspec.msgpack.Decoder, payload: bytes):
    if not payload:
        raise BusDecodeError("empty")
    try:
        return decoder.decode(payload)
    except msgspec.ValidationError as exc:
        raise BusDecodeError("bad_shape", str(exc)) from None
    except msgspec.DecodeError as exc:
        raise BusDecodeError("not_msgpack", str(exc)) from None
    except RecursionError:
        raise BusDecodeError("not_msgpack", "nesting too deep") from None


def new_epoch() -> int:
    """A sidecar session id: random, so a restarted sidecar is never mistaken for the old one."""
    return int.from_bytes(os.urandom(8), "big")


# --- stream tracking (pure) ---------------------------------------------------------


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

    def __init__(self, *, stale_after: float = 6.0, resync_interval: float = 1.0,
                 accept: Callable[[str], bool] | None = None) -> None:
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

    def is_stale(self, worker_id: str, now: float) -> bool:
        """True unless the worker's stream is in sync and heard from within ``stale_after``."""
        stream = self._streams.get(worker_id)
        return stream is None or not stream.in_sync or now - stream.last_seen > self.stale_after

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


# --- the asyncio edge ---------------------------------------------------------------


class RouterEventSink(Protocol):
    """What ``NatsEventSource`` feeds; ``KvIndexer`` is one."""

    def apply_router_events(self, key: WorkerKey, events: Sequence[RouterEvent]) -> None: ...

    def remove_worker(self, worker_id: str) -> None: ...


async def connect_nats(url: str | Sequence[str], *, name: str,
                       on_reconnected: Callable[[], Awaitable[None]] | None = None,
                       on_disconnected: Callable[[], Awaitable[None]] | None = None,
                       reconnect_time_wait: float = 0.5):
    """A nats-py client that never gives up: waits for the server at start, reconnects forever.

    ``url``: one server, a comma-separated list, or a sequence of URLs.

    Publishes made while disconnected are buffered (up to nats-py's pending size) and
    flushed on reconnect; subscriptions are restored by nats-py itself.
    """
    servers = [u.strip() for u in url.split(",") if u.strip()] if isinstance(url, str) else list(url)

    async def error_cb(exc: Exception) -> None:
        log.debug("nats %s: %s", name, exc)

    async def reconnected_cb() -> None:
        log.info("nats %s: reconnected", name)
        if on_reconnected is not None:
            await on_reconnected()

    async def disconnected_cb() -> None:
        log.info("nats %s: disconnected", name)
        if on_disconnected is not None:
            await on_disconnected()

    return await nats.connect(
        servers, name=name, allow_reconnect=True, max_reconnect_attempts=-1,
        reconnect_time_wait=reconnect_time_wait, connect_timeout=2, ping_interval=5,
        max_outstanding_pings=2, error_cb=error_cb, reconnected_cb=reconnected_cb,
        disconnected_cb=disconnected_cb,
    )


class Bus:
    """Typed publish / subscribe over one NATS connection for one namespace."""

    def __init__(self, nc, namespace: str = "default") -> None:
        self.nc = nc
        self.subjects = Subjects(namespace)
        self.rejected: Counter[str] = Counter()
        self._subs: list = []

    async def publish_events(self, msg: EventsMessage) -> None:
        await self.nc.publish(self.subjects.events(msg.worker_id), encode_events(msg))

    async def publish_load(self, msg: LoadMessage) -> None:
        await self.nc.publish(self.subjects.load(msg.worker_id), encode_load(msg))

    async def publish_active(self, msg: ActiveMessage) -> None:
        await self.nc.publish(self.subjects.active(msg.router_id), encode_active(msg))

    async def request_resync(self, worker_id: str, requester: str = "") -> None:
        msg = ResyncRequest(worker_id=worker_id, requester=requester)
        await self.nc.publish(self.subjects.resync(worker_id), encode_resync(msg))

    # Each ``on_*`` returns the nats-py subscription; ``unsubscribe`` ends it, ``close`` ends all.

    async def on_events(self, callback: Callable[[EventsMessage], None]):
        return await self._subscribe(self.subjects.all_events, decode_events, callback)

    async def on_load(self, callback: Callable[[LoadMessage], None]):
        return await self._subscribe(self.subjects.all_load, decode_load, callback)

    async def on_active(self, callback: Callable[[ActiveMessage], None]):
        return await self._subscribe(self.subjects.all_active, decode_active, callback)

    async def on_resync(self, worker_id: str, callback: Callable[[ResyncRequest], None]):
        return await self._subscribe(self.subjects.resync(worker_id), decode_resync, callback)

    async def unsubscribe(self, sub) -> None:
        if sub in self._subs:
            self._subs.remove(sub)
        try:
            await sub.unsubscribe()
        except Exception as exc:  # a closed connection has nothing left to unsubscribe
            log.debug("unsubscribe: %s", exc)

    async def close(self) -> None:
        """Unsubscribe everything this Bus subscribed; the connection stays the caller's."""
        for sub in list(self._subs):
            await self.unsubscribe(sub)

    async def _subscribe(self, subject: str, decode: Callable[[bytes], object], callback: Callable):
        async def handler(msg) -> None:
            try:
                decoded = decode(msg.data)
            except BusDecodeError as err:
                self.rejected[err.kind] += 1
                log.warning("dropped a bad message on %s: %s", msg.subject, err)
                return
            try:
                callback(decoded)
            except Exception:
                log.exception("bus callback for %s failed", msg.subject)

        sub = await self.nc.subscribe(subject, cb=handler)
        self._subs.append(sub)
        return sub


class NatsEventSource:
    """Consumes ``events.*`` of a namespace into a ``RouterEventSink`` (a ``KvIndexer``).

    ``accept(worker_id)`` says whether a worker is currently known (pass the registry's
    ``__contains__``); call ``forget(worker_id)`` when discovery drops a worker and
    ``resync_all()`` from the connection's reconnected callback.
    """

    def __init__(self, bus: Bus, sink: RouterEventSink, *, stale_after: float = 6.0,
                 resync_interval: float = 1.0, accept: Callable[[str], bool] | None = None,
                 consumer_id: str = "", clock: Callable[[], float] = time.monotonic) -> None:
        self.bus = bus
        self.sink = sink
        self.tracker = StreamTracker(stale_after=stale_after, resync_interval=resync_interval, accept=accept)
        self.consumer_id = consumer_id
        self.clock = clock
        self._pending: set[asyncio.Task] = set()
        self._sub = None

    @property
    def stats(self) -> StreamStats:
        return self.tracker.stats

    async def start(self) -> None:
        self._sub = await self.bus.on_events(self.handle)

    async def stop(self) -> None:
        if self._sub is not None:
            await self.bus.unsubscribe(self._sub)
            self._sub = None
        for task in list(self._pending):
            task.cancel()

    def handle(self, msg: EventsMessage) -> None:
        verdict = self.tracker.observe(msg, self.clock())
        if verdict.reset:
            self.sink.remove_worker(msg.worker_id)
        if verdict.apply and msg.events:
            self.sink.apply_router_events(msg.key, msg.events)
        if verdict.request_resync:
            task = asyncio.get_running_loop().create_task(self._request_resync(msg.worker_id))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    def is_stale(self, worker_id: str) -> bool:
        return self.tracker.is_stale(worker_id, self.clock())

    async def resync_all(self) -> None:
        """After this consumer's own NATS reconnect: ask every known worker to restate itself
        rather than wait for each one's next message to reveal the gap."""
        for worker_id in self.tracker.desync_all(self.clock()):
            await self._request_resync(worker_id)

    def forget(self, worker_id: str) -> None:
        self.tracker.forget(worker_id)

    async def _request_resync(self, worker_id: str) -> None:
        try:
            await self.bus.request_resync(worker_id, self.consumer_id)
        except Exception as exc:  # disconnected with a full buffer: the next message asks again
            log.info("resync request for %s not sent: %s", worker_id, exc)
