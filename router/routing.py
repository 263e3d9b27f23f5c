"""The router facade: token ids in, a timed ``Decision`` out, request lifecycle tracked.

``route`` = hash the prompt's full blocks (``protocol.hashing``), ask the index which
workers hold which prefix (``KvIndexer.find_matches``), let the configured policy score
the registry's workers against that and their load. ``begin`` then hands the gateway
the request's ``InFlight`` handle (``lifecycle``): its first token, retries and finish
go through it, so the load terms see them and so do the ``RequestListener``s
subscribed here (``subscribe``).

The router also listens to the registry: a worker that leaves loses its index and load
state here, so no later decision can count blocks or requests of a worker that is gone.
Synchronous and I/O-free; the gateway calls it from its event loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Protocol

from kvgate.indexer.index import Match
from kvgate.protocol.events import WorkerKey
from kvgate.protocol.hashing import sequence_hashes
from kvgate.router.accounting import TrustIgnoringMatcher, held_prefix
from kvgate.router.config import RouterConfig
from kvgate.router.lifecycle import InFlight, RequestListener
from kvgate.router.load import LoadTracker
from kvgate.router.policies import (
    Decision,
    NoWorkerAvailable,
    Policy,
    RouteTimings,
    make_policy,
    score_candidates,
    ties_or_beats,
)
from kvgate.router.registry import RegistryChange, WorkerRegistry
from kvgate.router.speed import Sample

if TYPE_CHECKING:
    from kvgate.indexer.kv_indexer import KvIndexer

__all__ = ["Router", "NoWorkerAvailable", "Decision", "PrefixMatcher", "InFlight", "RequestListener"]


class PrefixMatcher(Protocol):
    """What the router needs from the index (``KvIndexer`` provides it)."""

    block_size: int

    def find_matches(self, seq_hashes: Sequence[int]) -> dict[WorkerKey, Match]: ...

    def remove_worker(self, worker_id: str) -> None: ...


class Router:
    def __init__(
        self,
        config: RouterConfig,
        indexer: KvIndexer | PrefixMatcher,
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
        self.speed = self.policy.speed
        self.speed.clock = clock  # rates age by the router's clock
        self._predict = getattr(indexer, "predict", None) if config.predict_sent else None
        # An index that can say what the events alone hold (``KvIndexer``): for the hit check (``extend``).
        self._held_index = indexer if isinstance(indexer, TrustIgnoringMatcher) else None
        self._prediction_ttl = config.approximate_prediction_ttl if config.approximate else config.prediction_ttl
        # The router hears its requests first: it indexes what it sent and learns speeds.
        self._listeners: list[RequestListener] = [_Observer(self)]
        self._unsubscribe = registry.subscribe(self._on_registry_change)

    def route(
        self,
        token_ids: Sequence[int],
        *,
        lora_name: str | None = None,
        cache_salt: str | None = None,
        exclude: Collection[WorkerKey | str] = (),
        shared: tuple[WorkerKey, int] | None = None,
    ) -> Decision:
        """Choose a worker for a tokenized prompt. Raises ``NoWorkerAvailable``.

        ``cache_salt`` is the request's (vLLM's field): only blocks cached under the same
        salt count as its prefix. ``shared`` = (worker, n): the prompt's first n tokens are a
        prompt's this router sent to that worker recently, routed on its head alone (so only
        the head's blocks were predicted there): the rest of them are predicted there now.
        """
        t0 = time.perf_counter()
        seq_hashes = sequence_hashes(token_ids, self.config.block_size, lora_name, cache_salt=cache_salt)
        hashed = time.perf_counter() - t0
        if shared is not None and self._predict is not None:
            key, tokens = shared
            blocks = min(tokens, len(token_ids)) // self.config.block_size
            # Only while that worker still holds the first of them: one whose engine was lost since (its
            # index forgotten) holds nothing that prompt left there.
            if blocks and key.worker_id in self.registry and key in self.indexer.find_matches(seq_hashes[:1]):
                self._predict(key, seq_hashes[:blocks], self._prediction_ttl)
        decision = self.route_hashes(seq_hashes, exclude=exclude, prompt_tokens=len(token_ids))
        decision.timings.hash = hashed
        return decision

    @property
    def prediction_ttl(self) -> float:
        """How long what was sent counts as held without the engine's events saying so."""
        return self._prediction_ttl

    def route_hashes(
        self,
        seq_hashes: Sequence[int],
        *,
        exclude: Collection[WorkerKey | str] = (),
        prompt_tokens: int | None = None,
    ) -> Decision:
        """Choose a worker for a prompt already hashed with ``sequence_hashes``
        (``prompt_tokens`` defaults to its full blocks' tokens)."""
        t0 = time.perf_counter()
        matches = self.indexer.find_matches(seq_hashes) if seq_hashes else {}
        return self._select(seq_hashes, matches, t0, exclude, prompt_tokens)

    def route_head(
        self,
        head_ids: Sequence[int],
        prompt_tokens: int,
        *,
        lora_name: str | None = None,
        cache_salt: str | None = None,
        exclude: Collection[WorkerKey | str] = (),
        token_bound: int | None = None,
        holder: tuple[WorkerKey, int] | None = None,
    ) -> Decision | None:
        """Choose a worker for a prompt of ``prompt_tokens`` tokens (an estimate) of which only the first
        ``head_ids`` are known, or None when the head does not decide it.

        A worker's match ends at its first missing block, so when no worker holds all of the head's
        full blocks, every worker's match is known from the head alone and the rest of the prompt
        only adds uncached tokens, the same number on every worker. A worker that does hold them all
        (the holder of a conversation's earlier turns) may match further. Given ``token_bound`` (no
        more tokens than this in the whole prompt), the head still decides when the worker it chooses
        stays the cheapest beyond a tie even if every such holder other than it held the whole rest:
        more of the prompt on the chosen one only makes it cheaper. Otherwise (or with no bound) the
        caller encodes the whole prompt and calls ``route``. Only in ``kv`` mode at ``temperature`` 0: there
        the choice is the cheapest total's, and a decision the head does not settle is dropped unseen.

        ``holder`` = (worker, n): the prompt's first n tokens (an estimate) are a prompt's this router sent
        to that worker recently, routed on its head alone (a long first turn, whose next turn this is).
        While that worker holds all of this head, it is scored as holding those n tokens too (predicted)."""
        t0 = time.perf_counter()
        block_size = self.config.block_size
        seq_hashes = sequence_hashes(head_ids, block_size, lora_name, cache_salt=cache_salt)
        hashed = time.perf_counter() - t0
        if not seq_hashes:
            return None
        t0 = time.perf_counter()
        full = len(seq_hashes)
        matches = self.indexer.find_matches(seq_hashes)
        if holder is not None:
            key, tokens = holder
            held = matches.get(key)
            blocks = min(tokens, prompt_tokens) // block_size
            if held is not None and held.depth >= full and blocks > held.depth:
                gpu, cpu, disk = held.per_tier
                matches = {**matches, key: Match(blocks, [gpu + blocks - held.depth, cpu, disk], True)}
        holders = [key for key, match in matches.items() if match.depth >= full]
        # A choice that is not the cheapest total's (a rotation, a draw) cannot be checked against holders,
        # and a discarded one would still move its cursor or its random stream.
        if holders and (token_bound is None or self.policy.mode != "kv" or self.config.temperature > 0):
            return None
        prompt_tokens = max(prompt_tokens, len(head_ids))
        decision = self._select(seq_hashes, matches, t0, exclude, prompt_tokens)
        decision.timings.hash = hashed
        if holders and not self._decides(
            decision, holders, matches, max(full, (token_bound or 0) // self.config.block_size), prompt_tokens, exclude
        ):
            return None
        decision.head_only = True
        return decision

    def _decides(
        self,
        decision: Decision,
        holders: list[WorkerKey],
        matches: dict[WorkerKey, Match],
        most_blocks: int,
        prompt_tokens: int,
        exclude: Collection[WorkerKey | str],
    ) -> bool:
        """Whether ``decision``'s choice would stand if each holder of the whole head other than the chosen
        one held the prompt's first ``most_blocks`` blocks (the rest in GPU memory: the cheapest case)."""
        chosen = decision.chosen_score
        rivals = [key for key in holders if key != chosen.key]
        if not rivals or most_blocks <= decision.num_blocks:  # no rival, or no block past the head to hold
            return True
        loads = {s.key: s.load for s in decision.scores}
        deepest: dict[WorkerKey, Match] = {}
        for key in rivals:
            match = matches[key]
            gpu, cpu, disk = match.per_tier
            deepest[key] = Match(most_blocks, [gpu + most_blocks - match.depth, cpu, disk], match.predicted)
        best = score_candidates(self.config, self.speed, rivals, deepest, most_blocks, loads, exclude, prompt_tokens)
        return all(s.skipped is not None or not ties_or_beats(s.total, chosen.total) for s in best)

    def _select(
        self,
        seq_hashes: Sequence[int],
        matches: dict[WorkerKey, Match],
        t0: float,
        exclude: Collection[WorkerKey | str],
        prompt_tokens: int | None,
    ) -> Decision:
        t1 = time.perf_counter()
        candidates = self.registry.keys()
        now = self.clock()
        self.load.expire(now)
        loads = self.load.snapshots(candidates, now)
        decision = self.policy.select(candidates, matches, len(seq_hashes), loads, exclude, prompt_tokens)
        decision.timings = RouteTimings(0.0, t1 - t0, time.perf_counter() - t1)
        decision.seq_hashes = seq_hashes
        return decision

    # -- request lifecycle (the gateway reports it; load terms and listeners see it) --------

    def begin(self, request_id: str, decision: Decision, prompt_tokens: int, key: WorkerKey | None = None) -> InFlight:
        """The request was sent to ``key`` (default: ``decision.chosen``); its handle from now on.

        A retry moves it with ``InFlight.move_to``; ``finish`` frees it.
        """
        key = decision.chosen if key is None else key
        self.policy.sent(key)
        return InFlight(
            request_id,
            decision,
            prompt_tokens,
            key,
            load=self.load,
            block_size=self.config.block_size,
            clock=self.clock,
            listeners=self._listeners,
        )

    def extend(
        self,
        flight: InFlight,
        token_ids: Sequence[int],
        *,
        lora_name: str | None = None,
    ) -> None:
        """``flight`` was routed on the head of its prompt (``route_head``), whose ids ``token_ids`` are all
        known now: its decision takes the whole prompt's block hashes (a retry predicts them all), and the
        blocks past the head are predicted where it went, unless it already finished. Only the blocks past
        the head are hashed, chained to the head's last (which carries any cache salt)."""
        head = flight.decision.seq_hashes
        if not head:
            return
        block_size = self.config.block_size
        more = sequence_hashes(token_ids[len(head) * block_size :], block_size, lora_name, parent=head[-1])
        if not more:
            return
        hashes = [*head, *more]
        flight.decision.seq_hashes = hashes
        if flight.finished:
            return
        # What the engine's events say its worker holds of the whole prompt, before its own blocks come in:
        # the prefix the hit check compares the engine's cached tokens with (the head's match stops at
        # the head, while a conversation's worker also holds the previous answer's blocks).
        if self._held_index is not None:
            flight.held_blocks = (
                flight.key,
                held_prefix(self._held_index, flight.decision, flight.key, flight.predicted_hashes),
            )
        if self._predict is None:
            return
        new = self._predict(flight.key, hashes, self._prediction_ttl)
        if new:
            flight.predicted_hashes = [*flight.predicted_hashes, *new]

    def subscribe(self, listener: RequestListener) -> Callable[[], None]:
        """``listener`` hears every request's lifecycle from now on; returns the function that unsubscribes it."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def close(self) -> None:
        """Stop listening to the registry (a router replaced by a new one)."""
        self._unsubscribe()

    def _on_registry_change(self, change: RegistryChange) -> None:
        if change.kind == "removed":
            self.indexer.remove_worker(change.worker.worker_id)
            self.load.remove_worker(change.worker.worker_id)
            self.speed.forget(change.worker.worker_id)

    # -- what the router itself does with its requests ---------------------------------------

    def _sent(self, flight: InFlight) -> None:
        hashes = flight.decision.seq_hashes
        if self._predict is None or not hashes:
            return
        if flight.previous_key is not None:
            self._unpredict(flight.previous_key, flight.predicted_hashes)  # a retry: that worker failed it
        flight.predicted_hashes = self._predict(flight.key, hashes, self._prediction_ttl) or ()

    def _unpredict(self, key: WorkerKey, hashes: Sequence[int]) -> None:
        """Only the blocks this request added: a prefix predicted by others stays."""
        unpredict = getattr(self.indexer, "unpredict", None)
        if unpredict is not None and hashes:
            unpredict(key, hashes)

    def _answered(self, flight: InFlight) -> None:
        """Teach the speed model one time to first token (streamed answers only: a whole
        answer's first byte comes after the last token)."""
        if flight.served is False:
            self._unpredict(flight.key, flight.predicted_hashes)
        first = flight.first_token_at
        if first is None:
            return
        # How long it held its blocks there: what the memory term waits for.
        self.speed.observe_hold(flight.key.worker_id, self.clock() - flight.sent_at)
        if not flight.streamed:
            return
        score = flight.decision.score_of(flight.key)
        if score is None or score.memory_wait > 0.0:
            # Predicted to wait for room in a full KV pool: its first token says how soon
            # memory freed, not how fast the worker prefills.
            return
        block_size = self.config.block_size
        cached = flight.engine_cached_tokens
        counted = score.cached_blocks * block_size
        uncached = flight.prompt_tokens - (counted if cached is None else cached)
        # Lower-tier blocks loaded back: the decision's, when the engine found (about) the
        # prefix the index promised; otherwise what it found is unknown by tier.
        found = cached is None or cached + block_size >= min(counted, flight.prompt_tokens - 1)
        cpu = score.cpu_blocks if found and not self.config.gpu_only else 0
        disk = score.disk_blocks if found and not self.config.gpu_only else 0
        self.speed.observe(
            Sample(
                flight.key,
                first - flight.sent_at,
                score.queued_prefill_tokens + max(1, uncached),
                score.kv_usage,
                cpu,
                disk,
                score.queued_prefill_tokens,
            )
        )


class _Observer:
    """The router's own ``RequestListener`` (``Router._sent`` / ``Router._answered``)."""

    __slots__ = ("_router",)

    def __init__(self, router: Router) -> None:
        self._router = router

    def on_begin(self, flight: InFlight) -> None:
        self._router._sent(flight)

    def on_first_token(self, flight: InFlight) -> None:
        pass

    def on_finish(self, flight: InFlight) -> None:
        self._router._answered(flight)
