"""Property tests: random event streams against a naive reference model.

The reference is a plain set of (worker rank, tier, router hash) and a per-prompt walk
per worker. ``PrefixIndex`` is driven with router events directly; ``KvIndexer`` with
engine batches from simulated engines (prefix trees of token blocks, tier moves, tier
events before / without their GPU store, removals, clears, restarts, departures, and
lost batches recovered through replay).
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvgate.indexer.index import Match, PrefixIndex
from kvgate.indexer.kv_indexer import KvIndexer
from kvgate.protocol.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EngineEvent,
    EventBatch,
    RouterCleared,
    RouterRemoved,
    RouterStored,
    Tier,
    WorkerKey,
)
from kvgate.protocol.hashing import sequence_hashes

pytestmark = pytest.mark.slow

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KEYS = [WorkerKey(w, r) for w in ("a", "b") for r in (0, 1)]
TIERS = list(Tier)

Entry = tuple[WorkerKey, Tier, int]


def reference_matches(entries: set[Entry], prompt: list[int]) -> dict[WorkerKey, Match]:
    out = {}
    for key in KEYS:
        m = Match()
        for h in prompt:
            tiers = [t for t in TIERS if (key, t, h) in entries]
            if not tiers:
                break
            m.depth += 1
            m.per_tier[min(tiers)] += 1
        if m.depth:
            out[key] = m
    return out


def reference_counts(entries: set[Entry]) -> dict[WorkerKey, tuple[int, int, int]]:
    counts: dict[WorkerKey, list[int]] = {}
    for key, tier, _ in entries:
        counts.setdefault(key, [0, 0, 0])[tier] += 1
    return {k: (c[0], c[1], c[2]) for k, c in counts.items()}


def nonzero(counts: dict[WorkerKey, tuple[int, int, int]]) -> dict[WorkerKey, tuple[int, int, int]]:
    return {k: c for k, c in counts.items() if any(c)}


# --- PrefixIndex with router events ----------------------------------------------------

hashes = st.lists(st.integers(0, 7), max_size=6)
router_ops = st.lists(
    st.one_of(
        st.tuples(st.just("store"), st.integers(0, 3), hashes, st.sampled_from(TIERS)),
        st.tuples(st.just("store"), st.integers(0, 3), hashes, st.sampled_from(TIERS)),
        st.tuples(st.just("remove"), st.integers(0, 3), hashes, st.sampled_from(TIERS)),
        st.tuples(st.just("clear"), st.integers(0, 3)),
        st.tuples(st.just("remove_worker"), st.sampled_from(["a", "b"])),
    ),
    max_size=40,
)
prompts = st.lists(st.lists(st.integers(0, 7), min_size=1, max_size=8), min_size=1, max_size=4)


@SETTINGS
@given(ops=router_ops, probes=prompts)
def test_prefix_index_matches_the_reference(ops: list[tuple], probes: list[list[int]]) -> None:
    index = PrefixIndex()
    entries: set[Entry] = set()
    for op in ops:
        if op[0] == "store":
            key, tier = KEYS[op[1]], op[3]
            index.apply(key, RouterStored(op[2], tier))
            entries |= {(key, tier, h) for h in op[2]}
        elif op[0] == "remove":
            key, tier = KEYS[op[1]], op[3]
            index.apply(key, RouterRemoved(op[2], tier))
            entries -= {(key, tier, h) for h in op[2]}
        elif op[0] == "clear":
            index.apply(KEYS[op[1]], RouterCleared())
            entries = {e for e in entries if e[0] != KEYS[op[1]]}
        else:
            index.remove_worker(op[1])
            entries = {e for e in entries if e[0].worker_id != op[1]}
        for prompt in probes:
            assert index.find_matches(prompt) == reference_matches(entries, prompt)
        assert nonzero(index.block_counts()) == reference_counts(entries)
        assert len(index) == len({h for _, _, h in entries})


# --- KvIndexer with engine batches from simulated engines ------------------------------

BS = 2
CHOICES = 3
Node = tuple[int, ...]  # a path of block choices from the root: one cached block


def tokens_of(node: Node) -> list[int]:
    return [10 * c + j + 1 for c in node for j in range(BS)]


@cache
def router_of(node: Node) -> int:
    return sequence_hashes(tokens_of(node), BS)[-1]


class Engine:
    """One simulated engine rank: what it caches, what it published, its incarnation."""

    def __init__(self, key: WorkerKey, incarnation: int) -> None:
        self.key = key
        self.incarnation = incarnation
        self.present: set[tuple[Tier, Node]] = set()
        self.log: list[EventBatch] = []  # this incarnation's batches; index = seq
        self.safe_next = True  # the first batch after a (re)start is never lost

    def engine_hash(self, node: Node) -> int:
        # Opaque and different for every incarnation, like a randomly seeded engine hash.
        return hash((self.incarnation, node)) & ((1 << 63) - 1)

    def nodes(self, tier: Tier | None = None) -> list[Node]:
        return sorted({n for t, n in self.present if tier is None or t == tier})


class Reference:
    """What the indexer must show for one rank: the translation rules, on sets.

    ``known``: every block mapped since the last clear (the translator remembers blocks
    that left their last tier, boundedly; these tests stay far below the bound)."""

    def __init__(self) -> None:
        self.visible: set[tuple[Tier, Node]] = set()
        self.waiting: dict[Node, set[Tier]] = {}
        self.known: set[Node] = set()
        self.held: list[tuple[list[Node], Node, Tier, set[Node]]] = []  # stores waiting for a parent
        self.held_by: dict[Node, tuple[list[Node], Node, Tier, set[Node]]] = {}  # the latest hold of a block

    def store(self, nodes: list[Node], parent: Node | None, tier: Tier) -> None:
        if parent is not None and parent not in self.known:
            entry = (nodes, parent, tier, set())
            self.held.append(entry)
            self.held_by.update((n, entry) for n in nodes)
            return
        self._apply(nodes, tier)
        while True:
            ready = [h for h in self.held if h[1] in self.known]
            if not ready:
                return
            entry = ready[0]
            self.held.remove(entry)
            for n in entry[0]:
                if self.held_by.get(n) is entry:
                    del self.held_by[n]
            self._apply(entry[0], entry[2])
            self.visible -= {(entry[2], n) for n in entry[3]}

    def _apply(self, nodes: list[Node], tier: Tier) -> None:
        for n in nodes:
            self.visible.add((tier, n))
            self.known.add(n)
            for t in self.waiting.pop(n, set()):
                self.visible.add((t, n))

    def tier_update(self, nodes: list[Node], tier: Tier) -> None:
        for n in nodes:
            if n in self.known:
                self.visible.add((tier, n))
            else:
                self.waiting.setdefault(n, set()).add(tier)

    def remove(self, nodes: list[Node], tier: Tier) -> None:
        for n in nodes:
            if (tier, n) in self.visible:
                self.visible.discard((tier, n))
            elif tier in self.waiting.get(n, set()):
                self.waiting[n].discard(tier)
            elif n in self.held_by and self.held_by[n][2] == tier:
                self.held_by[n][3].add(n)

    def clear(self) -> None:
        self.__init__()  # type: ignore[misc]


class Fleet:
    """Engines, their reference model, a lossy delivery and a replay server."""

    def __init__(self, lossy: bool) -> None:
        self.lossy = lossy
        self.incarnations = 0
        self.engines = {key: self._start(key) for key in KEYS}
        self.refs = {key: Reference() for key in KEYS}
        self.replays: list[tuple[WorkerKey, int, int, int]] = []  # key, incarnation, from, to
        self.indexer = KvIndexer(BS, self, max_pending_blocks=10_000)

    def _start(self, key: WorkerKey) -> Engine:
        self.incarnations += 1
        return Engine(key, self.incarnations)

    def request_replay(self, sink: object, worker_id: str, rank: int, start: int, end: int) -> None:
        """The fleet is the indexer's ``ReplaySource``: requests queue until ``serve_replays``."""
        key = WorkerKey(worker_id, rank)
        self.replays.append((key, self.engines[key].incarnation, start, end))

    def publish(self, key: WorkerKey, events: list[EngineEvent], drop: bool) -> None:
        engine = self.engines[key]
        seq = len(engine.log)
        batch = EventBatch(0.0, events, key.dp_rank)
        engine.log.append(batch)
        if drop and self.lossy and not engine.safe_next:
            return
        engine.safe_next = False
        self.indexer.apply_engine_batch(key.worker_id, seq, batch)

    def serve_replays(self) -> None:
        for _ in range(1000):  # a stream that keeps asking would otherwise hang the suite
            if not self.replays:
                return
            key, incarnation, start, _ = self.replays.pop(0)
            engine = self.engines[key]
            ok = engine.incarnation == incarnation  # a restarted engine's socket is a new one
            if ok:
                # vLLM's replay socket answers everything it buffered from ``start`` on.
                for seq in range(start, len(engine.log)):
                    self.indexer.apply_engine_batch(key.worker_id, seq, engine.log[seq], replayed=True)
            self.indexer.replay_finished(key.worker_id, key.dp_rank, ok)
        raise AssertionError("replay requests never stop")

    def restart(self, key: WorkerKey, announce: bool = True) -> None:
        """The engine comes back empty; ``announce``: it publishes (an empty batch) at once,
        which is when the indexer can tell."""
        self.engines[key] = self._start(key)
        self.refs[key].clear()
        if announce:
            self.publish(key, [], drop=False)

    def settle(self) -> None:
        """Reveal trailing losses with an empty batch per rank, then serve every replay."""
        for key in KEYS:
            self.publish(key, [], drop=False)
        self.serve_replays()

    def expected(self) -> set[Entry]:
        return {(key, t, router_of(n)) for key, ref in self.refs.items() for t, n in ref.visible}

    def check(self, probes: Iterable[Node]) -> None:
        entries = self.expected()
        for node in probes:
            prompt = sequence_hashes(tokens_of(node), BS)
            assert self.indexer.find_matches(prompt) == reference_matches(entries, prompt), node
        assert nonzero(self.indexer.block_counts()) == reference_counts(entries)


def pick(items: list, i: int) -> object:
    return items[i % len(items)]


# One generic op; its first field picks the kind with these weights (out of 100), the
# rest are read by that kind (see run_engine_op).
OP_KINDS = [
    ("store", 35),
    ("tier", 20),
    ("remove", 25),
    ("clear", 4),
    ("restart", 5),
    ("remove_worker", 3),
    ("serve", 8),
]
engine_ops = st.lists(
    st.tuples(
        st.integers(0, 99),
        st.sampled_from([0, 0, 0, 1, 2, 3]),  # key: mostly one rank, so its state grows deep
        st.integers(0, 50),  # a pick (parent, block held)
        st.lists(st.integers(0, 50), min_size=1, max_size=3),  # extension choices / block picks
        st.sampled_from(TIERS),
        st.booleans(),  # known blocks only (tier), held blocks only (remove)
        st.integers(0, 5),  # 0: this batch is lost (lossy runs)
    ),
    min_size=10,
    max_size=40,
)


def op_kind(roll: int) -> str:
    for kind, weight in OP_KINDS:
        if roll < weight:
            return kind
        roll -= weight
    raise AssertionError("weights must sum to 100")


UNIVERSE: list[Node] = [(a,) for a in range(CHOICES)] + [(a, b) for a in range(CHOICES) for b in range(CHOICES)]


def run_engine_op(fleet: Fleet, op: tuple) -> None:
    roll, key_index, pick_i, picks, tier, flag, loss = op
    kind = op_kind(roll)
    lost = loss == 0
    if kind == "serve":
        fleet.serve_replays()
        return
    if kind == "remove_worker":
        worker = KEYS[key_index].worker_id
        fleet.indexer.remove_worker(worker)
        for key in KEYS:
            if key.worker_id == worker:
                fleet.restart(key, announce=False)  # if it comes back, it is a fresh engine
        return
    key = KEYS[key_index]
    engine, ref = fleet.engines[key], fleet.refs[key]
    if kind == "store":
        parents: list[Node | None] = [None, *engine.nodes()]
        parent = pick(parents, pick_i)
        base: Node = parent or ()  # type: ignore[assignment]
        ext = [c % CHOICES for c in picks]
        nodes = [base + tuple(ext[: i + 1]) for i in range(len(ext))]
        tier = Tier.CPU if tier == Tier.DISK else tier  # self-describing stores: GPU, some CPU
        event = BlockStored(
            [engine.engine_hash(n) for n in nodes],
            None if parent is None else engine.engine_hash(parent),  # type: ignore[arg-type]
            [t for c in ext for t in tokens_of((c,))],
            BS,
            medium=tier,
        )
        engine.present |= {(tier, n) for n in nodes}
        ref.store(nodes, parent, tier)  # type: ignore[arg-type]
        fleet.publish(key, [event], lost)
    elif kind == "tier":
        tier = Tier.DISK if tier == Tier.GPU else tier
        pool = engine.nodes() if flag and engine.present else UNIVERSE
        nodes = sorted({pick(pool, i) for i in picks})  # type: ignore[type-var]
        engine.present |= {(tier, n) for n in nodes}
        ref.tier_update(nodes, tier)
        fleet.publish(key, [BlockStored([engine.engine_hash(n) for n in nodes], None, [], BS, medium=tier)], lost)
    elif kind == "remove":
        held = sorted(engine.present)
        if flag and held:
            tier = pick(held, pick_i)[0]  # type: ignore[index]
            pool = engine.nodes(tier)
        else:
            pool = UNIVERSE
        nodes = sorted({pick(pool, i) for i in picks})  # type: ignore[type-var]
        engine.present -= {(tier, n) for n in nodes}
        ref.remove(nodes, tier)
        fleet.publish(key, [BlockRemoved([engine.engine_hash(n) for n in nodes], tier)], lost)
    elif kind == "clear":
        engine.present.clear()
        ref.clear()
        fleet.publish(key, [AllBlocksCleared()], lost)
    else:
        fleet.restart(key)


def probes_for(fleet: Fleet) -> set[Node]:
    deepest = {n for e in fleet.engines.values() for _, n in e.present}
    return deepest | {(0, 0, 0, 0), (1, 2, 1), (2,)}


@SETTINGS
@given(ops=engine_ops)
def test_kv_indexer_matches_the_reference_in_order(ops: list[tuple]) -> None:
    fleet = Fleet(lossy=False)
    for op in ops:
        run_engine_op(fleet, op)
        fleet.check(probes_for(fleet))
    assert fleet.indexer.stats.gaps == 0 and fleet.indexer.stats.replays_failed == 0


@SETTINGS
@given(ops=engine_ops)
def test_kv_indexer_recovers_lost_batches_through_replay(ops: list[tuple]) -> None:
    fleet = Fleet(lossy=True)
    for op in ops:
        run_engine_op(fleet, op)
    fleet.settle()
    fleet.check(probes_for(fleet))
