"""The prefix index: which worker rank holds which router block, in which tier.

Owns router-native state only: it applies ``RouterStored`` / ``RouterRemoved`` /
``RouterCleared`` per ``WorkerKey`` and answers ``find_matches``. It never sees engine
hashes, sequence numbers or bytes (``translation`` and ``recovery`` handle those) and
never decides where to route. Pure and synchronous.

Layout: ``router_hash -> int``, in 256 dicts chosen by the hash's low byte (see
``shards.py``: one dict of a million blocks stalled the event loop 26 ms when it rebuilt
its table (``python -m kvgate.indexer.bench``); a shard's rebuild moves 1/256 of that).
Every ``WorkerKey`` owns a *slot*; the value packs a 4-bit nibble per slot (bit 0 GPU,
bit 1 CPU, bit 2 DISK). Bit 3 stays zero so that shifting a value right by one or two
never carries a bit into a neighbouring slot's tier bits, which is what lets
``find_matches`` fold the three tiers of all slots at once. Slots are reused after
``remove_worker``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import repeat

from kvgate.indexer.shards import DEFAULT_BITS
from kvgate.protocol.events import RouterCleared, RouterEvent, RouterRemoved, RouterStored, Tier, WorkerKey


@dataclass(slots=True)
class Match:
    """How much of a prompt's prefix a worker holds, split by best tier per block."""

    depth: int = 0
    per_tier: list[int] = field(default_factory=lambda: [0, 0, 0])
    predicted: bool = False
    """The depth is the router's prediction of blocks it just sent (``predictions.py``),
    not yet confirmed by the engine's events."""

    @property
    def gpu(self) -> int:
        return self.per_tier[Tier.GPU]

    @property
    def cpu(self) -> int:
        return self.per_tier[Tier.CPU]

    @property
    def disk(self) -> int:
        return self.per_tier[Tier.DISK]


_SLOT_BITS = 4
_TIERS = 0b111
# A slot's hex digit -> its best tier: g(PU) if bit 0, else c(PU) if bit 1, else d(isk).
_BEST_TIER = str.maketrans("01234567", ".gcgdgcg")
_SHARD_MASK = (1 << DEFAULT_BITS) - 1


class PrefixIndex:
    """Router block -> (worker rank, tier) presence, with per-rank per-tier counters."""

    __slots__ = ("_shards", "_slot_of", "_key_of", "_free", "_counts", "_live", "_ones", "_hex")

    def __init__(self) -> None:
        self._shards: list[dict[int, int]] = [{} for _ in range(_SHARD_MASK + 1)]
        self._slot_of: dict[WorkerKey, int] = {}
        self._key_of: list[WorkerKey | None] = []
        self._free: list[int] = []
        self._counts: list[list[int]] = []  # per slot: blocks held in [GPU, CPU, DISK]
        self._live = 0  # tier bits of every allocated slot
        self._ones = 0  # bit 0 of every slot position ever created
        self._hex = "0x"  # format spec printing one hex digit per slot position

    def __len__(self) -> int:
        """Distinct router hashes held by any worker rank in any tier."""
        return sum(map(len, self._shards))

    def keys(self) -> list[WorkerKey]:
        """Every worker rank that has stored something and not been removed, sorted."""
        return sorted(self._slot_of)

    def block_counts(self) -> dict[WorkerKey, tuple[int, int, int]]:
        """Blocks held per worker rank, per tier (GPU, CPU, DISK)."""
        counts = self._counts
        return {key: (counts[s][0], counts[s][1], counts[s][2]) for key, s in self._slot_of.items()}

    def apply(self, key: WorkerKey, event: RouterEvent) -> int:
        """Apply one router event; returns how many (block, tier) entries changed."""
        if isinstance(event, RouterStored):
            return self.store(key, event.hashes, event.tier)
        if isinstance(event, RouterRemoved):
            return self.remove(key, event.hashes, event.tier)
        if isinstance(event, RouterCleared):
            return self.clear(key)
        raise TypeError(f"not a router event: {type(event).__name__}")

    def store(self, key: WorkerKey, hashes: Sequence[int], tier: Tier = Tier.GPU) -> int:
        _check_tier(tier)
        slot = self._slot_of.get(key)
        if slot is None:
            slot = self._allocate(key)
        bit = 1 << (slot * _SLOT_BITS + tier)
        shards = self._shards
        added = 0
        for h in hashes:
            blocks = shards[h & _SHARD_MASK]
            v = blocks.get(h)
            if v is None:
                # Storing the shared ``bit`` object (not ``0 | bit``) keeps one int per slot
                # and tier for the common single-holder block instead of one per block.
                blocks[h] = bit
                added += 1
            elif not v & bit:
                blocks[h] = v | bit
                added += 1
        self._counts[slot][tier] += added
        return added

    def remove(self, key: WorkerKey, hashes: Sequence[int], tier: Tier = Tier.GPU) -> int:
        _check_tier(tier)
        slot = self._slot_of.get(key)
        if slot is None:
            return 0
        bit = 1 << (slot * _SLOT_BITS + tier)
        shards = self._shards
        removed = 0
        for h in hashes:
            blocks = shards[h & _SHARD_MASK]
            v = blocks.get(h)
            if v is not None and v & bit:
                v ^= bit
                if v:
                    blocks[h] = v
                else:
                    del blocks[h]
                removed += 1
        self._counts[slot][tier] -= removed
        return removed

    def holds(self, key: WorkerKey, block: int) -> bool:
        """Whether ``key`` holds ``block`` in any tier."""
        slot = self._slot_of.get(key)
        if slot is None:
            return False
        return bool(self._shards[block & _SHARD_MASK].get(block, 0) >> (slot * _SLOT_BITS) & _TIERS)

    def clear(self, key: WorkerKey) -> int:
        """Drop everything ``key`` holds (the slot stays allocated to it)."""
        slot = self._slot_of.get(key)
        if slot is None:
            return 0
        return self._drop_slots([slot])

    def remove_worker(self, worker_id: str) -> int:
        """Drop every rank of ``worker_id`` and free their slots; returns entries dropped."""
        keys = [k for k in self._slot_of if k.worker_id == worker_id]
        slots = [self._slot_of.pop(k) for k in keys]
        dropped = self._drop_slots(slots)
        for slot in slots:
            self._key_of[slot] = None
            self._live &= ~(_TIERS << (slot * _SLOT_BITS))
            self._free.append(slot)
        return dropped

    def find_matches(self, seq_hashes: Sequence[int]) -> dict[WorkerKey, Match]:
        """Per worker rank: contiguous prefix of ``seq_hashes`` held in any tier (depth >= 1),
        each block counted under its best tier (GPU > CPU > DISK)."""
        alive = self._live
        n = len(seq_hashes)
        if not alive or not n:
            return {}
        # Each look-up picks its shard and asks it, all in C-level ``map`` (half the cost of
        # a comprehension); the dicts' cache misses then overlap.
        get, shard_of, low_byte, zeros = dict.get, self._shards.__getitem__, _SHARD_MASK.__rand__, repeat(0)
        ones = self._ones
        fmt = self._hex
        # Consecutive blocks usually carry the same masked value (same holders, same
        # tiers), so the walk only acts where the value changes. Each run becomes its
        # value in fixed-width hex (one digit per slot, 0-7) repeated run-length times:
        # column ``p`` of that text is slot ``width - 1 - p`` along the prompt.
        pieces: list[str] = []
        run_val: int | None = None  # never equal to a first value, even an absent (0) one
        run_start = 0
        # Look-ups go in doubling chunks: a prompt that stops matching early wastes at most
        # half of them.
        start, step = 0, 8
        while start < n:
            stop = start + step
            chunk = seq_hashes[start:stop]
            for i, v in enumerate(list(map(get, map(shard_of, map(low_byte, chunk)), chunk, zeros)), start):
                x = v & alive
                if x != run_val:
                    if run_val:
                        pieces.append(format(run_val, fmt) * (i - run_start))
                    if not x:
                        run_val = None
                        break
                    run_val = x
                    run_start = i
                    alive = ((x | x >> 1 | x >> 2) & ones) * _TIERS
            else:
                start, step = stop, step * 2
                continue
            break
        if run_val:
            pieces.append(format(run_val, fmt) * (min(start, n) - run_start))
        if not pieces:
            return {}
        text = "".join(pieces).translate(_BEST_TIER)
        width = len(self._key_of)
        last = width - 1
        key_of = self._key_of
        out: dict[WorkerKey, Match] = {}
        tallies: dict[str, tuple[int, int, int, int]] = {}  # slots sharing a history share a tally
        for pos, ch in enumerate(text[:width]):
            if ch != ".":
                column = text[pos::width]
                t = tallies.get(column)
                if t is None:
                    g = column.count("g")
                    c = column.count("c")
                    d = column.count("d")
                    t = tallies[column] = (g + c + d, g, c, d)
                out[key_of[last - pos]] = Match(t[0], [t[1], t[2], t[3]])  # type: ignore[index]
        return out

    def _allocate(self, key: WorkerKey) -> int:
        if self._free:
            slot = self._free.pop()
            self._key_of[slot] = key
            self._counts[slot] = [0, 0, 0]
        else:
            slot = len(self._key_of)
            self._key_of.append(key)
            self._counts.append([0, 0, 0])
            self._ones |= 1 << (slot * _SLOT_BITS)
            self._hex = f"0{len(self._key_of)}x"
        self._slot_of[key] = slot
        self._live |= _TIERS << (slot * _SLOT_BITS)
        return slot

    def _drop_slots(self, slots: list[int]) -> int:
        counts = self._counts
        slots = [s for s in slots if any(counts[s])]
        if not slots:
            return 0
        dropped = sum(sum(counts[s]) for s in slots)
        mask = 0
        for s in slots:
            mask |= _TIERS << (s * _SLOT_BITS)
            counts[s] = [0, 0, 0]
        # A full scan: clears and departures are rare, and a per-slot reverse index would
        # cost more memory per block than the whole entry does today.
        keep = ~mask
        for blocks in self._shards:
            for h in [h for h, v in blocks.items() if v & mask]:
                v = blocks[h] & keep
                if v:
                    blocks[h] = v
                else:
                    del blocks[h]
        return dropped


def is_tier(value: object) -> bool:
    """A ``Tier`` or a plain int 0-2; anything else would set a slot's guard bit and
    corrupt its neighbours' matches."""
    return type(value) is Tier or (type(value) is int and 0 <= value <= 2)


def _check_tier(tier: object) -> None:
    if not is_tier(tier):
        raise ValueError(f"not a tier: {tier!r}")
