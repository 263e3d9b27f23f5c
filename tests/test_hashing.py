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
    salt_root,
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


# kvgate's cache_salt extension, pinned: changing it silently would split a fleet whose
# replicas run different versions.
SALT_ROOT_A = 14374831365005752168
SEQUENCE_SALT_A = [6152609590236497240, 10246241433458757672, 5747917387433740832]
SEQUENCE_ADAPTER_A_SALT_A = [1823925706183434528, 15817777092515741790, 9510859916761914331]


def test_a_salt_chains_the_first_block_onto_its_root() -> None:
    assert salt_root("tenant-A") == SALT_ROOT_A
    assert SALT_ROOT_A == xxhash.xxh3_64_intdigest(b"kvgate.cache_salt\0tenant-A", seed=BASE_SEED)
    assert sequence_hashes(TOKENS, 64, cache_salt="tenant-A") == SEQUENCE_SALT_A
    assert SEQUENCE_SALT_A == chain_hashes(LOCAL, parent=SALT_ROOT_A)
    assert SEQUENCE_SALT_A[0] == xxhash.xxh3_64_intdigest(struct.pack("<QQ", SALT_ROOT_A, LOCAL[0]), seed=BASE_SEED)


def test_a_salt_changes_every_hash_and_no_salt_changes_none() -> None:
    salted_a = sequence_hashes(TOKENS, 64, cache_salt="tenant-A")
    salted_b = sequence_hashes(TOKENS, 64, cache_salt="tenant-B")
    assert not set(salted_a) & set(SEQUENCE)
    assert not set(salted_a) & set(salted_b)
    # As in vLLM an empty salt is no salt; the Dynamo vectors are untouched.
    assert sequence_hashes(TOKENS, 64, cache_salt=None) == sequence_hashes(TOKENS, 64, cache_salt="") == SEQUENCE
    assert local_block_hashes(TOKENS, 64) == LOCAL


def test_lora_and_salt_combine() -> None:
    both = sequence_hashes(TOKENS, 64, "adapter-a", cache_salt="tenant-A")
    assert both == SEQUENCE_ADAPTER_A_SALT_A == chain_hashes(LOCAL_ADAPTER_A, parent=SALT_ROOT_A)
    alone = [SEQUENCE, SEQUENCE_SALT_A, sequence_hashes(TOKENS, 64, "adapter-a")]
    assert all(not set(both) & set(other) for other in alone)


def test_a_salted_continuation_inherits_the_salt_from_its_parent() -> None:
    salted = sequence_hashes(TOKENS, 64, cache_salt="tenant-A")
    assert sequence_hashes(TOKENS[64:], 64, parent=salted[0]) == salted[1:]
    with pytest.raises(ValueError, match="first block"):
        sequence_hashes(TOKENS[64:], 64, parent=salted[0], cache_salt="tenant-A")


@given(
    st.lists(st.integers(0, 2**32 - 1), min_size=4, max_size=40),
    st.text(min_size=1, max_size=20),
    st.text(min_size=1, max_size=20),
)
def test_salted_chains_share_no_key_with_other_salts_or_none(tokens: list[int], salt: str, other: str) -> None:
    salted = sequence_hashes(tokens, 4, cache_salt=salt)
    assert len(salted) == len(tokens) // 4
    assert not set(salted) & set(sequence_hashes(tokens, 4))
    if other != salt:
        assert not set(salted) & set(sequence_hashes(tokens, 4, cache_salt=other))


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
