"""What a perfect router could have cached: the oracle a run's measured hit rate is judged against.

Given the exact requests a run sent (in send order), each as its prompt's block hashes
(the gateway's router hashes, from ``POST /debug/route``: equal hashes mean an equal
token prefix) and its prompt length, two caches are replayed:

- **pooled LRU**: one cache of the fleet's total GPU size (the sum of the workers'
  ``num_gpu_blocks``), as if the whole fleet were one engine with vLLM's prefix-cache
  semantics: a request reuses its longest cached block prefix (a block counts only if
  every block before it is cached too), then all its full blocks are inserted or touched;
  past capacity the least recently used blocks are evicted. A request's blocks are touched
  last block first, so its first blocks are the most recent: a later eviction takes a
  prompt's tail before its head, as vLLM's free queue does (it frees a finished request's
  blocks tail first).
- **infinite**: the same with no capacity limit, the most any cache could reuse.

The engine always computes a prompt's last token, so a prompt cached whole reports one
block less (``engine_cached_tokens``, the same rule as the router's hit accounting). A
router that spreads requests over N workers can at best match the pooled LRU cache (no
block is ever duplicated there), which is why the bench reports measured cached tokens
as a percentage of it.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class OracleRequest:
    block_hashes: Sequence[int]  # the prompt's full blocks, chained (equal hash = equal prefix)
    prompt_tokens: int


@dataclass(frozen=True)
class OracleResult:
    prompt_tokens: int
    cached_tokens: int
    per_request: tuple[int, ...]  # cached tokens of each request, in order

    @property
    def cached_fraction(self) -> float | None:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else None


def engine_cached_tokens(prompt_tokens: int, blocks: int, block_size: int) -> int:
    """Tokens an engine holding ``blocks`` of the prompt's prefix reports cached: it always
    computes the last prompt token, so a prompt cached whole reports a block less."""
    return min(blocks, max(prompt_tokens - 1, 0) // block_size) * block_size


class LruBlockCache:
    """Block hashes in least-recently-used order; ``capacity`` None is an infinite cache."""

    def __init__(self, capacity: int | None):
        if capacity is not None and capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.capacity = capacity
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block: int) -> bool:
        return block in self._blocks

    def cached_prefix(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of ``hashes`` are cached (stops at the first missing one)."""
        n = 0
        for h in hashes:
            if h not in self._blocks:
                break
            n += 1
        return n

    def touch(self, hashes: Sequence[int]) -> None:
        """Insert or refresh every block, the first block ending most recent; then evict."""
        for h in reversed(hashes):
            self._blocks[h] = None
            self._blocks.move_to_end(h)
        if self.capacity is not None:
            while len(self._blocks) > self.capacity:
                self._blocks.popitem(last=False)

    def lru_order(self) -> list[int]:
        """Cached blocks, least recently used first."""
        return list(self._blocks)


def replay(requests: Sequence[OracleRequest], block_size: int, capacity_blocks: int | None) -> OracleResult:
    """Cached tokens each request would find in one LRU cache of ``capacity_blocks`` (None: infinite)."""
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    cache = LruBlockCache(capacity_blocks)
    per_request = []
    for req in requests:
        hit_blocks = cache.cached_prefix(req.block_hashes)
        per_request.append(engine_cached_tokens(req.prompt_tokens, hit_blocks, block_size))
        cache.touch(req.block_hashes)
    return OracleResult(sum(r.prompt_tokens for r in requests), sum(per_request), tuple(per_request))


def oracle_summary(
    requests: Sequence[OracleRequest], block_size: int, pooled_blocks: int, measured_fraction: float | None
) -> dict[str, float | int | None]:
    """The report's oracle figures: both oracles' cached fractions, and the measured one as a
    share of each (None where a figure is missing or an oracle cached nothing)."""
    pooled = replay(requests, block_size, pooled_blocks)
    infinite = replay(requests, block_size, None)
    pf, inf = pooled.cached_fraction, infinite.cached_fraction
    return {
        "requests": len(requests),
        "pooled_blocks": pooled_blocks,
        "pooled_lru_fraction": pf,
        "infinite_fraction": inf,
        "measured_fraction": measured_fraction,
        "measured_of_pooled": measured_fraction / pf if measured_fraction is not None and pf else None,
        "measured_of_infinite": measured_fraction / inf if measured_fraction is not None and inf else None,
    }
