"""A map from hash keys split into many small dicts, so that no single write stalls the event loop.

A Python dict grows, and under churn (inserts and deletes at a steady size) compacts, by rebuilding
its whole table in one C call: O(entries). At 350k keys that call takes ~12 ms on this project's
machine, at 3M keys over 100 ms; the caller's thread holds the GIL throughout, so on the event loop it
delays every request and every chunk in flight. ``ShardedDict`` keeps ``2**bits`` dicts chosen by a
key's low bits: each rebuild then moves one shard's entries (1/256 of them by default), and the
shards, filling at the same pace, rebuild at different moments as their sizes drift apart.

Keys must be ints whose low bits are spread (hashes). Values are best ints too (serials, bit sets): a
dict holding only ints and strings is not tracked by the garbage collector, while one holding objects
has every collection that reaches it walk all its entries. The methods are the few the prefix caches
need; the bulk ones (``put_all``, ``discard_all``, ``deepest``) take whole key lists so that one Python
call serves a prompt's chunks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

V = TypeVar("V")

DEFAULT_BITS = 8


class ShardedDict(Generic[V]):
    """int key -> value, in ``2**bits`` dicts chosen by ``key & (2**bits - 1)``."""

    __slots__ = ("_shards", "_mask")

    def __init__(self, bits: int = DEFAULT_BITS) -> None:
        if not 0 <= bits <= 16:
            raise ValueError(f"bits must be 0-16, got {bits}")
        self._shards: list[dict[int, V]] = [{} for _ in range(1 << bits)]
        self._mask = (1 << bits) - 1

    def __len__(self) -> int:
        return sum(map(len, self._shards))

    def __bool__(self) -> bool:
        return any(self._shards)

    def __contains__(self, key: int) -> bool:
        return key in self._shards[key & self._mask]

    def __iter__(self) -> Iterator[int]:
        for shard in self._shards:
            yield from shard

    def get(self, key: int, default: V | None = None) -> V | None:
        return self._shards[key & self._mask].get(key, default)

    def __getitem__(self, key: int) -> V:
        return self._shards[key & self._mask][key]

    def __setitem__(self, key: int, value: V) -> None:
        self._shards[key & self._mask][key] = value

    def __delitem__(self, key: int) -> None:
        del self._shards[key & self._mask][key]

    def put_all(self, keys: Iterable[int], value: V) -> None:
        """Map every key of `keys` to `value`."""
        shards, mask = self._shards, self._mask
        for key in keys:
            shards[key & mask][key] = value

    def discard_all(self, keys: Iterable[int], value: V) -> None:
        """Delete each key of `keys` that maps to `value` (==); leave the others."""
        shards, mask = self._shards, self._mask
        for key in keys:
            shard = shards[key & mask]
            if shard.get(key) == value:
                del shard[key]

    def deepest(self, keys: Iterable[int]) -> tuple[V | None, int]:
        """Walking `keys` in order while each is present: the last one's value and how many were present."""
        shards, mask = self._shards, self._mask
        found: V | None = None
        depth = 0
        for key in keys:
            value = shards[key & mask].get(key)
            if value is None:
                break
            found, depth = value, depth + 1
        return found, depth

    def clear(self) -> None:
        for shard in self._shards:
            shard.clear()

    def largest_shard(self) -> int:
        """Entries in the fullest shard: what one rebuild moves at most."""
        return max(map(len, self._shards))
