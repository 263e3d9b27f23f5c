"""Engine events of one worker rank -> router events (``BlockTranslator``).

Owns the engine hash -> router hash map of one ``WorkerKey``, per tier. Engine hashes
are opaque (their seed may be random per process), so a store that carries tokens is
re-hashed with ``kvgate.protocol.hashing`` (the event's LoRA name, chained from the
parent's router hash, or from its cache salt's root for a prompt's first blocks); its
mapping lets later parents, removals and token-less tier updates resolve. A mapping
leaves a tier's map when its block leaves that tier, so the maps hold exactly what the
engine holds. Never touches the prefix index (the NATS sidecar publishes what this
produces instead of indexing it) and never reads sequence numbers.

Deliberate choices:

* **Unknown parent -> hold, bounded.** A store whose parent engine hash is not known is
  held until a store reveals that parent's router hash, then keyed and applied (the
  offloading connector evicts a sequence tail first, so its self-describing stores
  can name parents it announces only later). Hashing it without its parent would
  produce keys no prompt can match. Held blocks are bounded (``max_pending``); the
  oldest are given up first and counted in ``unknown_parent``. A removal of a held
  block is remembered and applied when its store is.
* **Token-less tier updates** (the CPU offloading connector) name blocks by engine hash
  only: known ones are stored in the new tier at once; unknown ones wait in a bounded
  pending map until a store with tokens reveals their router hash (tier events may
  arrive before, after, or without the GPU ones). Overflow gives up the oldest waiting
  block and counts it in ``unknown_block``.
* **Recently forgotten blocks still resolve.** vLLM appends the connector's events after
  the KV manager's, so a batch can remove a block from its last tier (GPU) and then
  announce its CPU copy. A block that leaves its last tier keeps its engine -> router
  mapping in a bounded generational map (a fact about content, true for the engine's
  lifetime) that token-less updates and parents may still resolve through.
* A store with a ``lora_id`` but no ``lora_name`` cannot be keyed the way the gateway
  keys LoRA prompts; it is rejected (``lora_without_name``) rather than filed under the
  base model's keys.
* **Extra keys, strictly.** vLLM publishes per block the untagged extra keys its hash
  mixed in: the LoRA name on every block of a LoRA request, then ``(mm id, offset)``
  pairs, the ``cache_salt`` on a prompt's first block only, prompt-embeds digests. A
  salt is followed (``hashing.salt_root``), so salted blocks are keyed apart from
  everyone else's; a continuation inherits it through its parent. Keys the router
  cannot follow (multimodal, prompt embeddings) reject the store
  (``unsupported_extra_keys``): filed under token-only keys they would over-report.
  Anything else off that layout (wrong length, a LoRA name other than the event's, a
  salt past the first block or on a store with a parent) is ``bad_extra_keys``.
* **Stores without extra keys keep a known first block.** The connectors'
  self-describing stores (LMCache, the OffloadingConnector's) publish no extra keys, so
  a salted prompt's first block offloaded that way looks unsalted; a root store whose
  first engine hash is already mapped (by its GPU store) chains from that mapping
  instead. Engine hashes name content for the engine's lifetime, salt included.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from kvgate.protocol.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EngineEvent,
    EngineHash,
    ExtraKeys,
    RouterCleared,
    RouterEvent,
    RouterRemoved,
    RouterStored,
    Tier,
)
from kvgate.protocol.hashing import DEFAULT_BLOCK_SIZE, chain_hashes, local_block_hashes, salt_root

DEFAULT_MAX_PENDING = 65_536
DEFAULT_MAX_FORGOTTEN = 8_192
_TIERS = tuple(Tier)


@dataclass
class TranslationStats:
    """Counters a translator bumps; ``KvIndexer``'s ``IndexerStats`` extends this."""

    rejected: Counter[str] = field(default_factory=Counter)
    unknown_parent: int = 0  # held blocks given up before their parent became known
    unknown_block: int = 0  # removals naming an unknown block + pending tier updates given up


class _Unkeyable(Exception):
    """A store whose extra keys the router's keys cannot follow; ``kind`` is counted."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def _salt_of(ev: BlockStored, extra: list[ExtraKeys | None]) -> str | None:
    """The cache salt ``ev``'s extra keys give its first block (None: unsalted); raises ``_Unkeyable``."""
    if len(extra) != len(ev.block_hashes):
        raise _Unkeyable("bad_extra_keys")
    lora = ev.lora_name
    salt = None
    for i, keys in enumerate(extra):
        rest: ExtraKeys = () if keys is None else keys
        if lora:
            if not rest or rest[0] != lora:
                raise _Unkeyable("bad_extra_keys")
            rest = rest[1:]
        if not rest:
            continue
        if any(type(k) is list or type(k) is tuple or type(k) is bytes for k in rest):
            raise _Unkeyable("unsupported_extra_keys")
        first = rest[0]
        if i or ev.parent_block_hash is not None or len(rest) != 1 or type(first) is not str or not first:
            raise _Unkeyable("bad_extra_keys")
        salt = first
    return salt


@dataclass(slots=True)
class _Held:
    """A store waiting for its parent's router hash, and the blocks removed meanwhile."""

    event: BlockStored
    gone: set[EngineHash] = field(default_factory=set)


class BlockTranslator:
    """Per ``WorkerKey``: engine events -> router events, keeping engine -> router maps."""

    __slots__ = (
        "block_size",
        "max_pending",
        "max_forgotten",
        "stats",
        "_maps",
        "_others",
        "_pending",
        "_orphans",
        "_held",
        "_held_blocks",
        "_forgotten",
        "_older",
    )

    def __init__(
        self,
        block_size: int = DEFAULT_BLOCK_SIZE,
        *,
        max_pending: int = DEFAULT_MAX_PENDING,
        max_forgotten: int = DEFAULT_MAX_FORGOTTEN,
        stats: TranslationStats | None = None,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.max_pending = max_pending
        self.max_forgotten = max_forgotten
        self.stats = stats if stats is not None else TranslationStats()
        self._maps: tuple[dict[EngineHash, int], ...] = tuple({} for _ in _TIERS)
        self._others = tuple(tuple(m for u, m in zip(_TIERS, self._maps) if u != t) for t in _TIERS)
        # engine hash -> tier bits announced by token-less stores before its router hash was known
        self._pending: OrderedDict[EngineHash, int] = OrderedDict()
        # parent engine hash -> stores waiting for it
        self._orphans: OrderedDict[EngineHash, list[_Held]] = OrderedDict()
        self._held: dict[EngineHash, _Held] = {}  # engine hash -> the latest store holding it
        self._held_blocks = 0
        # Mappings of blocks that left their last tier, in two generations: when the
        # newer one fills up, the older one is dropped whole (O(1), no per-entry order).
        self._forgotten: dict[EngineHash, int] = {}
        self._older: dict[EngineHash, int] = {}

    def __len__(self) -> int:
        """Mapped (engine hash, tier) entries."""
        return sum(len(m) for m in self._maps)

    @property
    def pending(self) -> int:
        """Blocks waiting: token-less tier updates for their router hash, stores for their parent's."""
        return len(self._pending) + self._held_blocks

    def router_hash(self, engine_hash: EngineHash) -> int | None:
        """The router hash ``engine_hash`` maps to (in a tier, or recently forgotten), or None."""
        for m in self._maps:
            r = m.get(engine_hash)
            if r is not None:
                return r
        r = self._forgotten.get(engine_hash)
        return self._older.get(engine_hash) if r is None else r

    def tiers_of(self, engine_hash: EngineHash) -> set[Tier]:
        """The tiers ``engine_hash`` is mapped in."""
        return {t for t in _TIERS if engine_hash in self._maps[t]}

    def clear(self) -> None:
        """Forget everything (engine restart, cache reset)."""
        for m in self._maps:
            m.clear()
        self._pending.clear()
        self._orphans.clear()
        self._held.clear()
        self._held_blocks = 0
        self._forgotten.clear()
        self._older.clear()

    def translate(self, events: Iterable[EngineEvent]) -> list[RouterEvent]:
        """Router events for ``events`` in order; rejected or unresolvable parts are counted."""
        out: list[RouterEvent] = []
        for ev in events:
            if isinstance(ev, BlockStored):
                self._stored(ev, out)
            elif isinstance(ev, BlockRemoved):
                self._removed(ev, out)
            elif isinstance(ev, AllBlocksCleared):
                self.clear()
                out.append(RouterCleared())
            else:
                self.stats.rejected["unknown_event"] += 1
        return out

    def _stored(self, ev: BlockStored, out: list[RouterEvent]) -> None:
        block_size = self.block_size
        if ev.block_size != block_size:
            self.stats.rejected["bad_block_size"] += 1
            return
        engine = ev.block_hashes
        if not engine:
            return
        tokens = ev.token_ids
        if not tokens:
            self._tier_update(engine, ev.medium, out)
            return
        if len(tokens) != len(engine) * block_size:
            self.stats.rejected["token_count_mismatch"] += 1
            return
        if ev.lora_id is not None and not ev.lora_name:
            self.stats.rejected["lora_without_name"] += 1
            return
        salt = None
        if ev.extra_keys is not None:
            try:
                salt = _salt_of(ev, ev.extra_keys)
            except _Unkeyable as exc:
                self.stats.rejected[exc.kind] += 1
                return
        parent = ev.parent_block_hash
        if parent is not None:
            # Parents are nearly always on GPU: try that map before the general lookup.
            parent = self._maps[Tier.GPU].get(parent) or self.router_hash(parent)
            if parent is None:
                self._hold_store(ev)
                return
        elif salt is not None:
            parent = salt_root(salt)
        self._map(ev, parent, out)
        if self._orphans:
            self._release(engine, out)

    def _map(self, ev: BlockStored, parent: int | None, out: list[RouterEvent]) -> None:
        """Key a valid store whose parent's router hash is known, and emit it."""
        engine = ev.block_hashes
        local = local_block_hashes(ev.token_ids, self.block_size, ev.lora_name)
        known = self.router_hash(engine[0]) if parent is None and ev.extra_keys is None else None
        # A root store without extra keys may be a salted first block a connector announced
        # self-described (see the module docstring): its GPU store's mapping knows better.
        routers = chain_hashes(local, parent) if known is None else [known, *chain_hashes(local[1:], known)]
        tier = ev.medium
        self._maps[tier].update(zip(engine, routers))
        out.append(RouterStored(routers, tier))
        pending = self._pending
        if pending and not pending.keys().isdisjoint(engine):
            self._resolve_pending(engine, routers, tier, out)

    def _hold_store(self, ev: BlockStored) -> None:
        held = _Held(ev)
        self._orphans.setdefault(ev.parent_block_hash, []).append(held)  # type: ignore[arg-type]
        for e in ev.block_hashes:
            self._held[e] = held
        self._held_blocks += len(ev.block_hashes)
        while self._held_blocks > self.max_pending and self._orphans:
            _, given_up = self._orphans.popitem(last=False)
            for h in given_up:
                self._forget_held(h)
                self.stats.unknown_parent += len(h.event.block_hashes)

    def _forget_held(self, held: _Held) -> None:
        for e in held.event.block_hashes:
            if self._held.get(e) is held:
                del self._held[e]
        self._held_blocks -= len(held.event.block_hashes)

    def _release(self, engine: list[EngineHash], out: list[RouterEvent]) -> None:
        """Apply the stores that were waiting for any of ``engine`` (and, in turn, theirs)."""
        work = [engine]
        while work and self._orphans:
            hashes = work.pop()
            if self._orphans.keys().isdisjoint(hashes):
                continue
            for e in hashes:
                for held in self._orphans.pop(e, ()):
                    self._forget_held(held)
                    ev = held.event
                    self._map(ev, self.router_hash(e), out)
                    if held.gone:
                        self._removed(BlockRemoved([g for g in ev.block_hashes if g in held.gone], ev.medium), out)
                    work.append(ev.block_hashes)

    def _tier_update(self, engine: list[EngineHash], tier: Tier, out: list[RouterEvent]) -> None:
        target = self._maps[tier]
        found: list[int] = []
        for e in engine:
            r = self.router_hash(e)
            if r is None:
                self._wait(e, tier)
            else:
                target[e] = r
                found.append(r)
        if found:
            out.append(RouterStored(found, tier))

    def _wait(self, e: EngineHash, tier: Tier) -> None:
        pending = self._pending
        pending[e] = pending.get(e, 0) | (1 << tier)
        if len(pending) > self.max_pending:
            pending.popitem(last=False)
            self.stats.unknown_block += 1

    def _resolve_pending(
        self, engine: list[EngineHash], routers: list[int], stored: Tier, out: list[RouterEvent]
    ) -> None:
        pop = self._pending.pop
        by_tier: list[list[int]] = [[] for _ in _TIERS]
        for e, r in zip(engine, routers):
            bits = pop(e, 0)
            for t in _TIERS:
                if t != stored and bits >> t & 1:
                    self._maps[t][e] = r
                    by_tier[t].append(r)
        out.extend(RouterStored(hashes, t) for t, hashes in zip(_TIERS, by_tier) if hashes)

    def _removed(self, ev: BlockRemoved, out: list[RouterEvent]) -> None:
        tier = ev.medium
        pop = self._maps[tier].pop
        engine = ev.block_hashes
        gone = [pop(e, None) for e in engine]
        if None in gone:
            for e, r in zip(engine, gone):
                if r is None and not self._cancel_waiting(e, tier):
                    self.stats.unknown_block += 1
            engine = [e for e, r in zip(engine, gone) if r is not None]
            gone = [r for r in gone if r is not None]
        if not gone:
            return
        out.append(RouterRemoved(gone, tier))  # type: ignore[arg-type]
        # Remember the blocks that just left their last tier (bounded, see the docstring).
        a, b = self._others[tier]
        pairs = (
            zip(engine, gone) if not (a or b) else ((e, r) for e, r in zip(engine, gone) if e not in a and e not in b)
        )
        forgotten = self._forgotten
        forgotten.update(pairs)  # type: ignore[arg-type]
        if len(forgotten) >= self.max_forgotten // 2:
            self._older = forgotten
            self._forgotten = {}

    def _cancel_waiting(self, e: EngineHash, tier: Tier) -> bool:
        """A removal of a block still waiting (token-less update or held store) in ``tier``."""
        bits = self._pending.get(e, 0)
        bit = 1 << tier
        if bits & bit:
            if bits == bit:
                del self._pending[e]
            else:
                self._pending[e] = bits ^ bit
            return True
        held = self._held.get(e)
        if held is not None and held.event.medium == tier:
            held.gone.add(e)
            return True
        return False
