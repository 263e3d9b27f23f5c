"""Blocks the router predicts a worker holds because it just sent it a prompt.

When a request is routed, its blocks will be in the chosen worker's cache as soon as the
engine has computed them, but the engine's KV events say so only after that: a burst of
requests sharing a new prefix would otherwise scatter over the fleet before the first
event arrives. So the router records each sent prompt's blocks here at once, and the
index counts them as held (GPU) until the engine's own events take over:

* a stored event for a predicted block **confirms** it: the prediction goes, the event's
  entry stays (events override predictions, whatever tier they name);
* a removed event drops the prediction too (the engine evicted it, or never kept it);
* a prediction nobody confirms **expires** after its TTL;
* each worker rank holds at most ``capacity_blocks`` predictions, least recently sent
  evicted first: with events turned off (approximate mode) this LRU of what was sent is
  the whole model of the worker's cache, sized like the engine's block pool.

Layout: per worker rank, an ordered dict block → expiry in least-recently-sent order, and
one heap of (expiry, rank, blocks) for lazy expiry. Matching extends each rank's event
match: from the depth its events give, it counts the consecutive prompt blocks predicted
(or, past them, held by events again), so a prompt whose first chunk the engine has
confirmed still counts its predicted rest. Pure and synchronous; the clock is passed in.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable, Container, Sequence

from kvgate.indexer.index import Match
from kvgate.protocol.events import WorkerKey

__all__ = ["PredictedBlocks"]


class PredictedBlocks:
    """Per worker rank: the blocks of prompts recently sent to it, not yet confirmed by events."""

    __slots__ = (
        "capacity_blocks",
        "_lru",
        "_expiries",
        "_order",
        "_clock",
        "predicted",
        "confirmed",
        "expired",
        "evicted",
    )

    def __init__(self, capacity_blocks: int, clock: Callable[[], float]) -> None:
        if isinstance(capacity_blocks, bool) or not isinstance(capacity_blocks, int) or capacity_blocks < 1:
            raise ValueError(f"capacity_blocks must be a positive integer, got {capacity_blocks!r}")
        self.capacity_blocks = capacity_blocks
        self._lru: dict[WorkerKey, OrderedDict[int, float]] = {}
        self._expiries: list[tuple[float, int, WorkerKey, Sequence[int]]] = []
        self._order = 0  # heap tie-break: keys and hash lists are not ordered
        self._clock = clock
        self.predicted = 0
        """Blocks recorded as predictions (new or refreshed)."""
        self.confirmed = 0
        """Predictions an engine's stored event took over."""
        self.expired = 0
        """Predictions no event confirmed within their TTL."""
        self.evicted = 0
        """Predictions pushed out by a rank's capacity (approximate mode's model of eviction)."""

    def __len__(self) -> int:
        return sum(len(lru) for lru in self._lru.values())

    @property
    def held_any(self) -> bool:
        return bool(self._lru)

    def held(self, key: WorkerKey) -> int:
        lru = self._lru.get(key)
        return len(lru) if lru is not None else 0

    def predict(self, key: WorkerKey, hashes: Sequence[int], ttl: float) -> list[int]:
        """``hashes`` (a prompt's blocks) were just sent to ``key``: count them held for
        ``ttl`` seconds. Returns the ones that were not predicted there already."""
        if not hashes:
            return []
        now = self._clock()
        self._expire(now)
        expiry = now + ttl
        lru = self._lru.get(key)
        if lru is None:
            lru = self._lru[key] = OrderedDict()
        new: list[int] = []
        move = lru.move_to_end
        for h in hashes:
            if h in lru:
                move(h)
            else:
                new.append(h)
            lru[h] = expiry
        self.predicted += len(hashes)
        over = len(lru) - self.capacity_blocks
        if over > 0:
            for _ in range(over):
                lru.popitem(last=False)
            self.evicted += over
        self._order += 1
        heapq.heappush(self._expiries, (expiry, self._order, key, hashes))
        return new

    def confirm(self, key: WorkerKey, hashes: Sequence[int]) -> None:
        """The engine stored ``hashes``: its events hold them now, not the prediction."""
        self.confirmed += self._drop(key, hashes)

    def drop(self, key: WorkerKey, hashes: Sequence[int]) -> None:
        """The engine removed ``hashes`` (in some tier), or the request that sent them there
        failed: no prediction of them survives."""
        self._drop(key, hashes)

    def clear(self, key: WorkerKey) -> None:
        self._lru.pop(key, None)

    def remove_worker(self, worker_id: str) -> None:
        for key in [k for k in self._lru if k.worker_id == worker_id]:
            del self._lru[key]

    def extend(
        self,
        seq_hashes: Sequence[int],
        matches: dict[WorkerKey, Match],
        events_hold: Callable[[WorkerKey, int], bool] | None = None,
        skip: Container[str] | None = None,
    ) -> None:
        """Extend ``matches`` (the events' matches, per rank) in place by the predicted blocks:
        for every rank with predictions, from its event depth on, count the consecutive
        blocks predicted there (GPU) or, between predicted runs, held by its events
        (``events_hold(key, hash)``; None: the events are not consulted). Workers whose id
        is in ``skip`` are left as they are."""
        if not self._lru:
            return
        self._expire(self._clock())
        n = len(seq_hashes)
        for key, lru in self._lru.items():
            if not lru or (skip is not None and key.worker_id in skip):
                continue
            m = matches.get(key)
            start = m.depth if m is not None else 0
            i = start
            extra = 0
            while i < n:
                h = seq_hashes[i]
                if h in lru:
                    extra += 1
                elif events_hold is None or not events_hold(key, h):
                    break
                i += 1
            if not extra:
                continue
            if m is None:
                matches[key] = Match(i, [extra, 0, 0], True)
            else:
                # Blocks past the event depth that the events hold were found in some tier;
                # counting them as GPU is what the first request's load will have made them.
                matches[key] = Match(i, [m.per_tier[0] + (i - start), m.per_tier[1], m.per_tier[2]], True)

    def find_matches(self, seq_hashes: Sequence[int]) -> dict[WorkerKey, Match]:
        """Per rank: the contiguous prefix of ``seq_hashes`` predicted held (all GPU)."""
        matches: dict[WorkerKey, Match] = {}
        self.extend(seq_hashes, matches)
        return matches

    def _drop(self, key: WorkerKey, hashes: Sequence[int]) -> int:
        lru = self._lru.get(key)
        if not lru:
            return 0
        pop = lru.pop
        return sum(1 for h in hashes if pop(h, None) is not None)

    def _expire(self, now: float) -> None:
        heap = self._expiries
        while heap and heap[0][0] <= now:
            _, _, key, hashes = heapq.heappop(heap)
            lru = self._lru.get(key)
            if not lru:
                continue
            # A block sent again since carries a later expiry: only the stale ones go.
            gone = [h for h in hashes if (e := lru.get(h)) is not None and e <= now]
            for h in gone:
                del lru[h]
            self.expired += len(gone)
