"""Typed KV-cache events: what every event source produces after decoding.

Two families live here:

* **Engine events** (``BlockStored``, ``BlockRemoved``, ``AllBlocksCleared`` in an
  ``EventBatch``) mirror what vLLM / SGLang publish. Their block hashes are the
  engine's own, opaque values (``int`` or ``bytes``); only ``kvgate.protocol.wire`` creates them
  from bytes, and ``worker.sim`` creates them to publish.
* **Router-native events** (``RouterStored``, ``RouterRemoved``, ``RouterCleared``) carry
  router sequence hashes already recomputed from token ids (``kvgate.protocol.hashing``). They
  are what the prefix index applies and what a sidecar publishes on NATS.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import TypeAlias


class Tier(IntEnum):
    """Where a cached block lives on a worker. Lower value = cheaper to reuse."""

    GPU = 0
    CPU = 1
    DISK = 2

    @classmethod
    def from_medium(cls, medium: str | None) -> Tier:
        """vLLM's ``medium`` field: absent or ``GPU``, ``CPU``, ``DISK`` / ``STORAGE`` (any case)."""
        if medium is None:
            return cls.GPU
        tier = _MEDIUMS.get(medium.upper())
        if tier is None:
            raise ValueError(f"unknown medium {medium!r}")
        return tier


_MEDIUMS = {"GPU": Tier.GPU, "CUDA": Tier.GPU, "CPU": Tier.CPU, "DISK": Tier.DISK, "STORAGE": Tier.DISK}

EngineHash: TypeAlias = int | bytes
ExtraKeys: TypeAlias = tuple[object, ...]


@dataclass(slots=True)
class BlockStored:
    """Blocks became cached on the engine, in prefix order.

    ``token_ids`` holds ``len(block_hashes) * block_size`` tokens, or none at all for a
    tier update (the CPU offloading connector announces copies of blocks already known).

    ``extra_keys`` is vLLM's per-block list of the untagged extra keys its block hashes
    mixed in (None: no block had any), kept as published: each entry None or a tuple of,
    in order, the LoRA name, ``(mm identifier, offset)`` pairs, the ``cache_salt`` (the
    first block of a prompt only) and prompt-embeds digests. ``indexer.translation``
    decides which of them the router's keys can follow.
    """

    block_hashes: list[EngineHash]
    parent_block_hash: EngineHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: Tier = Tier.GPU
    lora_name: str | None = None
    extra_keys: list[ExtraKeys | None] | None = None


@dataclass(slots=True)
class BlockRemoved:
    block_hashes: list[EngineHash]
    medium: Tier = Tier.GPU


@dataclass(slots=True)
class AllBlocksCleared:
    pass


EngineEvent: TypeAlias = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(slots=True)
class EventBatch:
    """One published message: ``[ts, events, data_parallel_rank]``."""

    ts: float
    events: list[EngineEvent]
    data_parallel_rank: int | None = None


@dataclass(slots=True)
class RouterStored:
    """Blocks (router sequence hashes, prefix order) now held in ``tier``."""

    hashes: list[int]
    tier: Tier = Tier.GPU


@dataclass(slots=True)
class RouterRemoved:
    hashes: list[int]
    tier: Tier = Tier.GPU


@dataclass(slots=True)
class RouterCleared:
    """Everything the worker (rank) held is gone: restart, cache reset, or departure."""


RouterEvent: TypeAlias = RouterStored | RouterRemoved | RouterCleared


@dataclass(frozen=True, slots=True, order=True)
class WorkerKey:
    """One routable cache: a worker and one of its data-parallel ranks."""

    worker_id: str
    dp_rank: int = 0

    def __str__(self) -> str:
        return self.worker_id if self.dp_rank == 0 else f"{self.worker_id}#{self.dp_rank}"
