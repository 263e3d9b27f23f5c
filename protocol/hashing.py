"""Block hashing: the index's key scheme (Dynamo-compatible).

Token ids of one full block are packed as unsigned 32-bit little-endian integers and
hashed with xxh3-64 (seed 1337): the *local* hash. *Sequence* hashes chain them,
``seq[0] = local[0]`` and ``seq[i] = xxh3_64(u64le(seq[i-1]) || u64le(local[i]), 1337)``,
so a block's hash names its whole prefix. A partial last block is never hashed.

A LoRA adapter changes the local seed to ``(1337 + xxh3_64(utf8(name))) mod 2**64`` so
requests for different adapters never share blocks; the chain keeps seed 1337.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Sequence
from functools import lru_cache

import xxhash

BASE_SEED = 1337
DEFAULT_BLOCK_SIZE = 64
_MASK64 = (1 << 64) - 1

_xxh3 = xxhash.xxh3_64_intdigest
_pair = struct.Struct("<QQ").pack
_BIG_ENDIAN_HOST = sys.byteorder == "big"


@lru_cache(maxsize=1024)
def lora_seed(lora_name: str | None) -> int:
    """Seed for the local hashes of requests that use ``lora_name`` (base seed when None)."""
    if not lora_name:
        return BASE_SEED
    return (BASE_SEED + _xxh3(lora_name.encode("utf-8"))) & _MASK64


def pack_tokens(token_ids: Sequence[int]) -> bytes:
    """Token ids as contiguous u32 little-endian bytes."""
    packed = array("I", token_ids)
    if _BIG_ENDIAN_HOST:
        packed.byteswap()
    return packed.tobytes()


def local_block_hashes(
    token_ids: Sequence[int],
    block_size: int = DEFAULT_BLOCK_SIZE,
    lora_name: str | None = None,
) -> list[int]:
    """Local hash of every full block of ``token_ids``; the partial tail is ignored."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    n_blocks = len(token_ids) // block_size
    if n_blocks == 0:
        return []
    seed = lora_seed(lora_name)
    # Packing the tail too is cheaper than copying the list to cut it off; it is never hashed.
    raw = pack_tokens(token_ids)
    step = block_size * 4
    return [_xxh3(raw[i : i + step], seed) for i in range(0, n_blocks * step, step)]


def chain_hashes(local_hashes: Sequence[int], parent: int | None = None) -> list[int]:
    """Sequence hashes for ``local_hashes``, continuing from ``parent`` (a sequence hash)."""
    out: list[int] = []
    append = out.append
    prev = parent
    for local in local_hashes:
        prev = local if prev is None else _xxh3(_pair(prev, local), BASE_SEED)
        append(prev)
    return out


def sequence_hashes(
    token_ids: Sequence[int],
    block_size: int = DEFAULT_BLOCK_SIZE,
    lora_name: str | None = None,
    parent: int | None = None,
) -> list[int]:
    """The router's block keys for a prompt: chained hashes of its full blocks."""
    return chain_hashes(local_block_hashes(token_ids, block_size, lora_name), parent)
