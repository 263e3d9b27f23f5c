"""One (worker, dp_rank) engine event stream, in order, as router events (``RankPipeline``).

Owns what turns one engine publisher's batches into router events: its ordering and
recovery (``recovery.EventStream``: gap -> replay, seq falling back -> restart) and its
hash translation (``translation.BlockTranslator``). Where the router events go is the
owner's ``output``; what a restart drops beyond the translator, the owner's ``reset``.
``KvIndexer`` (output -> its ``PrefixIndex``) and the sidecar's ``EventRelay`` (output ->
numbered NATS messages) each hold one pipeline per rank.

Also the contracts around a pipeline's owner: ``EngineBatchSink`` (what an event source
feeds, and may ask of each rank's order: ``StreamPosition``) and ``ReplaySource`` (who
fetches the batches a gap lost). Never touches an index, a socket or a clock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from kvgate.indexer.recovery import DEFAULT_MAX_BUFFERED, EventStream, RecoveryStats
from kvgate.indexer.translation import DEFAULT_MAX_PENDING, BlockTranslator, TranslationStats
from kvgate.protocol.events import EventBatch, RouterEvent, WorkerKey


@dataclass(frozen=True, slots=True)
class StreamPosition:
    """Where one rank's event order stands, as a source needs it for its catch-ups."""

    last_seq: int
    """Last seq applied (-1: none since the stream started or started over)."""
    generation: int
    """Bumped whenever the order starts over (engine restart, state forgotten): a fetch
    begun under another generation asked the wrong question."""
    replays: int
    """Replays asked for whose ``replay_finished`` has not come yet."""


START = StreamPosition(-1, 0, 0)
"""The position of a rank nothing has been applied for."""


class EngineBatchSink(Protocol):
    """What a ``ZmqEventSource`` feeds: ``KvIndexer`` or the sidecar's ``EventRelay``."""

    def apply_engine_batch(self, worker_id: str, seq: int, batch: EventBatch, *, replayed: bool = False) -> None: ...

    def replay_finished(self, worker_id: str, rank: int, ok: bool) -> None: ...

    def record_rejected(self, worker_id: str, kind: str) -> None: ...

    def position(self, worker_id: str, rank: int) -> StreamPosition: ...


class ReplaySource(Protocol):
    """Fetches what a gap lost: batches ``from_seq <= seq < to_seq`` of one rank.

    It offers them to ``sink`` with ``replayed=True`` and then calls
    ``sink.replay_finished`` exactly once per request, in request order per rank (it may
    do so from inside the call). ``sink`` is the pipeline's owner, the address the
    answer goes to when no source of the worker can run the replay.
    """

    def request_replay(self, sink: EngineBatchSink, worker_id: str, rank: int, from_seq: int, to_seq: int) -> None: ...


@dataclass
class PipelineStats(TranslationStats, RecoveryStats):
    """What a pipeline counts; its owner's stats (shared by all its ranks) extend this."""


Output = Callable[[WorkerKey, EventBatch, list[RouterEvent]], None]
"""``output(key, batch, router_events)``: ``batch`` applied, and what it translated to."""


class RankPipeline:
    """One worker rank's engine batches in, in order and translated, out to ``output``.

    ``reset(key)`` is called when the engine restarted (its translator is already
    cleared): the owner drops what it holds of the rank. Gaps are asked of ``replay``
    on behalf of ``sink`` (none: a gap is skipped).
    """

    __slots__ = ("key", "translator", "stream", "generation", "offer", "_output", "_reset", "_replay", "_sink")

    def __init__(
        self,
        key: WorkerKey,
        output: Output,
        reset: Callable[[WorkerKey], None],
        *,
        stats: PipelineStats,
        block_size: int,
        replay: ReplaySource | None = None,
        sink: EngineBatchSink | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
        max_buffered: int = DEFAULT_MAX_BUFFERED,
    ) -> None:
        if replay is not None and sink is None:
            raise ValueError("a replay source needs the sink its answers go to")
        self.key = key
        self.translator = BlockTranslator(block_size, max_pending=max_pending, stats=stats)
        self.generation = 0
        self._output = output
        self._reset = reset
        self._replay = replay
        self._sink = sink
        self.stream: EventStream[EventBatch] = EventStream(
            str(key),
            self._apply,
            self._restarted,
            None if replay is None else self._request_replay,
            stats=stats,
            max_buffered=max_buffered,
        )
        # The stream's own method, not a wrapper: one call less per batch on the hot path.
        self.offer = self.stream.offer

    @property
    def position(self) -> StreamPosition:
        stream = self.stream
        return StreamPosition(stream.last_seq, self.generation, stream.unanswered)

    def replay_finished(self, ok: bool) -> None:
        self.stream.replay_finished(ok)

    def forget(self) -> None:
        """The owner dropped this rank (the engine was lost): translation and order start
        over, without ``reset`` (the owner knows). Replays asked before are still answered,
        and taken as answers to abandoned ones."""
        self.translator.clear()
        self.stream.forget()
        self.generation += 1

    def _apply(self, batch: EventBatch) -> None:
        self._output(self.key, batch, self.translator.translate(batch.events))

    def _restarted(self) -> None:
        self.translator.clear()
        self.generation += 1
        self._reset(self.key)

    def _request_replay(self, from_seq: int, to_seq: int) -> bool:
        assert self._replay is not None and self._sink is not None
        self._replay.request_replay(self._sink, self.key.worker_id, self.key.dp_rank, from_seq, to_seq)
        return True
