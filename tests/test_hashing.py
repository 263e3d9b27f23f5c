"""kvgate.protocol.hashing: the block key scheme, against the vectors Dynamo 1.6.1 computes."""

from __future__ import annotations

import struct

import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from kvgate.protocol.hashing import (
    BASE_SEED,
    chain_hashes,
    local_block_hashes,
    lora_seed,
    pack_tokens,
    sequence_hashes,
)

# ARCHITECTURE.md's test vectors (tokens 0..201, block size 64), checked against Dynamo 1.6.1's
# compute_block_hash_for_seq.
TOKENS = list(range(202))
LOCAL = [3480597578098033343, 3318286205056455972, 1390211181667144747]
SEQUENCE = [3480597578098033343, 2575318956255022795, 15087857196529367026]
LOCAL_ADAPTER_A = [789237278557224185, 6184596453852557784, 878018396628157694]


def test_local_and_sequence_hashes_match_dynamo() -> None:
    assert local_block_hashes(TOKENS, 64) == LOCAL
    assert sequence_hashes(TOKENS, 64) == SEQUENCE


def test_a_lora_adapter_changes_the_local_seed_only() -> None:
    assert local_block_hashes(TOKENS, 64, "adapter-a") == LOCAL_ADAPTER_A
    assert lora_seed("adapter-a") == (BASE_SEED + xxhash.xxh3_64_intdigest(b"adapter-a")) % 2**64
    assert lora_seed(None) == lora_seed("") == BASE_SEED
    # The chain keeps seed 1337 whatever the adapter.
    assert sequence_hashes(TOKENS, 64, "adapter-a") == chain_hashes(LOCAL_ADAPTER_A)


def test_a_partial_last_block_is_not_hashed() -> None:
    assert local_block_hashes(list(range(63)), 64) == []
    assert len(sequence_hashes(list(range(128)), 64)) == len(sequence_hashes(list(range(191)), 64)) == 2


def test_chaining_continues_from_a_parent() -> None:
    assert chain_hashes(LOCAL[1:], parent=SEQUENCE[0]) == SEQUENCE[1:]
    assert sequence_hashes(TOKENS[64:], 64, parent=SEQUENCE[0])[:1] == [
        xxhash.xxh3_64_intdigest(struct.pack("<QQ", SEQUENCE[0], LOCAL[1]), seed=BASE_SEED)
    ]


def test_block_size_must_be_positive() -> None:
    with pytest.raises(ValueError):
        local_block_hashes(TOKENS, 0)


@given(st.lists(st.integers(0, 2**32 - 1), max_size=300), st.integers(1, 80))
def test_local_hashes_are_xxh3_of_u32_little_endian_blocks(tokens: list[int], block_size: int) -> None:
    assert pack_tokens(tokens) == struct.pack(f"<{len(tokens)}I", *tokens)
    expected = [
        xxhash.xxh3_64_intdigest(struct.pack(f"<{block_size}I", *tokens[i : i + block_size]), seed=BASE_SEED)
        for i in range(0, len(tokens) - block_size + 1, block_size)
    ]
    assert local_block_hashes(tokens, block_size) == expected
