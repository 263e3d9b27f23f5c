"""The router facade: token ids in, a timed ``Decision`` out, request lifecycle tracked.

``route`` = hash the prompt's full blocks (``indexer.hashing``), ask the index which
workers hold which prefix (``KvIndexer.find_matches``), let the configured policy score
the registry's workers against that and their load. The gateway then reports each
request's lifecycle (``begin`` / ``prefill_done`` / ``finish``) so the load terms see it.

The router also listens to the registry: a worker that leaves loses its index and load
state here, so no later decision can count blocks or requests of a worker that is gone.
Synchronous and I/O-free; the gateway calls it from its event loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Protocol

from kvgate.indexer.index import Match
from kvgate.protocol.events import WorkerKey
from kvgate.protocol.hashing import sequence_hashes

from kvgate.router.config import RouterConfig
from kvgate.router.load import LoadTracker
from kvgate.router.policies import Decision, NoWorkerAvailable, Policy, RouteTimings, make_policy
from kvgate.router.registry import RegistryChange, WorkerRegistry

if TYPE_CHECKING:
    from kvgate.indexer.kv_indexer import KvIndexer

__all__ = ["Router", "NoWorkerAvailable", "Decision", "PrefixMatcher"]


class PrefixMatcher(Protocol):
    """What the router needs from the index (``KvIndexer`` provides it)."""

    block_size: int

    def find_matches(self, seq_hashes: Sequence[int]) -> dict[WorkerKey, Match]: ...

    def remove_worker(self, worker_id: str) -> None: ...


class Router:
    def __init__(
        self,
        config: RouterConfig,
        indexer: "KvIndexer | PrefixMatcher",
        registry: WorkerRegistry,
        load: LoadTracker | None = None,
        *,
        policy: Policy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if indexer.block_size != config.block_size:
            # Hashing prompts with another block size than the index's would never match.
            raise ValueError(f"router block_size {config.block_size} != indexer block_size {indexer.block_size}")
        self.config = config
        self.indexer = indexer
        self.registry = registry
        self.clock = clock
        self.load = load if load is not None else LoadTracker.from_config(config, clock)
        self.policy = policy if policy is not None else make_policy(config)
        self._unsubscribe = registry.subscribe(self._on_registry_change)

    def route(
        self,
        token_ids: Sequence[int],
        *,
        lora_name: str | None = None,
        exclude: Collection[WorkerKey | str] = (),
    ) -> Decision:
        """Choose a worker for a tokenized prompt. Raises ``NoWorkerAvailable``."""
        t0 = time.perf_counter()
        seq_hashes = sequence_hashes(token_ids, self.config.block_size, lora_name)
        hashed = time.perf_counter() - t0
        decision = self.route_hashes(seq_hashes, exclude=exclude)
        decision.timings.hash = hashed
        return decision

    def route_hashes(self, seq_hashes: Sequence[int], *, exclude: Collection[WorkerKey | str] = ()) -> Decision:
        """Choose a worker for a prompt already hashed with ``sequence_hashes``."""
        t0 = time.perf_counter()
        matches = self.indexer.find_matches(seq_hashes) if seq_hashes else {}
        t1 = time.perf_counter()
        candidates = self.registry.keys()
        now = self.clock()
        self.load.expire(now)
        loads = self.load.snapshots(candidates, now)
        decision = self.policy.select(candidates, matches, len(seq_hashes), loads, exclude)
        decision.timings = RouteTimings(0.0, t1 - t0, time.perf_counter() - t1)
        return decision

    # -- request lifecycle (the gateway reports it; load terms read it) -------------------

    def begin(self, request_id: str, decision: Decision, prompt_tokens: int, key: WorkerKey | None = None) -> None:
        """The request was sent to ``key`` (default: ``decision.chosen``; a retry passes the next one).

        Its queued prefill is what that worker does not hold (the counted cached prefix);
        it holds a KV block per started block of its prompt.
        """
        if isinstance(prompt_tokens, bool) or not isinstance(prompt_tokens, int) or prompt_tokens < 0:
            raise ValueError(f"prompt_tokens must be a non-negative integer, got {prompt_tokens!r}")
        key = decision.chosen if key is None else key
        score = decision.score_of(key)
        cached_tokens = score.cached_blocks * self.config.block_size if score is not None else 0
        self.load.begin(
            request_id,
            key,
            prompt_tokens,
            max(0, prompt_tokens - cached_tokens),
            math.ceil(prompt_tokens / self.config.block_size),
            self.clock(),
        )

    def prefill_done(self, request_id: str) -> bool:
        return self.load.prefill_done(request_id, self.clock())

    def finish(self, request_id: str) -> bool:
        return self.load.finish(request_id)

    def close(self) -> None:
        """Stop listening to the registry (a router replaced by a new one)."""
        self._unsubscribe()

    def _on_registry_change(self, change: RegistryChange) -> None:
        if change.kind == "removed":
            self.indexer.remove_worker(change.worker.worker_id)
            self.load.remove_worker(change.worker.worker_id)
