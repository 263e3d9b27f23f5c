"""Per-request KV blocks on top of the block pool: prefix lookup, slot allocation, freeing.

Mirrors vLLM v1's ``KVCacheManager`` for one full-attention group. A request's full
blocks are hashed as its tokens arrive (prompt and generated alike); the longest run of
those hashes found in the pool is its prefix hit. Allocation either gets every block a
step needs or nothing, and caches blocks as soon as the step will have filled them, so
a request scheduled later in the same step already hits them (as in vLLM).

With lower tiers (CPU, disk) the lookup continues below the GPU as a tiered connector's
does: after the run of blocks found in the GPU pool, the following blocks are looked up
in the lower tiers (each from the fastest one holding it) until one is missing. Those
blocks are *loaded*, not recomputed: allocation gives them fresh GPU blocks, which enter
the GPU prefix cache at once (``BlockStored`` with tokens, as vLLM caches loaded
blocks), and ``PrefixHit`` says how many came from each tier so the step can be charged
their transfer time. The lower tiers keep their copies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvgate.protocol.events import Tier
from kvgate.worker.sim.block_pool import Block, BlockHasher, BlockPool
from kvgate.worker.sim.request import Request


@dataclass(slots=True)
class PrefixHit:
    """Cached blocks at the start of a request; their tokens need no prefill.

    ``blocks`` are the GPU pool's (reused in place); ``loaded`` the (hash, tier) of the
    blocks right after them that lower tiers hold (to load). ``num_tokens`` counts both.
    """

    blocks: list[Block] = field(default_factory=list)
    loaded: list[tuple[int, Tier]] = field(default_factory=list)
    num_tokens: int = 0

    def blocks_per_tier(self) -> tuple[int, int, int]:
        """Hit blocks from (GPU, CPU, disk)."""
        counts = [len(self.blocks), 0, 0]
        for _, tier in self.loaded:
            counts[tier] += 1
        return counts[0], counts[1], counts[2]


class KvCache:
    def __init__(self, pool: BlockPool, hasher: BlockHasher) -> None:
        self.pool = pool
        self.hasher = hasher
        self.block_size = pool.block_size
        self._blocks: dict[str, list[Block]] = {}
        self._num_cached: dict[str, int] = {}
        # Counters in tokens, as vLLM's: prefix_cache_queries / _hits (GPU pool) and
        # external_prefix_cache_queries / _hits (the connector's lower tiers), plus every
        # hit token by the tier it came from.
        self.queries = 0
        self.hits = 0
        self.external_queries = 0
        self.external_hits = 0
        self.cached_tokens_per_tier = [0, 0, 0]

    def block_hashes(self, request: Request) -> list[int]:
        """Hashes of every full block of the request's tokens so far (extended lazily)."""
        hashes = request.block_hashes
        bs = self.block_size
        tokens = request.all_token_ids
        for i in range(len(hashes), len(tokens) // bs):
            if hashes:
                hashes.append(self.hasher.hash_block(hashes[-1], tokens[i * bs : (i + 1) * bs]))
            else:
                hashes.append(self.hasher.hash_block(None, tokens[:bs], request.cache_salt))
        return hashes

    def find_prefix(self, request: Request) -> PrefixHit:
        # At least one token is always computed: the step that computes it samples the
        # next one (vLLM caps the hit at num_tokens - 1 for the same reason).
        max_blocks = (request.num_tokens - 1) // self.block_size
        hashes = self.block_hashes(request)[:max_blocks]
        hit = PrefixHit()
        for block_hash in hashes:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hit.blocks.append(block)
        lower = self.pool.lower
        if lower is not None:
            for block_hash in hashes[len(hit.blocks) :]:
                tier = lower.find(block_hash)
                if tier is None:
                    break
                hit.loaded.append((block_hash, tier))
        hit.num_tokens = (len(hit.blocks) + len(hit.loaded)) * self.block_size
        return hit

    def record_query(self, num_tokens: int, hit: PrefixHit) -> None:
        """Count a request's lookup at its first admission (vLLM's prefix-cache stats)."""
        bs = self.block_size
        per_tier = hit.blocks_per_tier()
        self.queries += num_tokens
        self.hits += per_tier[0] * bs
        for tier, n in enumerate(per_tier):
            self.cached_tokens_per_tier[tier] += n * bs
        if self.pool.lower is not None:
            self.external_queries += num_tokens
            self.external_hits += len(hit.loaded) * bs

    def allocate_slots(self, request: Request, num_new_tokens: int, hit: PrefixHit | None = None) -> bool:
        """Blocks for ``num_new_tokens`` more tokens (after ``hit``, if newly admitted); all or nothing."""
        rid = request.request_id
        req_blocks = self._blocks.get(rid, [])
        hit_blocks = hit.blocks if hit is not None else []
        total = request.num_computed_tokens + (hit.num_tokens if hit is not None else 0) + num_new_tokens
        needed = -(-total // self.block_size) - len(req_blocks) - len(hit_blocks)
        # Hit blocks sitting in the free queue stop being allocatable once touched.
        evictable_hits = sum(1 for b in hit_blocks if b.ref_cnt == 0)
        if needed > self.pool.num_free_blocks - evictable_hits:
            return False
        if rid not in self._blocks:
            self._blocks[rid] = req_blocks
            self._num_cached[rid] = len(hit_blocks)
        if hit is not None and hit.loaded:
            lower = self.pool.lower
            assert lower is not None
            # Before the allocation below offloads GPU evictions into the tiers: the blocks
            # being loaded must not be the ones pushed down.
            for block_hash, tier in hit.loaded:
                lower.touch(block_hash, tier)
        if hit_blocks:
            self.pool.touch(hit_blocks)
            req_blocks.extend(hit_blocks)
        if needed > 0:
            req_blocks.extend(self.pool.get_new_blocks(needed))
        num_full = min(total, request.num_tokens) // self.block_size
        num_cached = self._num_cached[rid]
        if num_full > num_cached:
            self.pool.cache_full_blocks(
                req_blocks, self.block_hashes(request), num_cached, num_full, request.all_token_ids, request.cache_salt
            )
            self._num_cached[rid] = num_full
        return True

    def free(self, request: Request) -> None:
        """Release a request's blocks, tail first, so its last blocks are evicted first."""
        blocks = self._blocks.pop(request.request_id, None)
        self._num_cached.pop(request.request_id, None)
        if blocks:
            self.pool.free_blocks(reversed(blocks))
