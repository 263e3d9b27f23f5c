"""The cache tiers below the GPU pool (CPU memory, disk): LRU stores, offload chain, tier events.

Mirrors a tiered KV-cache connector (vLLM's OffloadingConnector, LMCache) in offload-on-
eviction mode: a cached block the GPU pool evicts is copied to the CPU tier; a block the
CPU tier evicts (LRU) moves to disk; one the disk evicts (LRU) is gone. With only one of
the two tiers configured, GPU evictions go to that one. A tier keeps its copy when the
block is loaded back into the GPU (it is a cache), and a block it already holds is only
refreshed (most recent), with no event.

Events, tagged with the tier's ``medium``, in the order a consumer can follow: a block is
stored in the lower tier *before* it is removed from the upper one (the copy exists before
the source is freed). Stores come in one of two styles, as real connectors send them:
``tokenless`` names only the engine hash the GPU already announced (vLLM's
OffloadingConnector); ``full`` carries the block's tokens and parent hash (LMCache-style,
self-describing). Removals name the hash and the tier it left.

Owns the lower tiers' contents and the events they cause; never decides what a request
loads (``kv_cache``) or what the load costs (``timing``). Pure and synchronous.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from kvgate.protocol.events import BlockRemoved, BlockStored, EngineEvent, Tier
from kvgate.worker.sim.config import TierConfig


@dataclass(slots=True)
class TierBlock:
    """What a tier keeps of a block: enough to announce it self-described (``full`` events)."""

    block_hash: int
    parent_hash: int | None
    token_ids: list[int]


class TierStore:
    """One tier: at most ``capacity`` blocks, least recently used first."""

    def __init__(self, tier: Tier, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"{tier.name} tier needs a positive capacity, got {capacity}")
        self.tier = tier
        self.capacity = capacity
        self._blocks: OrderedDict[int, TierBlock] = OrderedDict()  # head = least recently used

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._blocks

    def hashes(self) -> list[int]:
        """Held hashes, least recently used first."""
        return list(self._blocks)

    def touch(self, block_hash: int) -> bool:
        """Make a held block the most recent; False if it is not held."""
        if block_hash not in self._blocks:
            return False
        self._blocks.move_to_end(block_hash)
        return True

    def add(self, block: TierBlock) -> TierBlock | None:
        """Hold a new block (most recent); returns the block evicted to make room, if any."""
        evicted = self._blocks.popitem(last=False)[1] if len(self._blocks) >= self.capacity else None
        self._blocks[block.block_hash] = block
        return evicted

    def clear(self) -> None:
        self._blocks.clear()


class LowerTiers:
    """The CPU and disk tiers of one engine, in offload order."""

    def __init__(self, config: TierConfig, block_size: int) -> None:
        self.block_size = block_size
        self.full_events = config.event_style == "full"
        self.stores = [
            TierStore(tier, n) for tier, n in ((Tier.CPU, config.cpu_blocks), (Tier.DISK, config.disk_blocks)) if n > 0
        ]
        if not self.stores:
            raise ValueError("LowerTiers needs a CPU or disk tier")

    def store(self, tier: Tier) -> TierStore | None:
        return next((s for s in self.stores if s.tier == tier), None)

    def find(self, block_hash: int) -> Tier | None:
        """The fastest tier holding ``block_hash``, or None."""
        for store in self.stores:
            if block_hash in store:
                return store.tier
        return None

    def touch(self, block_hash: int, tier: Tier) -> None:
        """A request is loading the block from ``tier``: it becomes that tier's most recent."""
        store = self.store(tier)
        if store is not None:
            store.touch(block_hash)

    def offload(self, block: TierBlock) -> list[EngineEvent]:
        """The GPU evicted ``block``: copy it to the first tier; returns the events, in order."""
        events: list[EngineEvent] = []
        self._put(0, block, events)
        return events

    def clear(self) -> None:
        for store in self.stores:
            store.clear()

    def _put(self, level: int, block: TierBlock, events: list[EngineEvent]) -> None:
        store = self.stores[level]
        if store.touch(block.block_hash):
            return
        evicted = store.add(block)
        if evicted is not None:
            # The victim lands in the next tier before it is reported gone from this one.
            if level + 1 < len(self.stores):
                self._put(level + 1, evicted, events)
            events.append(BlockRemoved([evicted.block_hash], store.tier))
        events.append(self._stored(block, store.tier))

    def _stored(self, block: TierBlock, tier: Tier) -> BlockStored:
        if self.full_events:
            return BlockStored(
                [block.block_hash], block.parent_hash, list(block.token_ids), self.block_size, medium=tier
            )
        return BlockStored([block.block_hash], None, [], self.block_size, medium=tier)
