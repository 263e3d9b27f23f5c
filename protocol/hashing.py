"""Block hashing: the index's key scheme (Dynamo-compatible).

Token ids of one full block are packed as unsigned 32-bit little-endian integers and
hashed with xxh3-64 (seed 1337): the *local* hash. *Sequence* hashes chain them,
``seq[0] = local[0]`` and ``seq[i] = xxh3_64(u64le(seq[i-1]) || u64le(local[i]), 1337)``,
so a block's hash names its whole prefix. A partial last block is never hashed.

A LoRA adapter changes the local seed to ``(1337 + xxh3_64(utf8(name))) mod 2**64`` so
requests for different adapters never share blocks; the chain keeps seed 1337.

A ``cache_salt`` (kvgate's extension; Dynamo has none) chains the first block onto a
virtual root, ``root = xxh3_64(b"kvgate.cache_salt\\0" || utf8(salt), 1337)``, so
``seq[0] = xxh3_64(u64le(root) || u64le(local[0]), 1337)`` and every later hash differs
from the unsalted prompt's, as vLLM's salt (an extra key of block 0 only) changes its
whole chain. Local hashes (and so LoRA seeds) are untouched; an empty salt is no salt,
as in vLLM. Unsalted hashes are exactly Dynamo's.
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
_SALT_TAG = b"kvgate.cache_salt\0"
_BIG_ENDIAN_HOST = sys.byteorder == "big"


@lru_cache(maxsize=1024)
def lora_seed(lora_name: str | None) -> int:
    """Seed for the local hashes of requests that use ``lora_name`` (base seed when None)."""
    if not lora_name:
        return BASE_SEED
    return (BASE_SEED + _xxh3(lora_name.encode("utf-8"))) & _MASK64


@lru_cache(maxsize=1024)
def salt_root(cache_salt: str) -> int:
    """The virtual parent a prompt salted with ``cache_salt`` chains its first block onto."""
    return _xxh3(_SALT_TAG + cache_salt.encode("utf-8"), BASE_SEED)


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
    cache_salt: str | None = None,
) -> list[int]:
    """The router's block keys for a prompt: chained hashes of its full blocks.

    ``parent`` continues a known prefix; ``cache_salt`` starts a salted one (the salt
    keys the first block only: a continuation inherits it through its parent).
    """
    if cache_salt:
        if parent is not None:
            raise ValueError("cache_salt keys a prompt's first block; a continuation inherits it from its parent")
        parent = salt_root(cache_salt)
    return chain_hashes(local_block_hashes(token_ids, block_size, lora_name), parent)
