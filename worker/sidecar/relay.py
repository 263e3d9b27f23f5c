"""Engine KV events -> router-native bus messages, for one worker (``EventRelay``).

The sidecar's pure core. ``ZmqEventSource`` feeds it decoded engine batches (it is an
``EngineBatchSink``); per data-parallel rank a ``RankPipeline`` orders them (gap ->
the ``ReplaySource`` given at construction, seq falling back -> engine restart) and
turns them into router events, exactly as ``KvIndexer`` does in the embedded mode.
Instead of indexing them, the relay numbers them into ``EventsMessage``s of its
session (``epoch``, ``seq``; see ``kvgate.protocol.messages``) and hands them to
``publish``.

It also keeps a *mirror* of what it has told the world: per rank and tier, the router
hashes currently stored. ``snapshot()`` restates the mirror as a ``reset`` message
(then chunks), which is what a consumer that lost track (NATS restart, a gateway
joining late, a seq gap) needs to converge. An engine restart publishes a
``RouterCleared`` for that rank. No I/O, no clock: the asyncio edge lives in
``worker.sidecar.service``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from kvgate.indexer.pipeline import START, PipelineStats, RankPipeline, ReplaySource, StreamPosition
from kvgate.protocol.events import (
    EventBatch,
    RouterCleared,
    RouterEvent,
    RouterRemoved,
    RouterStored,
    Tier,
    WorkerKey,
)
from kvgate.protocol.messages import EventsMessage, new_epoch

DEFAULT_SNAPSHOT_CHUNK = 8192
"""Hashes per snapshot message: ~75 KB of msgpack, far below NATS's 1 MB payload limit."""


@dataclass
class RelayStats(PipelineStats):
    batches: int = 0
    engine_events: int = 0
    router_events: int = 0
    messages: int = 0
    snapshots: int = 0
    engine_resets: int = 0
    engine_losses: int = 0
    foreign_batches: int = 0


class EventRelay:
    """One worker's engine batches in, numbered router-event messages out."""

    def __init__(
        self,
        worker_id: str,
        publish: Callable[[EventsMessage], None],
        *,
        block_size: int = 64,
        dp_size: int = 1,
        replay: ReplaySource | None = None,
        epoch: int | None = None,
        snapshot_chunk: int = DEFAULT_SNAPSHOT_CHUNK,
    ) -> None:
        if dp_size < 1:
            raise ValueError(f"dp_size must be >= 1, got {dp_size}")
        if snapshot_chunk < 1:
            raise ValueError(f"snapshot_chunk must be >= 1, got {snapshot_chunk}")
        self.worker_id = worker_id
        self.dp_size = dp_size
        self.epoch = new_epoch() if epoch is None else epoch
        self.snapshot_chunk = snapshot_chunk
        self.stats = RelayStats()
        self._publish = publish
        self._next_seq = 0
        self._mirror: list[tuple[set[int], set[int], set[int]]] = [(set(), set(), set()) for _ in range(dp_size)]
        self._pipelines = [
            RankPipeline(
                WorkerKey(worker_id, rank),
                self._output,
                self._reset,
                stats=self.stats,
                block_size=block_size,
                replay=replay,
                sink=self,
            )
            for rank in range(dp_size)
        ]

    # --- EngineBatchSink (called by ZmqEventSource) ---------------------------------------

    def apply_engine_batch(self, worker_id: str, seq: int, batch: EventBatch, *, replayed: bool = False) -> None:
        rank = batch.data_parallel_rank or 0
        if worker_id != self.worker_id or rank >= self.dp_size:
            self.stats.foreign_batches += 1
            return
        self._pipelines[rank].offer(seq, batch, replayed=replayed)

    def replay_finished(self, worker_id: str, rank: int, ok: bool) -> None:
        if worker_id == self.worker_id and 0 <= rank < self.dp_size:
            self._pipelines[rank].replay_finished(ok)

    def record_rejected(self, worker_id: str, kind: str) -> None:
        self.stats.rejected[kind] += 1

    def position(self, worker_id: str, rank: int) -> StreamPosition:
        if worker_id == self.worker_id and 0 <= rank < self.dp_size:
            return self._pipelines[rank].position
        return START

    # --- what the edge calls ------------------------------------------------------------

    def snapshot(self) -> None:
        """Publish a full restatement: a ``reset`` message, then every stored hash in chunks."""
        self.stats.snapshots += 1
        first = True
        for rank in range(self.dp_size):
            # Materialized first: emitting the RouterCleared below empties the mirror,
            # and the stores after it fill it again with the same hashes.
            stored = list(self._mirror_events(rank))
            events: list[RouterEvent] = [RouterCleared()]
            size = 0
            for event in stored:
                events.append(event)
                size += len(event.hashes)
                if size >= self.snapshot_chunk:
                    self._emit(rank, events, reset=first)
                    first, events, size = False, [], 0
            if events:
                self._emit(rank, events, reset=first)
                first = False

    def engine_lost(self) -> None:
        """The engine stopped answering: what it cached is unknown now, so clear every rank.

        The seq tracking starts over too, so the next engine's first batch applies as
        such, and one lost while the SUB socket reconnects is fetched by replay as soon
        as a later seq shows the gap (or by the source's next catch-up, which asks from
        seq 0). If it was only a blip, the same replay re-learns the forgotten blocks;
        announcing blocks a restarted engine no longer has would misroute instead.
        """
        self.stats.engine_losses += 1
        for rank, pipeline in enumerate(self._pipelines):
            pipeline.forget()
            self._emit(rank, [RouterCleared()])

    def heartbeat(self) -> None:
        """An empty message: tells consumers the stream is alive and where its seq is."""
        self._emit(0, [])

    def block_counts(self) -> list[tuple[int, int, int]]:
        """Per rank, hashes currently announced in (GPU, CPU, DISK)."""
        return [(len(g), len(c), len(d)) for g, c, d in self._mirror]

    @property
    def last_seq(self) -> int:
        """Seq of the last message handed to ``publish`` (-1: none yet)."""
        return self._next_seq - 1

    # --- internals ---------------------------------------------------------------------

    def _output(self, key: WorkerKey, batch: EventBatch, events: list[RouterEvent]) -> None:
        self.stats.batches += 1
        self.stats.engine_events += len(batch.events)
        if events:
            self._emit(key.dp_rank, events)

    def _reset(self, key: WorkerKey) -> None:
        self.stats.engine_resets += 1
        self._emit(key.dp_rank, [RouterCleared()])

    def _emit(self, rank: int, events: list[RouterEvent], *, reset: bool = False) -> None:
        self._mirror_apply(rank, events)
        msg = EventsMessage(self.worker_id, rank, self._next_seq, self.epoch, events, reset)
        self._next_seq += 1
        self.stats.messages += 1
        self.stats.router_events += len(events)
        self._publish(msg)

    def _mirror_apply(self, rank: int, events: list[RouterEvent]) -> None:
        tiers = self._mirror[rank]
        for event in events:
            if isinstance(event, RouterStored):
                tiers[event.tier].update(event.hashes)
            elif isinstance(event, RouterRemoved):
                tiers[event.tier].difference_update(event.hashes)
            else:
                for held in tiers:
                    held.clear()

    def _mirror_events(self, rank: int) -> Iterator[RouterStored]:
        chunk = self.snapshot_chunk
        for tier in Tier:
            hashes = list(self._mirror[rank][tier])
            for start in range(0, len(hashes), chunk):
                yield RouterStored(hashes[start : start + chunk], tier)
