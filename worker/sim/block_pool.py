"""The GPU block pool: fixed blocks, reference counts, prefix cache, LRU eviction, KV events.

Mirrors vLLM v1's ``BlockPool``. Free blocks wait in one LRU queue; a freed block that
holds a cached (full, hashed) block stays findable by its hash until allocation pops it
from the head of the queue, which evicts it (``BlockRemoved``). Caching a block emits
``BlockStored``, with vLLM's per-block ``extra_keys`` (``[salt]`` on a salted prompt's
first block, None elsewhere). As in vLLM, two requests computing the same block at once
may each cache a copy under the same hash; evicting either copy reports the hash removed.

With ``lower`` tiers (``tiers.LowerTiers``), an evicted cached block is offloaded there
first: its lower-tier events precede its ``BlockRemoved``. A cache reset clears every tier.

Owns block bookkeeping and the events it causes; never decides which request gets
blocks (``kv_cache``) or when (``scheduler``).
"""

from __future__ import annotations

import os
import struct
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import xxhash

from kvgate.protocol.events import AllBlocksCleared, BlockRemoved, BlockStored, EngineEvent
from kvgate.protocol.hashing import pack_tokens
from kvgate.worker.sim.tiers import LowerTiers, TierBlock

_u64 = struct.Struct("<Q").pack


class BlockHasher:
    """Engine block hashes: opaque 64-bit ints chained over (parent hash, block tokens).

    Seeded per process unless ``seed`` is given, like vLLM's hashes without
    ``PYTHONHASHSEED``: consumers must map them (by the tokens in ``BlockStored``) and
    can never compare them across workers or restarts. A ``cache_salt`` enters the first
    block's hash only, as vLLM's extra key of block 0, and so changes the whole chain.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = int.from_bytes(os.urandom(8), "little") if seed is None else seed
        self._root = xxhash.xxh3_64_intdigest(b"kvgate-sim-root", self.seed)

    def hash_block(self, parent: int | None, token_ids: Sequence[int], cache_salt: str | None = None) -> int:
        h = xxhash.xxh3_64(_u64(self._root if parent is None else parent), self.seed)
        h.update(pack_tokens(token_ids))
        if cache_salt:
            # After the fixed-size token bytes, so no salt can pass for tokens.
            h.update(b"cache_salt\0" + cache_salt.encode("utf-8"))
        return h.intdigest()


@dataclass(slots=True, eq=False)
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None  # set while the block is in the prefix cache
    # Kept only with lower tiers: what an offload needs to describe the block.
    parent_hash: int | None = None
    token_ids: list[int] | None = None


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, lower: LowerTiers | None = None) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.lower = lower
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Head = next to be reused (least recently freed).
        self._free: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[int, dict[int, Block]] = {}
        self._events: list[EngineEvent] = []

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_hashes(self) -> int:
        """Distinct blocks findable in the prefix cache (referenced or waiting in the free queue)."""
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by requests (vLLM's ``kv_cache_usage_perc``)."""
        return 1.0 - len(self._free) / self.num_blocks

    def get_cached_block(self, block_hash: int) -> Block | None:
        copies = self._cached.get(block_hash)
        return next(iter(copies.values())) if copies else None

    def touch(self, blocks: Iterable[Block]) -> None:
        """Take a reference on cached blocks a request reuses (out of the free queue)."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def get_new_blocks(self, n: int) -> list[Block]:
        """Pop ``n`` blocks from the LRU head, evicting whatever they cached."""
        if n > len(self._free):
            raise ValueError(f"cannot allocate {n} blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            _, block = self._free.popitem(last=False)
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def _evict(self, block: Block) -> None:
        if block.block_hash is None:
            return
        copies = self._cached[block.block_hash]
        del copies[block.block_id]
        if not copies:
            del self._cached[block.block_hash]
        if self.lower is not None:
            offloaded = TierBlock(block.block_hash, block.parent_hash, block.token_ids or [])
            self._events.extend(self.lower.offload(offloaded))
            block.parent_hash = block.token_ids = None
        self._events.append(BlockRemoved([block.block_hash]))
        block.block_hash = None

    def free_blocks(self, ordered: Iterable[Block]) -> None:
        """Drop references; blocks reaching zero join the queue tail in the given order."""
        for block in ordered:
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block

    def cache_full_blocks(
        self,
        blocks: Sequence[Block],
        block_hashes: Sequence[int],
        num_cached: int,
        num_full: int,
        token_ids: Sequence[int],
        cache_salt: str | None = None,
    ) -> None:
        """Enter ``blocks[num_cached:num_full]`` (now full) into the prefix cache."""
        if num_full <= num_cached:
            return
        new_hashes = []
        bs = self.block_size
        keep = self.lower is not None
        for i in range(num_cached, num_full):
            block, block_hash = blocks[i], block_hashes[i]
            block.block_hash = block_hash
            if keep:
                block.parent_hash = block_hashes[i - 1] if i > 0 else None
                block.token_ids = list(token_ids[i * bs : (i + 1) * bs])
            self._cached.setdefault(block_hash, {})[block.block_id] = block
            new_hashes.append(block_hash)
        parent = block_hashes[num_cached - 1] if num_cached > 0 else None
        # vLLM names every block's extra keys, None for a block without any.
        extra_keys: list[tuple[object, ...] | None] = [None] * len(new_hashes)
        if cache_salt and num_cached == 0:
            extra_keys[0] = (cache_salt,)
        tokens = list(token_ids[num_cached * bs : num_full * bs])
        self._events.append(BlockStored(new_hashes, parent, tokens, bs, extra_keys=extra_keys))

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block, lower tiers included; refused (False) while any block is
        in use, as in vLLM. One ``AllBlocksCleared`` covers every tier."""
        if len(self._free) != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = block.parent_hash = block.token_ids = None
        self._cached.clear()
        if self.lower is not None:
            self.lower.clear()
        self._events.append(AllBlocksCleared())
        return True

    def take_events(self) -> list[EngineEvent]:
        events, self._events = self._events, []
        return events
