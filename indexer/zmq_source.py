"""ZMQ event sources: the asyncio edge that feeds engine KV events to an ``EngineBatchSink``.

``ZmqEventSource`` subscribes to one worker's PUB socket (one per data-parallel rank,
vLLM offsets the port by the rank), decodes every message with ``protocol.wire`` and
hands typed batches to its sink's ``apply_engine_batch`` (a ``KvIndexer``, or the
sidecar's ``EventRelay``). Undecodable messages are counted (``record_rejected``) and
dropped; the source never stops for bad input, and ZMQ reconnects by itself while the
engine is down or restarting.

Gaps are found by the sink's per-rank pipeline (seq tracking), which asks its
``ReplaySource`` for a replay. ``ReplayDispatcher`` is that replay source for a fleet,
built before the sink and given to it: it forwards ``(worker_id, rank, from_seq,
to_seq)`` to the worker's source, which fetches the missing batches from vLLM's ROUTER
replay socket in a task, applies them with ``replayed=True`` and answers with exactly
one ``replay_finished`` per request, in request order per rank.

Catch-up: PUB/SUB drops whatever the engine publishes before the SUB socket has
connected (both starting together, an engine restart), and the sink only notices a
lost batch when a later one arrives, so an engine that caches one prompt and goes idle
would keep it unannounced. Every ``catch_up_interval`` a rank that received no live
batch since the previous tick asks the replay socket for the batches after the last
seq its sink applied (``position``; from 0 before any), which costs one request
answered by the end marker when nothing was missed. What comes back goes to the sink
as live batches, as if the SUB socket had delivered them (not ``replayed``: a pipeline
accepts replayed batches only inside a gap it asked for). A batch offered twice would
read as an engine restart, so only seqs above the last applied one go, and a live
batch a catch-up already applied (it was in flight) is skipped. Nothing goes while a
replay of the rank is unanswered (it covers up to a live seq) or if the rank's order
started over during the fetch (its ``generation`` changed: engine restart). A rank
that stays quiet is asked less and less often: after each ask that found nothing the
wait doubles, up to ``CATCH_UP_MAX_BACKOFF`` intervals (an idle fleet of 100 workers
would otherwise cost 50 asks a second, ~1 ms of CPU each); a live batch, or
``activity`` (the gateway sent the worker a request, so it may publish), brings it back
to one interval.

Keeps transport state only (whether a live batch arrived since the last tick, payload
hashes of what the last catch-up applied, when the last batch of any kind arrived:
``last_batch``, which the gateway's missing-events alarm reads); seq semantics live in
the sink's pipelines.
Never decides anything about blocks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from kvgate.indexer.pipeline import EngineBatchSink, StreamPosition
from kvgate.protocol.events import EventBatch
from kvgate.protocol.wire import (
    MAX_SEQ,
    REPLAY_END_SEQ,
    DecodeError,
    decode_batch,
    decode_frames,
    decode_replay_reply,
    encode_replay_request,
)
from kvgate.tasks import cancel_and_wait

__all__ = ["ReplayDispatcher", "SourceStats", "ZmqEventSource", "ZmqSourceConfig", "rank_endpoint"]

log = logging.getLogger(__name__)


BYTES_PER_BLOCK = 256
"""Payload bytes allowed per block of ``max_batch_blocks``: a store of 64 tokens takes about
230 (u32 token ids as msgpack, hashes, keys), a removal about 60."""


@dataclass(slots=True)
class ZmqSourceConfig:
    replay_timeout: float = 2.0
    """Seconds to wait for each replay reply before giving the replay up."""
    catch_up_interval: float = 2.0
    """Seconds between catch-up asks of a quiet rank's replay socket; 0: never (also
    never without a replay endpoint). See the module docstring."""
    max_batch_blocks: int = 16_384
    """A batch naming more blocks than this (or, before it is even decoded, a payload over
    ``BYTES_PER_BLOCK`` times this) is rejected (``batch_too_large``): applying it
    would hold the event loop (100k blocks: about a second). A real engine stays far below
    it: vLLM publishes once per scheduler step, which stores at most its batched tokens /
    block size (8,192 / 64 = 128 blocks) and evicts about as many."""
    receive_hwm: int = 100_000
    """SUB queue length; vLLM's PUB uses the same, so a burst is not dropped on our side."""
    reconnect_interval_ms: int = 100
    reconnect_interval_max_ms: int = 2_000

    def __post_init__(self) -> None:
        if self.max_batch_blocks < 1:
            raise ValueError(f"max_batch_blocks must be >= 1, got {self.max_batch_blocks}")
        if self.replay_timeout <= 0:
            raise ValueError(f"replay_timeout must be > 0, got {self.replay_timeout}")
        if self.catch_up_interval < 0:
            raise ValueError(f"catch_up_interval must be >= 0 (0: off), got {self.catch_up_interval}")


@dataclass(slots=True)
class SourceStats:
    frames_received: int = 0
    batches_applied: int = 0
    batches_replayed: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    replays_ok: int = 0
    replays_failed: int = 0
    catch_ups: int = 0
    """Catch-up asks sent to the replay socket."""
    caught_up: int = 0
    """Batches the SUB socket missed that a catch-up applied."""
    late_duplicates: int = 0
    """Live batches skipped because a catch-up had applied them while they were in flight."""
    catch_up_errors: int = 0
    """Catch-up rounds that failed (logged); the next one asks again."""
    indexer_errors: int = 0


# A quiet rank's catch-up asks come at most this many catch_up_intervals apart.
CATCH_UP_MAX_BACKOFF = 8


class _RankFeed:
    """What the source's transport knows of one rank (its seqs are the sink's)."""

    __slots__ = ("heard", "caught", "quiet_asks")

    def __init__(self) -> None:
        self.heard = False  # a live batch arrived since the previous catch-up tick
        self.quiet_asks = 0  # catch-up asks in a row that found nothing, since activity
        # seq -> hash of the payload, for what the last catch-up applied: the same batch
        # may still be on its way over the SUB socket, and offered again it would read as
        # an engine restart. vLLM replays the very bytes it published; a restarted engine's
        # batch of the same seq differs (its timestamp at least).
        self.caught: dict[int, int] = {}


def rank_endpoint(endpoint: str, rank: int) -> str:
    """vLLM's per-rank endpoint: TCP port + rank, ``_dp<rank>`` suffix otherwise."""
    if rank == 0:
        return endpoint
    if endpoint.startswith("tcp://"):
        host, _, port = endpoint.rpartition(":")
        return f"{host}:{int(port) + rank}"
    return f"{endpoint}_dp{rank}"


class ZmqEventSource:
    """Live events (and replays) of one worker, all its data-parallel ranks."""

    def __init__(
        self,
        worker_id: str,
        endpoint: str,
        replay_endpoint: str | None,
        sink: EngineBatchSink,
        topic: bytes = b"",
        *,
        dp_size: int = 1,
        config: ZmqSourceConfig | None = None,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        if dp_size < 1:
            raise ValueError(f"dp_size must be >= 1, got {dp_size}")
        self.worker_id = worker_id
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.topic = topic
        self.dp_size = dp_size
        self.config = config or ZmqSourceConfig()
        self.stats = SourceStats()
        self._sink = sink
        self._context = context
        self._sockets: list[zmq.asyncio.Socket] = []
        self._tasks: set[asyncio.Task[None]] = set()
        # Replays of one rank run one after another, so answers keep request order.
        # Catch-ups take the same lock: never two requests to one rank's replay socket.
        self._replay_locks: dict[int, asyncio.Lock] = {}
        self._feeds = [_RankFeed() for _ in range(dp_size)]
        self._running = False
        self.last_batch: float | None = None
        """``time.perf_counter()`` when the last batch (live, caught up or replayed) was decoded."""

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Connect every rank's SUB socket and start reading (needs a running loop)."""
        if self._running:
            return
        ctx = self._context or zmq.asyncio.Context.instance()
        for rank in range(self.dp_size):
            sock = ctx.socket(zmq.SUB)
            self._configure(sock)
            sock.setsockopt(zmq.RCVHWM, self.config.receive_hwm)
            sock.setsockopt(zmq.SUBSCRIBE, self.topic)
            sock.connect(rank_endpoint(self.endpoint, rank))
            self._sockets.append(sock)
            self._spawn(self._read_live(rank, sock))
            if self.replay_endpoint is not None and self.config.catch_up_interval > 0:
                self._spawn(self._catch_up_loop(rank))
        self._running = True

    def engine_lost(self) -> None:
        """The sink started this worker's seq order over (the engine stopped answering):
        catch up at the next tick, and let no live batch pass for one the last catch-up
        applied. (A catch-up in flight is discarded by its rank's new ``generation``.)"""
        for feed in self._feeds:
            feed.heard = False
            feed.caught.clear()
            feed.quiet_asks = 0

    async def stop(self) -> None:
        """Stop reading; replays still in flight are answered ``ok=False``."""
        self._running = False
        await cancel_and_wait(*self._tasks)
        for sock in self._sockets:
            sock.close(linger=0)
        self._sockets.clear()

    def _configure(self, sock: zmq.asyncio.Socket) -> None:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, self.config.reconnect_interval_ms)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, self.config.reconnect_interval_max_ms)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- live events -------------------------------------------------------------------

    async def _read_live(self, rank: int, sock: zmq.asyncio.Socket) -> None:
        feed = self._feeds[rank]
        while True:
            # A recv of a message already queued returns without giving the loop a turn: a
            # backlog would apply batch after batch in one step, holding requests meanwhile.
            await asyncio.sleep(0)
            frames = await sock.recv_multipart()
            self.stats.frames_received += 1
            try:
                _topic, seq, payload = decode_frames(frames)
                if len(payload) > self.config.max_batch_blocks * BYTES_PER_BLOCK:
                    raise DecodeError("batch_too_large", f"{len(payload)} bytes")
                if feed.caught:
                    if feed.caught.get(seq) == hash(payload):
                        self.stats.late_duplicates += 1
                        continue
                    # The SUB socket delivers in order: nothing the catch-up got is behind this.
                    feed.caught.clear()
                batch = decode_batch(payload)
            except DecodeError as err:
                self._reject(err)
                continue
            feed.heard = True
            if self._apply(rank, seq, batch, replayed=False):
                self.stats.batches_applied += 1

    def _apply(self, rank: int, seq: int, batch: EventBatch, *, replayed: bool) -> bool:
        named = batch.data_parallel_rank
        if named is None:
            # SGLang and older vLLM may omit the rank; the socket it came on tells it.
            batch.data_parallel_rank = rank
        elif not 0 <= named < self.dp_size:
            # A rank the worker does not have would grow index state nothing ever removes.
            self._reject(DecodeError("bad_rank", f"rank {named} of a worker with {self.dp_size}"))
            return False
        limit = self.config.max_batch_blocks
        if len(batch.events) > limit or sum(len(getattr(e, "block_hashes", ())) for e in batch.events) > limit:
            self._reject(DecodeError("batch_too_large", f"more than {limit} blocks in one batch"))
            return False
        self.last_batch = time.perf_counter()
        try:
            self._sink.apply_engine_batch(self.worker_id, seq, batch, replayed=replayed)
        except Exception:
            # A failing sink must not silence this worker's feed for good.
            self.stats.indexer_errors += 1
            log.exception("sink failed on batch seq=%d from %s", seq, self.worker_id)
            return False
        return True

    def _reject(self, err: DecodeError) -> None:
        self.stats.rejected[err.kind] += 1
        log.debug("rejected message from %s: %s", self.worker_id, err)
        self._sink.record_rejected(self.worker_id, err.kind)

    # --- replay ------------------------------------------------------------------------

    def request_replay(self, rank: int, from_seq: int, to_seq: int) -> None:
        """Fetch batches ``from_seq <= seq < to_seq`` of ``rank``; answered by ``replay_finished``.

        Safe to call from inside ``apply_engine_batch``: the work (and the answer, even
        an immediate failure) always happens later in a task.
        """
        self._spawn(self._replay(rank, from_seq, to_seq))

    async def _replay(self, rank: int, from_seq: int, to_seq: int) -> None:
        ok = False
        try:
            lock = self._replay_locks.setdefault(rank, asyncio.Lock())
            async with lock:
                if from_seq >= to_seq:
                    ok = True
                elif self._running and self.replay_endpoint is not None and 0 <= rank < self.dp_size:
                    payloads = await self._fetch(rank, from_seq, to_seq)
                    ok = self._apply_replayed(rank, from_seq, to_seq, payloads)
        finally:
            if ok:
                self.stats.replays_ok += 1
            else:
                self.stats.replays_failed += 1
                log.warning("replay %d..%d of %s rank %d failed", from_seq, to_seq, self.worker_id, rank)
            self._sink.replay_finished(self.worker_id, rank, ok)

    async def _fetch(self, rank: int, from_seq: int, to_seq: int | None) -> dict[int, bytes]:
        """Replies with seq in range (``to_seq`` None: no end), until the end marker, the
        last wanted seq, or a timeout."""
        assert self.replay_endpoint is not None
        ctx = self._context or zmq.asyncio.Context.instance()
        # A fresh DEALER per replay: late replies to an abandoned request cannot leak in.
        sock = ctx.socket(zmq.DEALER)
        self._configure(sock)
        got: dict[int, bytes] = {}
        try:
            sock.connect(rank_endpoint(self.replay_endpoint, rank))
            await sock.send_multipart([b"", encode_replay_request(from_seq)])
            timeout_ms = int(self.config.replay_timeout * 1000)
            deadline = time.monotonic() + self.config.replay_timeout
            while True:
                if not await sock.poll(timeout_ms):
                    log.warning("replay of %s rank %d timed out", self.worker_id, rank)
                    return got
                try:
                    seq, payload = decode_replay_reply(await sock.recv_multipart())
                except DecodeError as err:
                    self._reject(err)
                    # Garbage must not keep a replay alive forever.
                    if time.monotonic() > deadline:
                        return got
                    continue
                deadline = time.monotonic() + self.config.replay_timeout
                if seq == REPLAY_END_SEQ:
                    return got
                if seq >= from_seq and (to_seq is None or seq < to_seq):
                    got[seq] = payload
                if to_seq is not None and seq >= to_seq - 1:
                    return got
        finally:
            sock.close(linger=0)

    def _apply_replayed(self, rank: int, from_seq: int, to_seq: int, payloads: dict[int, bytes]) -> bool:
        """Apply the contiguous run from ``from_seq``; True when it reaches ``to_seq``."""
        for seq in range(from_seq, to_seq):
            payload = payloads.get(seq)
            if payload is None:
                return False
            try:
                batch = decode_batch(payload)
            except DecodeError as err:
                self._reject(err)
                return False
            if not self._apply(rank, seq, batch, replayed=True):
                return False
            self.stats.batches_replayed += 1
        return True

    # --- catch-up ----------------------------------------------------------------------

    def activity(self) -> None:
        """The worker was sent a request: it may publish, so its quiet ranks are asked again
        at every ``catch_up_interval`` (until asks keep finding nothing)."""
        for feed in self._feeds:
            feed.quiet_asks = 0

    async def _catch_up_loop(self, rank: int) -> None:
        feed = self._feeds[rank]
        ticks = 0  # intervals since the last ask (or live batch)
        while True:
            await asyncio.sleep(self.config.catch_up_interval)
            ticks += 1
            if feed.heard:
                # A lost batch before a live one shows as a gap; only the tail after the
                # last one can hide, and it is asked for once the rank goes quiet.
                feed.heard = False
                feed.quiet_asks = ticks = 0
            elif ticks >= min(2**feed.quiet_asks, CATCH_UP_MAX_BACKOFF) and not self._position(rank).replays:
                ticks = 0
                try:
                    found = await self._catch_up(rank)
                except Exception:
                    # Whatever went wrong, the next tick asks again: this loop must outlive it.
                    self.stats.catch_up_errors += 1
                    log.exception("catch-up of %s rank %d failed", self.worker_id, rank)
                    found = True
                feed.quiet_asks = 0 if found else feed.quiet_asks + 1

    async def _catch_up(self, rank: int) -> bool:
        """Ask for what followed the last applied seq; whether anything came back (or was not asked)."""
        feed = self._feeds[rank]
        async with self._replay_locks.setdefault(rank, asyncio.Lock()):
            asked = self._position(rank)
            if asked.replays or asked.last_seq >= MAX_SEQ:
                return True  # a gap replay covers it, or no seq can follow the last one
            self.stats.catch_ups += 1
            payloads = await self._fetch(rank, asked.last_seq + 1, None)
        now = self._position(rank)
        if now.replays or now.generation != asked.generation:
            return True  # a gap replay now covers this stretch, or the engine restarted
        fresh = [seq for seq in sorted(payloads) if seq > now.last_seq]  # others came live meanwhile
        if not fresh:
            return bool(payloads)
        feed.caught = {}
        for seq in fresh:
            payload = payloads[seq]
            try:
                batch = decode_batch(payload)
            except DecodeError as err:
                # Skipped: the next batch shows the hole and the sink handles it as a gap.
                self._reject(err)
                continue
            feed.caught[seq] = hash(payload)
            if self._apply(rank, seq, batch, replayed=False):
                self.stats.caught_up += 1
        return True

    def _position(self, rank: int) -> StreamPosition:
        return self._sink.position(self.worker_id, rank)


class ReplayDispatcher:
    """The ``ReplaySource`` of a fleet: forwards each request to its worker's source.

    Built first and given to the sink (``KvIndexer(block_size, dispatcher)``); then
    ``add`` each source as it starts. A request for a worker without a source is
    answered ``ok=False`` to the asking sink (soon, never from inside the call), so no
    pipeline waits on a replay nobody will run.
    """

    def __init__(self) -> None:
        self._sources: dict[str, ZmqEventSource] = {}

    def add(self, source: ZmqEventSource) -> None:
        self._sources[source.worker_id] = source

    def discard(self, worker_id: str) -> None:
        self._sources.pop(worker_id, None)

    def request_replay(self, sink: EngineBatchSink, worker_id: str, rank: int, from_seq: int, to_seq: int) -> None:
        source = self._sources.get(worker_id)
        if source is not None:
            source.request_replay(rank, from_seq, to_seq)
            return
        log.warning("replay request for %s, which has no source; answering failure", worker_id)
        asyncio.get_running_loop().call_soon(sink.replay_finished, worker_id, rank, False)
