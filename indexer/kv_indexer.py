"""The indexer facade the gateway and the router hold (``KvIndexer``).

Data flow: an event source hands decoded engine batches to ``apply_engine_batch``;
per (worker, dp_rank) an ``EventStream`` orders them (gap -> ``on_replay``, restart ->
reset) and a ``BlockTranslator`` turns them into router events, which the
``PrefixIndex`` applies. The NATS path skips both (its sidecar already ran them) and
calls ``apply_router_events``. The router asks ``find_matches``. Synchronous; the
asyncio sources call in from the event loop. Never decodes bytes, never routes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvgate.protocol.events import EventBatch, RouterCleared, RouterEvent, RouterRemoved, RouterStored, WorkerKey
from kvgate.indexer.index import Match
from kvgate.protocol.hashing import DEFAULT_BLOCK_SIZE
from kvgate.indexer.index import PrefixIndex, is_tier
from kvgate.indexer.recovery import DEFAULT_MAX_BUFFERED, EventStream, RecoveryStats
from kvgate.indexer.translation import DEFAULT_MAX_PENDING, BlockTranslator, TranslationStats

ReplayRequest = Callable[[str, int, int, int], None]
"""``on_replay(worker_id, dp_rank, from_seq, to_seq_excl)``: ask that worker's replay
socket, feed the batches back with ``replayed=True``, then call ``replay_finished``."""


@dataclass
class IndexerStats(TranslationStats, RecoveryStats):
    """Everything the indexer counts. ``rejected`` is keyed by reason (decoder kinds from
    ``record_rejected`` plus the translator's ``bad_block_size``,
    ``token_count_mismatch``, ``lora_without_name``); ``unknown_parent`` and
    ``unknown_block`` count blocks, ``events_applied`` engine or router events."""

    events_applied: int = 0
    blocks_stored: int = 0
    blocks_removed: int = 0


class _Rank:
    """The ordering and translation state of one worker rank."""

    __slots__ = ("translator", "stream")

    def __init__(self, translator: BlockTranslator, stream: EventStream[EventBatch]) -> None:
        self.translator = translator
        self.stream = stream


class KvIndexer:
    """Engine or router events in, per-worker prefix matches out."""

    def __init__(
        self,
        block_size: int = DEFAULT_BLOCK_SIZE,
        on_replay: ReplayRequest | None = None,
        *,
        max_pending_blocks: int = DEFAULT_MAX_PENDING,
        max_buffered_batches: int = DEFAULT_MAX_BUFFERED,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.on_replay = on_replay  # settable later: sources are usually built after the indexer
        self.max_pending_blocks = max_pending_blocks
        self.max_buffered_batches = max_buffered_batches
        self.stats = IndexerStats()
        self._index = PrefixIndex()
        self._ranks: dict[tuple[str, int], _Rank] = {}
        self._owed: dict[tuple[str, int], int] = {}  # replay finishes due to removed ranks

    def apply_engine_batch(self, worker_id: str, seq: int, batch: EventBatch, *, replayed: bool = False) -> None:
        # Keyed by a plain tuple: building a frozen WorkerKey per batch costs more than the lookup.
        ident = (worker_id, batch.data_parallel_rank or 0)
        rank = self._ranks.get(ident)
        if rank is None:
            rank = self._open(WorkerKey(*ident))
        rank.stream.offer(seq, batch, replayed=replayed)

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
            state.stream.replay_finished(ok)

    def record_rejected(self, worker_id: str, kind: str) -> None:
        """A source could not decode a batch from ``worker_id``."""
        self.stats.rejected[kind] += 1

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
        """Forget every rank of ``worker_id``: its blocks, maps and sequence state."""
        for ident in [i for i in self._ranks if i[0] == worker_id]:
            unanswered = self._ranks.pop(ident).stream.unanswered
            if unanswered:
                self._owed[ident] = self._owed.get(ident, 0) + unanswered
        self._index.remove_worker(worker_id)

    def find_matches(self, seq_hashes: Sequence[int]) -> dict[WorkerKey, Match]:
        return self._index.find_matches(seq_hashes)

    def block_counts(self) -> dict[WorkerKey, tuple[int, int, int]]:
        return self._index.block_counts()

    def keys(self) -> list[WorkerKey]:
        """Worker ranks the index holds state for."""
        return self._index.keys()

    def __len__(self) -> int:
        """Distinct router blocks indexed."""
        return len(self._index)

    def _open(self, key: WorkerKey) -> _Rank:
        translator = BlockTranslator(self.block_size, max_pending=self.max_pending_blocks, stats=self.stats)

        def apply(batch: EventBatch) -> None:
            self._apply_router(key, translator.translate(batch.events))
            self.stats.events_applied += len(batch.events)

        def reset() -> None:
            translator.clear()
            self._index.clear(key)

        def request_replay(from_seq: int, to_seq: int) -> bool:
            if self.on_replay is None:
                return False
            self.on_replay(key.worker_id, key.dp_rank, from_seq, to_seq)
            return True

        stream: EventStream[EventBatch] = EventStream(
            str(key), apply, reset, request_replay, stats=self.stats, max_buffered=self.max_buffered_batches
        )
        rank = self._ranks[(key.worker_id, key.dp_rank)] = _Rank(translator, stream)
        return rank

    def _apply_router(self, key: WorkerKey, events: Sequence[RouterEvent]) -> None:
        index = self._index
        stats = self.stats
        for ev in events:
            if type(ev) is RouterStored:
                index.store(key, ev.hashes, ev.tier)
                stats.blocks_stored += len(ev.hashes)
            elif type(ev) is RouterRemoved:
                index.remove(key, ev.hashes, ev.tier)
                stats.blocks_removed += len(ev.hashes)
            else:
                index.apply(key, ev)
