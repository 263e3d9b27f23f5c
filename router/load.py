"""Active load per worker (``WorkerKey``): what the cost model's load terms read.

Three sources meet here, each with one writer:

* **this router's own requests**, through their lifecycle, written by each request's
  ``lifecycle.InFlight`` handle only: ``begin`` when routed (its tokens still to
  prefill and the KV blocks it will hold; again with another key on a retry),
  ``prefill_done`` at the first token (it stops loading the worker's prefill queue but
  keeps its blocks), ``finish`` on completion *or* cancellation; entries untouched for
  ``ttl`` seconds expire, so a lost ``finish`` cannot leak load forever;
* **other gateway replicas' requests** (``add_remote`` / ``remove_remote``), written by
  the gateway's ``ActiveSync`` only, from the replica-sync subject; counted like ours
  and expiring the same way;
* **engine-reported load** (running, waiting, KV usage, ``update_engine``), written by
  ``engine_load.EngineLoadFeed`` only, which validates every report first; trusted for
  ``engine_stale_after`` seconds after it arrived, then reported as unknown.

Pure bookkeeping: no clock reads except the injected ``clock`` (every method also takes
an explicit ``now``), no I/O, no decisions.
"""

from __future__ import annotations

import functools
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from kvgate.protocol.events import WorkerKey
from kvgate.router.config import RouterConfig


@dataclass(frozen=True, slots=True)
class LoadSnapshot:
    """One worker's load at one instant. Engine fields are None when unknown or stale."""

    requests: int = 0
    prefill_tokens: int = 0
    blocks: int = 0
    remote_requests: int = 0
    running: int | None = None
    waiting: int | None = None
    kv_usage: float | None = None
    capacity_tokens: int | None = None
    """The engine's GPU KV pool in tokens, as it last reported (it does not go stale)."""
    freed_blocks: int = field(default=0, compare=False)
    """Blocks of this router's requests that were running when the engine last reported
    and have finished since: its ``kv_usage`` still counts them."""
    holds: tuple[tuple[float, int], ...] | Callable[[], tuple[tuple[float, int], ...]] = field(
        default=(), compare=False, repr=False
    )
    """(sent at, KV blocks) of each request in flight there, or what computes them when first
    asked (sorting every request in flight on each rebuild cost the request path O(n log n)
    for a list only a nearly full worker's cost reads): read it with ``hold_order()``."""

    def hold_order(self) -> tuple[tuple[float, int], ...]:
        """``holds``, the longest-running first: the order they are expected to finish and free
        their blocks in. Computed at the first call, from the tracker as it is then: read it in
        the decision that took the snapshot (any change in the tracker replaces its cached
        snapshot, so a decision never sees a list newer than the rest of its snapshot)."""
        holds = self.holds
        if callable(holds):
            holds = holds()
            object.__setattr__(self, "holds", holds)
        return holds

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "prefill_tokens": self.prefill_tokens,
            "blocks": self.blocks,
            "remote_requests": self.remote_requests,
            "running": self.running,
            "waiting": self.waiting,
            "kv_usage": self.kv_usage,
            "capacity_tokens": self.capacity_tokens,
        }


IDLE = LoadSnapshot()


@dataclass(frozen=True, slots=True)
class RemoteRequest:
    """Another replica's in-flight request, as shared over the replica-sync subject.

    ``prefill_tokens`` is what it still has to prefill (0 once its first token came).
    """

    request_id: str
    key: WorkerKey
    prefill_tokens: int
    blocks: int


@dataclass(slots=True)
class ActiveRequest:
    request_id: str
    key: WorkerKey
    prompt_tokens: int
    prefill_tokens: int
    blocks: int
    touched: float
    router_id: str | None = None  # None: this replica's own request
    started: float | None = None
    """When it was sent to ``key`` (None: ``touched`` at creation)."""

    def __post_init__(self) -> None:
        if self.started is None:
            self.started = self.touched

    @property
    def in_prefill(self) -> bool:
        return self.prefill_tokens > 0


@dataclass(slots=True)
class _Totals:
    requests: int = 0
    prefill_tokens: int = 0
    blocks: int = 0
    remote_requests: int = 0


@dataclass(frozen=True, slots=True)
class _EngineLoad:
    running: int
    waiting: int
    kv_usage: float
    ts: float


class LoadTracker:
    def __init__(
        self, ttl: float = 600.0, engine_stale_after: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if ttl <= 0 or engine_stale_after <= 0:
            raise ValueError("ttl and engine_stale_after must be > 0")
        self.ttl = ttl
        self.engine_stale_after = engine_stale_after
        self.clock = clock
        # Ordered by last touch, oldest first, so expiry pops from the front in O(expired).
        self._entries: OrderedDict[tuple[str | None, str], ActiveRequest] = OrderedDict()
        self._totals: dict[WorkerKey, _Totals] = {}
        self._by_key: dict[WorkerKey, dict[tuple[str | None, str], ActiveRequest]] = {}
        self._engine: dict[WorkerKey, _EngineLoad] = {}
        self._capacity: dict[WorkerKey, int] = {}
        self._freed: dict[WorkerKey, int] = {}
        # Snapshots are read for every candidate on every decision but change only on
        # lifecycle events: each is cached with the time its engine part goes stale.
        self._snapshots: dict[WorkerKey, tuple[LoadSnapshot, float]] = {}

    @classmethod
    def from_config(cls, config: RouterConfig, clock: Callable[[], float] = time.monotonic) -> LoadTracker:
        return cls(config.active_request_ttl, config.engine_load_stale_after, clock)

    # -- this replica's requests ---------------------------------------------------------

    def begin(
        self,
        request_id: str,
        key: WorkerKey,
        prompt_tokens: int,
        new_prefill_tokens: int,
        blocks: int,
        now: float | None = None,
    ) -> None:
        """A request was routed to ``key``. Beginning an id again moves it (a retry elsewhere)."""
        _check_count("prompt_tokens", prompt_tokens)
        _check_count("new_prefill_tokens", new_prefill_tokens)
        _check_count("blocks", blocks)
        if new_prefill_tokens > prompt_tokens:
            raise ValueError(f"new_prefill_tokens ({new_prefill_tokens}) > prompt_tokens ({prompt_tokens})")
        self._put(
            ActiveRequest(
                request_id, key, prompt_tokens, new_prefill_tokens, blocks, self.clock() if now is None else now
            )
        )

    def prefill_done(self, request_id: str, now: float | None = None) -> bool:
        """First token arrived: the request no longer queues prefill. False if unknown."""
        entry = self._entries.get((None, request_id))
        if entry is None:
            return False
        self._totals[entry.key].prefill_tokens -= entry.prefill_tokens
        self._snapshots.pop(entry.key, None)
        entry.prefill_tokens = 0
        entry.touched = self.clock() if now is None else now
        self._entries.move_to_end((None, request_id))
        return True

    def finish(self, request_id: str) -> bool:
        """Completed or cancelled: free its load. False if unknown (already freed or expired)."""
        return self._drop((None, request_id))

    def get(self, request_id: str) -> ActiveRequest | None:
        return self._entries.get((None, request_id))

    # -- other replicas' requests --------------------------------------------------------

    def add_remote(self, router_id: str, entries: Iterable[RemoteRequest], now: float | None = None) -> None:
        """Add or update another replica's requests (an update after prefill sends prefill_tokens=0)."""
        if not router_id:
            raise ValueError("router_id must be a non-empty string")
        now = self.clock() if now is None else now
        entries = list(entries)
        for remote in entries:  # all checked before any is applied: never half a message
            _check_count("prefill_tokens", remote.prefill_tokens)
            _check_count("blocks", remote.blocks)
        for remote in entries:
            self._put(
                ActiveRequest(
                    remote.request_id,
                    remote.key,
                    remote.prefill_tokens,
                    remote.prefill_tokens,
                    remote.blocks,
                    now,
                    router_id,
                )
            )

    def remove_remote(self, router_id: str, request_ids: Iterable[str] | None = None) -> int:
        """Free some of a replica's requests, or all of them (None: the replica went away)."""
        if request_ids is None:
            ids = [rid for (origin, rid) in self._entries if origin == router_id]
        else:
            ids = list(request_ids)
        return sum(self._drop((router_id, rid)) for rid in ids)

    # -- engine-reported load ------------------------------------------------------------

    def update_engine(
        self,
        key: WorkerKey,
        running: int,
        waiting: int,
        kv_usage: float,
        now: float | None = None,
        capacity_tokens: int | None = None,
    ) -> None:
        """The engine's own figures; ``capacity_tokens`` (its GPU KV pool, None: not reported)
        is kept from the last report that gave it."""
        _check_count("running", running)
        _check_count("waiting", waiting)
        if isinstance(kv_usage, bool) or not isinstance(kv_usage, (int, float)) or not 0.0 <= kv_usage <= 1.0:
            raise ValueError(f"kv_usage must be a number in [0, 1], got {kv_usage!r}")
        if capacity_tokens is not None:
            _check_count("capacity_tokens", capacity_tokens)
            if capacity_tokens > 0:
                self._capacity[key] = capacity_tokens
        self._engine[key] = _EngineLoad(running, waiting, float(kv_usage), self.clock() if now is None else now)
        self._freed.pop(key, None)
        self._snapshots.pop(key, None)

    # -- maintenance and reads -----------------------------------------------------------

    def expire(self, now: float | None = None) -> int:
        """Drop entries untouched for longer than ``ttl``; returns how many."""
        deadline = (self.clock() if now is None else now) - self.ttl
        expired = 0
        entries = self._entries
        while entries:
            ident, entry = next(iter(entries.items()))
            if entry.touched > deadline:
                break
            self._drop(ident)
            expired += 1
        return expired

    def remove_worker(self, worker_id: str) -> None:
        """The worker left: forget its requests and its engine load (all ranks)."""
        for ident in [i for i, e in self._entries.items() if e.key.worker_id == worker_id]:
            self._drop(ident)
        per_key: tuple[dict[WorkerKey, Any], ...] = (self._engine, self._capacity, self._freed, self._snapshots)
        for table in per_key:
            for key in [k for k in table if k.worker_id == worker_id]:
                del table[key]

    def snapshot(self, key: WorkerKey, now: float | None = None) -> LoadSnapshot:
        """``key``'s load at ``now`` (which, like the clock, must not go backwards)."""
        now = self.clock() if now is None else now
        cached = self._snapshots.get(key)
        if cached is not None and now <= cached[1]:
            return cached[0]
        totals = self._totals.get(key)
        engine = self._engine.get(key)
        stale_at = math.inf
        if engine is not None:
            stale_at = engine.ts + self.engine_stale_after
            if now > stale_at:
                engine, stale_at = None, math.inf
        capacity = self._capacity.get(key)
        if totals is None and engine is None and capacity is None:
            snap = IDLE
        else:
            t = totals or _Totals()
            holds = functools.partial(self._holds, key) if key in self._by_key else ()
            freed = self._freed.get(key, 0) if engine is not None else 0
            if engine is None:
                snap = LoadSnapshot(
                    t.requests, t.prefill_tokens, t.blocks, t.remote_requests, capacity_tokens=capacity, holds=holds
                )
            else:
                snap = LoadSnapshot(
                    t.requests,
                    t.prefill_tokens,
                    t.blocks,
                    t.remote_requests,
                    engine.running,
                    engine.waiting,
                    engine.kv_usage,
                    capacity,
                    freed,
                    holds,
                )
        self._snapshots[key] = (snap, stale_at)
        return snap

    def snapshots(self, keys: Iterable[WorkerKey], now: float | None = None) -> dict[WorkerKey, LoadSnapshot]:
        now = self.clock() if now is None else now
        cache = self._snapshots
        out = {}
        for key in keys:
            cached = cache.get(key)
            out[key] = cached[0] if cached is not None and now <= cached[1] else self.snapshot(key, now)
        return out

    def __len__(self) -> int:
        return len(self._entries)

    def _holds(self, key: WorkerKey) -> tuple[tuple[float, int], ...]:
        entries = self._by_key.get(key)
        if not entries:
            return ()
        return tuple(sorted((e.started or 0.0, e.blocks) for e in entries.values()))

    def _put(self, entry: ActiveRequest) -> None:
        ident = (entry.router_id, entry.request_id)
        old = self._entries.get(ident)
        if old is not None and old.key == entry.key and entry.router_id is not None:
            entry.started = old.started  # another replica's update (prefill done): same request, same start
        # An update on the same worker frees nothing there; a move (a retry) frees the old one's.
        self._drop(ident, freed=old is not None and old.key != entry.key)
        self._entries[ident] = entry
        self._by_key.setdefault(entry.key, {})[ident] = entry
        self._snapshots.pop(entry.key, None)
        totals = self._totals.get(entry.key)
        if totals is None:
            totals = self._totals[entry.key] = _Totals()
        totals.requests += 1
        totals.prefill_tokens += entry.prefill_tokens
        totals.blocks += entry.blocks
        if entry.router_id is not None:
            totals.remote_requests += 1

    def _drop(self, ident: tuple[str | None, str], freed: bool = True) -> bool:
        entry = self._entries.pop(ident, None)
        if entry is None:
            return False
        by_key = self._by_key[entry.key]
        del by_key[ident]
        if not by_key:
            del self._by_key[entry.key]
        engine = self._engine.get(entry.key)
        if freed and engine is not None and (entry.started or 0.0) <= engine.ts:
            self._freed[entry.key] = self._freed.get(entry.key, 0) + entry.blocks
        self._snapshots.pop(entry.key, None)
        totals = self._totals[entry.key]
        totals.requests -= 1
        totals.prefill_tokens -= entry.prefill_tokens
        totals.blocks -= entry.blocks
        if entry.router_id is not None:
            totals.remote_requests -= 1
        if totals.requests == 0:
            del self._totals[entry.key]
        return True


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
