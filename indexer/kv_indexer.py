"""The indexer facade the gateway and the router hold (``KvIndexer``).

Data flow: an event source hands decoded engine batches to ``apply_engine_batch``; per
(worker, dp_rank) a ``RankPipeline`` orders them (gap -> the ``ReplaySource`` given at
construction, restart -> that rank is cleared) and translates them into router events,
which the ``PrefixIndex`` applies. The NATS path skips the pipeline (its sidecar already
ran one) and calls ``apply_router_events``. The router asks ``find_matches``.

``engine_lost`` forgets a worker's blocks and seq order when the gateway saw its engine
go away (a restarted engine starts its seqs over at 0). Also owns whether each worker's
blocks are trusted (``set_trusted``), each under its own ``reason``: its event source
says so (the NATS source while a stream is out of sync or silent, the gateway's fleet
while a ZMQ-fed engine serves requests whose events never arrive), and so does the
gateway's check of predicted against reported cached tokens. An untrusted worker's
blocks stay indexed but ``find_matches`` leaves it out, so the router places it on load
alone, until every reason trusts it again. Synchronous; the asyncio sources call in
from the event loop. Never decodes bytes, never routes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from kvgate.indexer.index import Match, PrefixIndex, is_tier
from kvgate.indexer.pipeline import START, PipelineStats, RankPipeline, ReplaySource, StreamPosition
from kvgate.indexer.predictions import PredictedBlocks
from kvgate.indexer.recovery import DEFAULT_MAX_BUFFERED
from kvgate.indexer.translation import DEFAULT_MAX_PENDING
from kvgate.protocol.events import EventBatch, RouterCleared, RouterEvent, RouterRemoved, RouterStored, WorkerKey
from kvgate.protocol.hashing import DEFAULT_BLOCK_SIZE

DEFAULT_PREDICTION_CAPACITY = 16_384
"""Predicted blocks kept per worker rank: a typical GPU engine's block pool (Dynamo's
mocker default). Only approximate mode (no events) ever fills it."""


@dataclass
class IndexerStats(PipelineStats):
    """Everything the indexer counts. ``rejected`` is keyed by reason (decoder kinds from
    ``record_rejected`` plus the translator's ``bad_block_size``,
    ``token_count_mismatch``, ``lora_without_name``); ``unknown_parent`` and
    ``unknown_block`` count blocks, ``events_applied`` engine or router events."""

    events_applied: int = 0
    blocks_stored: int = 0
    blocks_removed: int = 0


class KvIndexer:
    """Engine or router events in, per-worker prefix matches out."""

    def __init__(
        self,
        block_size: int = DEFAULT_BLOCK_SIZE,
        replay: ReplaySource | None = None,
        *,
        max_pending_blocks: int = DEFAULT_MAX_PENDING,
        max_buffered_batches: int = DEFAULT_MAX_BUFFERED,
        prediction_capacity: int = DEFAULT_PREDICTION_CAPACITY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.replay = replay
        self.max_pending_blocks = max_pending_blocks
        self.max_buffered_batches = max_buffered_batches
        self.stats = IndexerStats()
        self._index = PrefixIndex()
        self._ranks: dict[tuple[str, int], RankPipeline] = {}
        self._owed: dict[tuple[str, int], int] = {}  # replay finishes due to removed ranks
        self._untrusted: dict[str, set[str]] = {}  # worker -> the reasons distrusting it
        self.predictions = PredictedBlocks(prediction_capacity, clock)

    # --- EngineBatchSink (called by ZmqEventSource) ---------------------------------------

    def apply_engine_batch(self, worker_id: str, seq: int, batch: EventBatch, *, replayed: bool = False) -> None:
        # Keyed by a plain tuple: building a frozen WorkerKey per batch costs more than the lookup.
        ident = (worker_id, batch.data_parallel_rank or 0)
        rank = self._ranks.get(ident)
        if rank is None:
            rank = self._open(WorkerKey(*ident))
        rank.offer(seq, batch, replayed=replayed)

    def replay_finished(self, worker_id: str, rank: int, ok: bool) -> None:
        ident = (worker_id, rank)
        owed = self._owed.get(ident)
        if owed:
            # Answers a replay asked for before the worker was removed; not the current one.
            if owed == 1:
                del self._owed[ident]
            else:
                self._owed[ident] = owed - 1
            return
        state = self._ranks.get(ident)
        if state is not None:
            state.replay_finished(ok)

    def record_rejected(self, worker_id: str, kind: str) -> None:
        """A source could not decode a batch from ``worker_id``."""
        self.stats.rejected[kind] += 1

    def position(self, worker_id: str, rank: int) -> StreamPosition:
        """Where the rank's engine stream stands; replays owed by a removed rank count as
        unanswered (its source may still be running them)."""
        ident = (worker_id, rank)
        pipeline = self._ranks.get(ident)
        at = START if pipeline is None else pipeline.position
        owed = self._owed.get(ident)
        return replace(at, replays=at.replays + owed) if owed else at

    # --- router events (the NATS path) and departures ------------------------------------

    def apply_router_events(self, key: WorkerKey, events: Sequence[RouterEvent]) -> None:
        """Router-native events (the NATS path); raises ``ValueError`` before applying any
        of them if one is not a router event with a valid tier."""
        for ev in events:
            if isinstance(ev, (RouterStored, RouterRemoved)):
                if not is_tier(ev.tier):
                    raise ValueError(f"not a tier: {ev.tier!r}")
            elif not isinstance(ev, RouterCleared):
                raise ValueError(f"not a router event: {type(ev).__name__}")
        self._apply_router(key, events)
        self.stats.events_applied += len(events)

    def remove_worker(self, worker_id: str) -> None:
        """Forget every rank of ``worker_id``: its blocks, maps, sequence state and trust."""
        for ident in [i for i in self._ranks if i[0] == worker_id]:
            unanswered = self._ranks.pop(ident).stream.unanswered
            if unanswered:
                self._owed[ident] = self._owed.get(ident, 0) + unanswered
        self._index.remove_worker(worker_id)
        self.predictions.remove_worker(worker_id)
        self._untrusted.pop(worker_id, None)

    def engine_lost(self, worker_id: str) -> None:
        """``worker_id``'s engine stopped answering: what it cached is unknown now.

        Every rank's blocks and engine-hash maps go and its seq order starts over (a new
        ``generation``, so a catch-up fetched before is discarded), keeping the worker
        and its trust mark. A restarted engine's first batch then applies as a first one,
        whatever its seq; if it was only a blip, a catch-up from seq 0 re-learns what the
        engine still holds. Routing on the old engine's blocks would send prompts to a
        worker that recomputes them.
        """
        for (wid, _), pipeline in self._ranks.items():
            if wid == worker_id:
                pipeline.forget()
        self._index.remove_worker(worker_id)
        self.predictions.remove_worker(worker_id)

    # --- trust ---------------------------------------------------------------------------

    def set_trusted(self, worker_id: str, trusted: bool, *, reason: str = "events") -> None:
        """Whether ``reason`` lets ``worker_id``'s blocks be matched (every worker is
        trusted until told not). Reasons are kept apart, so one source trusting a worker
        again does not override another that still distrusts it."""
        if trusted:
            reasons = self._untrusted.get(worker_id)
            if reasons is not None:
                reasons.discard(reason)
                if not reasons:
                    del self._untrusted[worker_id]
        else:
            self._untrusted.setdefault(worker_id, set()).add(reason)

    def trusted(self, worker_id: str, *, reason: str | None = None) -> bool:
        """Whether ``worker_id`` is matched at all, or, given a ``reason``, whether that one trusts it."""
        reasons = self._untrusted.get(worker_id)
        return not reasons if reason is None else reasons is None or reason not in reasons

    # --- what the router asks ------------------------------------------------------------

    def find_matches(
        self, seq_hashes: Sequence[int], *, include_untrusted: bool = False, include_predictions: bool = True
    ) -> dict[WorkerKey, Match]:
        """Per worker rank holding a prefix of ``seq_hashes``: its match; untrusted workers
        left out unless ``include_untrusted`` (what their index would predict, to judge it)."""
        matches = self._index.find_matches(seq_hashes)
        untrusted = self._untrusted
        if untrusted and matches and not include_untrusted:
            matches = {key: m for key, m in matches.items() if key.worker_id not in untrusted}
        if include_predictions and self.predictions.held_any:
            # An untrusted worker is routed on load alone: neither its events nor what was
            # sent to it count (its engine may not be caching what it is sent).
            skip = untrusted if untrusted and not include_untrusted else None
            self.predictions.extend(seq_hashes, matches, self._index.holds, skip)
        return matches

    def predict(self, key: WorkerKey, seq_hashes: Sequence[int], ttl: float) -> list[int]:
        """``seq_hashes`` were just sent to ``key``: count them held (GPU) for ``ttl`` seconds
        or until the engine's events say otherwise (``PredictedBlocks``). Returns those not
        predicted there before (what to ``unpredict`` if the request fails)."""
        return self.predictions.predict(key, seq_hashes, ttl)

    def unpredict(self, key: WorkerKey, hashes: Sequence[int]) -> None:
        """``key`` will not hold ``hashes`` after all (the request sending them failed)."""
        self.predictions.drop(key, hashes)

    def block_counts(self) -> dict[WorkerKey, tuple[int, int, int]]:
        return self._index.block_counts()

    def keys(self) -> list[WorkerKey]:
        """Worker ranks the index holds state for."""
        return self._index.keys()

    def __len__(self) -> int:
        """Distinct router blocks indexed."""
        return len(self._index)

    def _open(self, key: WorkerKey) -> RankPipeline:
        pipeline = self._ranks[(key.worker_id, key.dp_rank)] = RankPipeline(
            key,
            self._output,
            self._reset,
            stats=self.stats,
            block_size=self.block_size,
            replay=self.replay,
            sink=self,
            max_pending=self.max_pending_blocks,
            max_buffered=self.max_buffered_batches,
        )
        return pipeline

    def _output(self, key: WorkerKey, batch: EventBatch, events: list[RouterEvent]) -> None:
        self._apply_router(key, events)
        self.stats.events_applied += len(batch.events)

    def _reset(self, key: WorkerKey) -> None:
        self._index.clear(key)

    def _apply_router(self, key: WorkerKey, events: Sequence[RouterEvent]) -> None:
        index = self._index
        stats = self.stats
        predictions = self.predictions if self.predictions.held(key) else None
        for ev in events:
            if type(ev) is RouterStored:
                index.store(key, ev.hashes, ev.tier)
                stats.blocks_stored += len(ev.hashes)
                if predictions is not None:
                    predictions.confirm(key, ev.hashes)
            elif type(ev) is RouterRemoved:
                index.remove(key, ev.hashes, ev.tier)
                stats.blocks_removed += len(ev.hashes)
                if predictions is not None:
                    predictions.drop(key, ev.hashes)
            else:
                index.apply(key, ev)
                if predictions is not None:
                    predictions.clear(key)
