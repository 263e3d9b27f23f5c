"""BlockTranslator: engine events -> router events, per tier, with the deliberate choices."""

from __future__ import annotations

import pytest

from kvgate.indexer.translation import BlockTranslator, TranslationStats
from kvgate.protocol.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    RouterCleared,
    RouterRemoved,
    RouterStored,
    Tier,
)
from kvgate.protocol.hashing import sequence_hashes

BS = 4
TOKENS = list(range(1000, 1000 + 5 * BS))
SEQ = sequence_hashes(TOKENS, BS)  # router keys of the 5 blocks
E = [0xE0 + i for i in range(5)]  # the engine's opaque hashes for them


def stored(
    i: int, j: int, parent: int | None = None, tier: Tier = Tier.GPU, tokens: bool = True, **kw: object
) -> BlockStored:
    """Engine store of blocks i..j-1 (with their tokens unless ``tokens`` is False)."""
    return BlockStored(E[i:j], parent, TOKENS[i * BS : j * BS] if tokens else [], BS, medium=tier, **kw)  # type: ignore[arg-type]


def removed(i: int, j: int, tier: Tier = Tier.GPU) -> BlockRemoved:
    return BlockRemoved(E[i:j], tier)


def test_store_recomputes_router_hashes_and_chains_from_the_parent() -> None:
    t = BlockTranslator(BS)
    assert t.translate([stored(0, 2)]) == [RouterStored(SEQ[0:2])]
    # The child's keys chain from the parent's ROUTER hash, as a prompt's would.
    assert t.translate([stored(2, 5, parent=E[1])]) == [RouterStored(SEQ[2:5])]
    assert [t.router_hash(e) for e in E] == SEQ
    assert len(t) == 5


def test_lora_name_changes_the_keys_and_lora_id_alone_is_rejected() -> None:
    t = BlockTranslator(BS)
    out = t.translate([stored(0, 2, lora_id=3, lora_name="adapter-a")])
    assert out == [RouterStored(sequence_hashes(TOKENS[: 2 * BS], BS, "adapter-a"))]
    assert out[0].hashes != SEQ[:2]  # type: ignore[union-attr]
    t2 = BlockTranslator(BS)
    assert t2.translate([stored(0, 2, lora_id=3)]) == []
    assert t2.stats.rejected["lora_without_name"] == 1


def test_bytes_engine_hashes_work_like_ints() -> None:
    t = BlockTranslator(BS)
    hashes = [bytes([i]) * 32 for i in range(2)]
    assert t.translate([BlockStored(hashes, None, TOKENS[: 2 * BS], BS)]) == [RouterStored(SEQ[:2])]
    assert t.translate([BlockRemoved(hashes[1:])]) == [RouterRemoved(SEQ[1:2])]


def test_removal_resolves_through_its_own_tier_and_keeps_the_others() -> None:
    t = BlockTranslator(BS)
    t.translate([stored(0, 3), stored(0, 3, tier=Tier.CPU)])
    assert t.translate([removed(0, 2)]) == [RouterRemoved(SEQ[:2])]
    assert t.tiers_of(E[0]) == {Tier.CPU}
    assert t.tiers_of(E[2]) == {Tier.GPU, Tier.CPU}
    # Removing again from GPU names blocks the GPU no longer holds.
    assert t.translate([removed(0, 2)]) == []
    assert t.stats.unknown_block == 2
    assert t.translate([removed(0, 3, Tier.CPU), removed(2, 3)]) == [
        RouterRemoved(SEQ[:3], Tier.CPU),
        RouterRemoved(SEQ[2:3]),
    ]
    # A block that left its last tier leaves every map (only the bounded memory of
    # recently forgotten blocks still knows its router hash).
    assert len(t) == 0 and t.tiers_of(E[0]) == set()


@pytest.mark.parametrize("tokens", [False, True])
def test_tier_store_after_the_gpu_removal_in_the_same_batch(tokens: bool) -> None:
    """vLLM appends the connector's events after the KV manager's: the GPU eviction comes first."""
    t = BlockTranslator(BS)
    t.translate([stored(0, 3)])
    batch = [removed(0, 3)] + (
        [
            stored(2, 3, parent=E[1], tier=Tier.CPU),
            stored(1, 2, parent=E[0], tier=Tier.CPU),
            stored(0, 1, tier=Tier.CPU),
        ]
        if tokens
        else [stored(0, 3, tier=Tier.CPU, tokens=False)]
    )
    out = t.translate(batch)
    assert out[0] == RouterRemoved(SEQ[:3])
    assert sorted(h for ev in out[1:] for h in ev.hashes) == sorted(SEQ[:3])  # type: ignore[union-attr]
    assert all(ev == RouterStored(ev.hashes, Tier.CPU) for ev in out[1:])  # type: ignore[union-attr]
    assert [t.tiers_of(e) for e in E[:3]] == [{Tier.CPU}] * 3
    assert t.pending == 0 and t.stats == TranslationStats()


def test_forgotten_blocks_are_remembered_only_boundedly() -> None:
    t = BlockTranslator(BS, max_forgotten=4)
    t.translate([stored(0, 5)] + [removed(i, i + 1) for i in range(5)])
    # Generations of 2: {0, 1} was dropped when {2, 3} filled up; 4 starts a new one.
    assert t.translate([stored(0, 1, tier=Tier.CPU, tokens=False)]) == []
    assert t.pending == 1
    assert t.translate([stored(2, 5, tier=Tier.CPU, tokens=False)]) == [RouterStored(SEQ[2:5], Tier.CPU)]


def test_tier_event_after_the_gpu_store_moves_known_blocks() -> None:
    t = BlockTranslator(BS)
    t.translate([stored(0, 3)])
    out = t.translate([stored(0, 3, tier=Tier.CPU, tokens=False), removed(0, 3)])
    assert out == [RouterStored(SEQ[:3], Tier.CPU), RouterRemoved(SEQ[:3])]
    out = t.translate([stored(1, 3, tier=Tier.DISK, tokens=False), removed(1, 3, Tier.CPU)])
    assert out == [RouterStored(SEQ[1:3], Tier.DISK), RouterRemoved(SEQ[1:3], Tier.CPU)]
    assert [t.tiers_of(e) for e in E[:3]] == [{Tier.CPU}, {Tier.DISK}, {Tier.DISK}]
    # A child stored on GPU resolves its parent found only on DISK.
    assert t.translate([stored(3, 4, parent=E[2])]) == [RouterStored(SEQ[3:4])]
    assert t.pending == 0 and t.stats.unknown_block == 0


def test_tier_event_before_the_gpu_store_waits_then_applies() -> None:
    t = BlockTranslator(BS)
    assert t.translate([stored(0, 2, tier=Tier.CPU, tokens=False)]) == []
    assert t.translate([stored(1, 2, tier=Tier.DISK, tokens=False)]) == []
    assert t.pending == 2
    out = t.translate([stored(0, 3)])
    assert out == [RouterStored(SEQ[:3]), RouterStored(SEQ[:2], Tier.CPU), RouterStored(SEQ[1:2], Tier.DISK)]
    assert t.pending == 0
    assert t.tiers_of(E[1]) == {Tier.GPU, Tier.CPU, Tier.DISK}


def test_tier_event_without_any_gpu_store() -> None:
    t = BlockTranslator(BS)
    # Token-less: nothing can be keyed; its removal cancels the wait without a miss.
    assert t.translate([stored(0, 2, tier=Tier.CPU, tokens=False)]) == []
    assert t.translate([removed(0, 1, Tier.CPU)]) == []
    assert t.pending == 1 and t.stats.unknown_block == 0
    assert t.translate([stored(0, 2)]) == [RouterStored(SEQ[:2]), RouterStored(SEQ[1:2], Tier.CPU)]
    # Self-describing tier stores carry tokens and parents: keyed directly.
    t2 = BlockTranslator(BS)
    assert t2.translate([stored(0, 2, tier=Tier.CPU)]) == [RouterStored(SEQ[:2], Tier.CPU)]
    assert t2.translate([stored(2, 3, parent=E[1], tier=Tier.DISK)]) == [RouterStored(SEQ[2:3], Tier.DISK)]
    assert t2.translate([removed(0, 2, Tier.CPU)]) == [RouterRemoved(SEQ[:2], Tier.CPU)]


def test_pending_map_is_bounded() -> None:
    t = BlockTranslator(BS, max_pending=2)
    t.translate([BlockStored([1, 2, 3], None, [], BS, medium=Tier.CPU)])
    assert t.pending == 2 and t.stats.unknown_block == 1
    # The oldest (1) was given up; 2 and 3 still wait.
    t.translate([BlockStored([1, 2, 3], None, TOKENS[: 3 * BS], BS)])
    assert t.tiers_of(1) == {Tier.GPU}
    assert t.tiers_of(2) == {Tier.GPU, Tier.CPU}
    assert t.tiers_of(3) == {Tier.GPU, Tier.CPU}


def test_unknown_parent_holds_the_store_until_the_parent_is_known() -> None:
    t = BlockTranslator(BS)
    assert t.translate([stored(2, 4, parent=E[1])]) == []
    assert t.translate([stored(4, 5, parent=E[3])]) == []  # its parent is itself held
    assert t.pending == 3
    # A removal of a held block is not a miss: it applies when the store does.
    assert t.translate([removed(3, 4)]) == []
    assert t.stats.unknown_block == 0
    out = t.translate([stored(0, 2)])
    assert out == [RouterStored(SEQ[:2]), RouterStored(SEQ[2:4]), RouterRemoved(SEQ[3:4]), RouterStored(SEQ[4:5])]
    assert [t.tiers_of(e) for e in E] == [{Tier.GPU}] * 3 + [set(), {Tier.GPU}]
    assert t.pending == 0 and t.stats == TranslationStats()


def test_tail_first_self_describing_offload_applies_when_its_root_arrives() -> None:
    t = BlockTranslator(BS)
    tail_first = [stored(i, i + 1, parent=E[i - 1] if i else None, tier=Tier.CPU) for i in reversed(range(5))]
    out = t.translate(tail_first)
    assert sorted(h for ev in out for h in ev.hashes) == sorted(SEQ)  # type: ignore[union-attr]
    assert {ev.tier for ev in out} == {Tier.CPU}  # type: ignore[union-attr]
    assert t.pending == 0


def test_held_stores_are_bounded_and_given_up_oldest_first() -> None:
    t = BlockTranslator(BS, max_pending=2)
    t.translate([stored(1, 3, parent=E[0]), stored(4, 5, parent=E[3])])
    assert t.pending == 1 and t.stats.unknown_parent == 2  # 1-2 given up; 4 still waits
    assert t.translate([stored(0, 1)]) == [RouterStored(SEQ[:1])]  # nothing waits for 0 any more
    assert t.translate([stored(1, 4, parent=E[0])]) == [RouterStored(SEQ[1:4]), RouterStored(SEQ[4:5])]
    assert t.pending == 0 and t.stats.unknown_parent == 2


@pytest.mark.parametrize(
    ("event", "kind"),
    [
        (BlockStored(E[:2], None, TOKENS[: 4 * 8], 8), "bad_block_size"),
        (BlockStored(E[:2], None, [], 8, medium=Tier.CPU), "bad_block_size"),
        (BlockStored(E[:2], None, TOKENS[: BS + 1], BS), "token_count_mismatch"),
    ],
)
def test_bad_events_are_rejected_whole_and_counted(event: BlockStored, kind: str) -> None:
    stats = TranslationStats()
    t = BlockTranslator(BS, stats=stats)
    assert t.translate([event, stored(0, 1)]) == [RouterStored(SEQ[:1])]
    assert stats.rejected == {kind: 1}
    assert t.router_hash(E[1]) is None


def test_all_blocks_cleared_forgets_every_tier_and_pending() -> None:
    t = BlockTranslator(BS)
    t.translate(
        [stored(0, 3), stored(0, 2, tier=Tier.CPU, tokens=False), BlockStored([77], None, [], BS, medium=Tier.DISK)]
    )
    t.translate([removed(2, 3), stored(4, 5, parent=E[3])])  # remembered, and held
    assert t.translate([AllBlocksCleared()]) == [RouterCleared()]
    assert len(t) == 0 and t.pending == 0
    assert t.router_hash(E[2]) is None
    assert t.translate([stored(2, 3, parent=E[1]), stored(3, 4, parent=E[2])]) == []
    assert t.pending == 2


def test_empty_and_zero_block_events_do_nothing() -> None:
    t = BlockTranslator(BS)
    assert t.translate([]) == []
    assert t.translate([BlockStored([], None, [], BS), BlockRemoved([])]) == []
    assert t.stats == TranslationStats()


def test_block_size_must_be_positive() -> None:
    with pytest.raises(ValueError):
        BlockTranslator(0)


# --- cache_salt: vLLM's extra keys ------------------------------------------------------

SALTED = sequence_hashes(TOKENS, BS, cache_salt="tenant-A")


def salted(i: int, j: int, parent: int | None = None, salt: str = "tenant-A", **kw: object) -> BlockStored:
    """A store as vLLM publishes a salted prompt's: ``[salt]`` for block 0, None for the rest."""
    keys: list[tuple[object, ...] | None] = [None] * (j - i)
    if i == 0:
        keys[0] = (salt,)
    return stored(i, j, parent, extra_keys=keys, **kw)


def test_a_salted_store_is_keyed_under_the_salted_prompt_hashes() -> None:
    t = BlockTranslator(BS)
    assert t.translate([salted(0, 2)]) == [RouterStored(SALTED[:2])]
    assert not set(SALTED) & set(SEQ)
    other = BlockTranslator(BS)
    assert other.translate([salted(0, 2, salt="tenant-B")]) == [
        RouterStored(sequence_hashes(TOKENS[: 2 * BS], BS, cache_salt="tenant-B"))
    ]
    # vLLM's unsalted stores name every block's keys as None: the plain keys.
    plain = BlockTranslator(BS)
    assert plain.translate([stored(0, 2, extra_keys=[None, None])]) == [RouterStored(SEQ[:2])]


def test_a_continuation_inherits_the_salt_through_its_parent() -> None:
    t = BlockTranslator(BS)
    t.translate([salted(0, 2)])
    assert t.translate([salted(2, 5, parent=E[1])]) == [RouterStored(SALTED[2:5])]
    # Held for its parent first, then released under the salted chain.
    held = BlockTranslator(BS)
    assert held.translate([salted(2, 5, parent=E[1])]) == []
    assert held.translate([salted(0, 2)]) == [RouterStored(SALTED[:2]), RouterStored(SALTED[2:5])]


def test_lora_and_salt_combine_in_the_extra_keys() -> None:
    t = BlockTranslator(BS)
    keys: list[tuple[object, ...] | None] = [("ad", "tenant-A"), ("ad",)]
    assert t.translate([stored(0, 2, lora_id=1, lora_name="ad", extra_keys=keys)]) == [
        RouterStored(sequence_hashes(TOKENS[: 2 * BS], BS, "ad", cache_salt="tenant-A"))
    ]
    unsalted = BlockTranslator(BS)
    assert unsalted.translate([stored(0, 2, lora_id=1, lora_name="ad", extra_keys=[("ad",), ("ad",)])]) == [
        RouterStored(sequence_hashes(TOKENS[: 2 * BS], BS, "ad"))
    ]


@pytest.mark.parametrize(
    "keys,kw,kind",
    [
        ([("tenant-A",)], {}, "bad_extra_keys"),  # one entry for two blocks
        ([None, ("tenant-A",)], {}, "bad_extra_keys"),  # a salt past the first block
        ([("tenant-A",), None], {"parent": 7}, "bad_extra_keys"),  # a salt on a continuation
        ([("",), None], {}, "bad_extra_keys"),
        ([(5,), None], {}, "bad_extra_keys"),
        ([("tenant-A", "again"), None], {}, "bad_extra_keys"),
        ([("other", "s"), ("other",)], {"lora_id": 1, "lora_name": "ad"}, "bad_extra_keys"),
        ([("s",), None], {"lora_id": 1, "lora_name": "ad"}, "bad_extra_keys"),
        ([(["mm-hash", 0],), None], {}, "unsupported_extra_keys"),  # multimodal
        ([(b"\x01" * 32,), None], {}, "unsupported_extra_keys"),  # prompt embeddings
        ([("tenant-A", ["mm-hash", 3]), None], {}, "unsupported_extra_keys"),
    ],
)
def test_extra_keys_off_vllms_layout_reject_the_store(
    keys: list[tuple[object, ...] | None], kw: dict[str, object], kind: str
) -> None:
    t = BlockTranslator(BS)
    parent = kw.pop("parent", None)
    if parent is not None:
        t.translate([stored(0, 1)])
        parent = E[0]
        ev = stored(1, 3, parent, extra_keys=keys, **kw)
    else:
        ev = stored(0, 2, extra_keys=keys, **kw)
    assert t.translate([ev]) == []
    assert t.stats.rejected == {kind: 1}
    assert t.pending == 0


def test_a_self_described_offload_of_a_salted_first_block_keeps_its_salt() -> None:
    # LMCache and the OffloadingConnector's self-describing stores publish no extra keys.
    t = BlockTranslator(BS)
    t.translate([salted(0, 2)])
    assert t.translate([stored(0, 2, tier=Tier.CPU)]) == [RouterStored(SALTED[:2], Tier.CPU)]
    # Also once the GPU copy is gone (the connector's events follow the KV manager's).
    t.translate([removed(0, 2)])
    assert t.translate([stored(0, 2, tier=Tier.DISK)]) == [RouterStored(SALTED[:2], Tier.DISK)]
    # An unknown first block has nothing better than its tokens.
    fresh = BlockTranslator(BS)
    assert fresh.translate([stored(0, 2, tier=Tier.CPU)]) == [RouterStored(SEQ[:2], Tier.CPU)]
