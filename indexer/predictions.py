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

Layout: a ``PrefixIndex`` (so matching costs what the event index costs) plus, per
worker rank, an ordered dict block → expiry in least-recently-sent order, and one queue
of (expiry, rank, blocks) in sending order for lazy expiry. Pure and synchronous; the
clock is passed in.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Sequence

from kvgate.indexer.index import Match, PrefixIndex
from kvgate.protocol.events import WorkerKey

__all__ = ["PredictedBlocks"]


class PredictedBlocks:
    """Per worker rank: the blocks of prompts recently sent to it, not yet confirmed by events."""

    __slots__ = (
        "capacity_blocks",
        "_index",
        "_lru",
        "_expiries",
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
        self._index = PrefixIndex()
        self._lru: dict[WorkerKey, OrderedDict[int, float]] = {}
        self._expiries: deque[tuple[float, WorkerKey, Sequence[int]]] = deque()
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

    def held(self, key: WorkerKey) -> int:
        lru = self._lru.get(key)
        return len(lru) if lru is not None else 0

    def predict(self, key: WorkerKey, hashes: Sequence[int], ttl: float) -> None:
        """``hashes`` (a prompt's blocks) were just sent to ``key``; count them held for ``ttl`` s."""
        if not hashes:
            return
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
        if new:
            self._index.store(key, new)
        if len(lru) > self.capacity_blocks:
            over = len(lru) - self.capacity_blocks
            gone = [lru.popitem(last=False)[0] for _ in range(over)]
            self._index.remove(key, gone)
            self.evicted += over
        self._expiries.append((expiry, key, hashes))

    def confirm(self, key: WorkerKey, hashes: Sequence[int]) -> None:
        """The engine stored ``hashes``: its events hold them now, not the prediction."""
        self.confirmed += self._drop(key, hashes)

    def drop(self, key: WorkerKey, hashes: Sequence[int]) -> None:
        """The engine removed ``hashes`` (in some tier): no prediction of them survives."""
        self._drop(key, hashes)

    def clear(self, key: WorkerKey) -> None:
        if self._lru.pop(key, None):
            self._index.clear(key)

    def remove_worker(self, worker_id: str) -> None:
        for key in [k for k in self._lru if k.worker_id == worker_id]:
            del self._lru[key]
        self._index.remove_worker(worker_id)

    def find_matches(self, seq_hashes: Sequence[int]) -> dict[WorkerKey, Match]:
        """Per rank: the contiguous prefix of ``seq_hashes`` predicted held (all GPU)."""
        if not self._lru:
            return {}
        self._expire(self._clock())
        matches = self._index.find_matches(seq_hashes)
        for m in matches.values():
            m.predicted = True
        return matches

    def _drop(self, key: WorkerKey, hashes: Sequence[int]) -> int:
        lru = self._lru.get(key)
        if not lru:
            return 0
        gone = [h for h in hashes if lru.pop(h, None) is not None]
        if gone:
            self._index.remove(key, gone)
        return len(gone)

    def _expire(self, now: float) -> None:
        queue = self._expiries
        while queue and queue[0][0] <= now:
            _, key, hashes = queue.popleft()
            lru = self._lru.get(key)
            if not lru:
                continue
            # A block sent again since carries a later expiry: only the stale ones go.
            gone = [h for h in hashes if (e := lru.get(h)) is not None and e <= now]
            for h in gone:
                del lru[h]
            if gone:
                self._index.remove(key, gone)
                self.expired += len(gone)
