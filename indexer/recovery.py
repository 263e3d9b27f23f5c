"""Ordering and recovery for one (worker, dp_rank) event stream (``EventStream``).

Owns the last applied sequence number and the replay state of one engine publisher.
It hands batches, in order and at most once, to an ``apply`` callable, and calls
``reset`` when the engine's state is gone; it never interprets events and never
touches an index. ``indexer.pipeline.RankPipeline`` wraps one per (worker, rank), for
``KvIndexer`` and the NATS sidecar alike.

Rules (``last`` starts at -1, so a subscriber that joins mid-stream asks for what it
missed from seq 0):

* live ``seq == last + 1``: apply.
* live ``seq > last + 1``: a gap. Ask for a replay of ``[last + 1, seq)`` and buffer live
  batches (bounded) until ``replay_finished``. Replayed batches apply in order;
  ``seq <= last`` and ones already buffered live are duplicates, skipped and counted.
  Then the buffer flushes through these same rules.
* live ``seq <= last``: the engine restarted. ``reset`` before the batch applies; then
  the batch is handled as the first of a new stream (so ``seq != 0`` asks for a replay
  from 0). An outstanding replay is abandoned: it was asked of the old engine.
* Every replay asked for gets exactly one ``replay_finished``, in order; while an
  abandoned replay's finish is still due, the next finish is taken to be that one.
* A failed or incomplete replay (``ok=False``, a hole in the replayed seqs, or the live
  buffer overflowing) is counted and the stream continues from the buffered batches
  *without* a reset. Deliberate: a reset would forget prefixes the engine still
  caches, and every later store chained on them would wait for a parent that is
  never announced again, for as long as they stay hot; the stale entries a lost
  removal leaves behind instead heal the first time a request is routed onto them
  (the engine re-stores the block).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

DEFAULT_MAX_BUFFERED = 4096

B = TypeVar("B")


@dataclass
class RecoveryStats:
    """Counters a stream bumps; ``KvIndexer``'s ``IndexerStats`` extends this."""

    gaps: int = 0
    replays_requested: int = 0
    replays_failed: int = 0
    restarts: int = 0
    duplicates: int = 0


class EventStream(Generic[B]):
    """Sequence tracking, gap replay and restart detection for one engine publisher.

    ``apply(batch)`` receives batches in order. ``reset()`` must drop everything this
    stream's worker rank holds. ``request_replay(from_seq, to_seq_excl)`` asks the
    source for a replay and returns False when it cannot (no replay socket): the gap is
    then skipped. After a True it must eventually call ``replay_finished`` exactly once,
    finishing requests in the order they were made (it may do so from inside the call).
    """

    def __init__(
        self,
        name: str,
        apply: Callable[[B], None],
        reset: Callable[[], None],
        request_replay: Callable[[int, int], bool] | None = None,
        *,
        stats: RecoveryStats | None = None,
        max_buffered: int = DEFAULT_MAX_BUFFERED,
    ) -> None:
        if max_buffered < 1:
            raise ValueError(f"max_buffered must be >= 1, got {max_buffered}")
        self.name = name
        self.stats = stats if stats is not None else RecoveryStats()
        self.max_buffered = max_buffered
        self.last_seq = -1
        self._apply = apply
        self._reset = reset
        self._request_replay = request_replay
        self._replay_end: int | None = None  # exclusive end of the outstanding replay
        self._replay_hole = False
        self._buffer: deque[tuple[int, B]] = deque()
        self.unanswered = 0  # replays asked for whose replay_finished has not come yet

    @property
    def replaying(self) -> bool:
        return self._replay_end is not None

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def forget(self) -> None:
        """Start over as a new stream (the owner dropped this rank's state): the next batch
        applies as a first one. Replays asked before still get their ``replay_finished``;
        each is taken as the finish of an abandoned replay, never of a later one."""
        self.last_seq = -1
        self._replay_end = None
        self._replay_hole = False
        self._buffer.clear()

    def offer(self, seq: int, batch: B, *, replayed: bool = False) -> None:
        """One batch from the source: live, or part of a replay this stream asked for."""
        if seq == self.last_seq + 1 and self._replay_end is None and not replayed:
            self._apply(batch)
            self.last_seq = seq
        elif replayed:
            self._replayed(seq, batch)
        else:
            self._live(seq, batch)

    def replay_finished(self, ok: bool) -> None:
        """The source is done replaying (``ok`` False: it could not)."""
        if self.unanswered == 0:
            return  # nothing was asked: a stray call
        self.unanswered -= 1
        end = self._replay_end
        if end is None or self.unanswered:
            return  # the finish of an abandoned replay
        if not ok or self._replay_hole or self.last_seq < end - 1:
            self.stats.replays_failed += 1
            log.warning(
                "%s: replay up to seq %d incomplete (last applied %d); continuing", self.name, end, self.last_seq
            )
        self._flush()

    def _live(self, seq: int, batch: B) -> None:
        if self._replay_end is not None:
            head = self._buffer[-1][0] if self._buffer else self._replay_end - 1
            if seq <= head:
                self._buffer.clear()
                self._replay_end = None
                self._restart(seq, batch)
            elif len(self._buffer) < self.max_buffered:
                self._buffer.append((seq, batch))
            else:
                self.stats.replays_failed += 1
                log.warning("%s: %d batches buffered during a replay; giving up on it", self.name, len(self._buffer))
                self._flush()
                self._live(seq, batch)
            return
        last = self.last_seq
        if seq == last + 1:
            self._apply(batch)
            self.last_seq = seq
        elif seq > last + 1:
            self._gap(seq, batch)
        else:
            self._restart(seq, batch)

    def _gap(self, seq: int, batch: B) -> None:
        self.stats.gaps += 1
        start = self.last_seq + 1
        self._replay_end = seq
        self._replay_hole = False
        self._buffer.append((seq, batch))
        asked = False
        if self._request_replay is not None:
            self.unanswered += 1  # before the call: the source may finish inside it
            try:
                asked = bool(self._request_replay(start, seq))
            except Exception:
                log.exception("%s: replay request [%d, %d) failed", self.name, start, seq)
                self.stats.replays_requested += 1
                self.stats.replays_failed += 1
            else:
                self.stats.replays_requested += asked
            if not asked:
                self.unanswered = max(0, self.unanswered - 1)
        if not asked and self._replay_end == seq:
            log.warning("%s: seq gap [%d, %d) cannot be replayed; skipping it", self.name, start, seq)
            self._flush()

    def _restart(self, seq: int, batch: B) -> None:
        self.stats.restarts += 1
        log.info(
            "%s: seq fell back to %d (last %d): engine restarted, dropping its blocks", self.name, seq, self.last_seq
        )
        self._reset()
        self.last_seq = -1
        self._live(seq, batch)

    def _replayed(self, seq: int, batch: B) -> None:
        end = self._replay_end
        if end is None or seq <= self.last_seq or seq >= end:
            # Late (replay over), already applied, or already buffered live.
            self.stats.duplicates += 1
            return
        if seq > self.last_seq + 1:
            self._replay_hole = True
        self._apply(batch)
        self.last_seq = seq

    def _flush(self) -> None:
        """End the replay and run the buffered live batches through the live rules."""
        self._replay_end = None
        pending = list(self._buffer)
        self._buffer.clear()
        if pending and pending[0][0] > self.last_seq + 1:
            self.last_seq = pending[0][0] - 1  # the unrecoverable part of the gap is skipped
        for i, (seq, batch) in enumerate(pending):
            self._live(seq, batch)
            if self._replay_end is not None:
                # A new gap opened inside the flush: the rest waits behind its replay.
                self._buffer.extend(pending[i + 1 :])
                return
