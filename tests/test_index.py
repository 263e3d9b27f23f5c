"""PrefixIndex: router-native stores, removals, tiers, clears, departures, matching."""

from __future__ import annotations

import pytest

from kvgate.indexer.index import Match, PrefixIndex
from kvgate.protocol.events import RouterCleared, RouterRemoved, RouterStored, Tier, WorkerKey

A = WorkerKey("a")
A1 = WorkerKey("a", 1)
B = WorkerKey("b")
C = WorkerKey("c")
PROMPT = list(range(100, 110))


def test_empty_index_matches_nothing() -> None:
    index = PrefixIndex()
    assert index.find_matches(PROMPT) == {}
    assert index.block_counts() == {}
    assert len(index) == 0 and index.keys() == []


def test_depth_is_the_contiguous_prefix() -> None:
    index = PrefixIndex()
    index.apply(A, RouterStored(PROMPT[:3] + PROMPT[4:8]))  # hole at block 3
    index.apply(B, RouterStored(PROMPT[1:]))  # lacks block 0: no prefix at all
    assert index.find_matches(PROMPT) == {A: Match(3, [3, 0, 0])}
    assert index.find_matches([]) == {}
    assert index.find_matches([999] + PROMPT) == {}


def test_workers_diverge_and_each_gets_its_own_depth() -> None:
    index = PrefixIndex()
    index.apply(A, RouterStored(PROMPT[:2]))
    index.apply(B, RouterStored(PROMPT[:5]))
    index.apply(C, RouterStored(PROMPT))
    index.apply(A1, RouterStored(PROMPT[:1]))
    assert index.find_matches(PROMPT) == {
        A: Match(2, [2, 0, 0]),
        A1: Match(1, [1, 0, 0]),
        B: Match(5, [5, 0, 0]),
        C: Match(10, [10, 0, 0]),
    }
    assert index.find_matches(PROMPT[:4]) == {
        A: Match(2, [2, 0, 0]),
        A1: Match(1, [1, 0, 0]),
        B: Match(4, [4, 0, 0]),
        C: Match(4, [4, 0, 0]),
    }


def test_each_block_counts_under_its_best_tier() -> None:
    index = PrefixIndex()
    index.apply(A, RouterStored(PROMPT[:4], Tier.DISK))
    index.apply(A, RouterStored(PROMPT[1:3], Tier.CPU))
    index.apply(A, RouterStored(PROMPT[2:3], Tier.GPU))
    index.apply(A, RouterStored(PROMPT[4:6], Tier.CPU))
    m = index.find_matches(PROMPT)[A]
    # blocks: DISK, CPU+DISK, GPU+CPU+DISK, DISK, CPU, CPU
    assert m == Match(6, [1, 3, 2])
    assert (m.gpu, m.cpu, m.disk) == (1, 3, 2)
    assert index.block_counts() == {A: (1, 4, 4)}


@pytest.mark.parametrize("tiers", [{Tier(t) for t in Tier if mask >> t & 1} for mask in range(1, 8)])
def test_every_tier_combination_counts_under_its_best_tier(tiers: set[Tier]) -> None:
    index = PrefixIndex()
    for key in (A, B):
        for tier in tiers:
            index.apply(key, RouterStored(PROMPT[:1], tier))
    per_tier = [0, 0, 0]
    per_tier[min(tiers)] = 1
    assert index.find_matches(PROMPT) == {A: Match(1, per_tier), B: Match(1, per_tier)}


def test_removing_one_tier_keeps_the_others() -> None:
    index = PrefixIndex()
    index.apply(A, RouterStored(PROMPT[:3]))
    index.apply(A, RouterStored(PROMPT[:3], Tier.CPU))
    assert index.apply(A, RouterRemoved(PROMPT[:3])) == 3
    assert index.find_matches(PROMPT) == {A: Match(3, [0, 3, 0])}
    assert index.block_counts() == {A: (0, 3, 0)}
    assert index.apply(A, RouterRemoved(PROMPT[:3], Tier.CPU)) == 3
    assert index.find_matches(PROMPT) == {}
    assert len(index) == 0


def test_store_and_remove_are_idempotent_and_ignore_strangers() -> None:
    index = PrefixIndex()
    assert index.apply(A, RouterStored(PROMPT[:3] + PROMPT[:3])) == 3
    assert index.apply(A, RouterStored(PROMPT[:3])) == 0
    assert index.apply(A, RouterRemoved([1, 2, PROMPT[0]])) == 1
    assert index.apply(A, RouterRemoved([PROMPT[0]])) == 0
    assert index.apply(B, RouterRemoved(PROMPT)) == 0  # never stored anything
    assert index.apply(B, RouterCleared()) == 0
    assert index.block_counts() == {A: (2, 0, 0)}
    assert B not in index.keys()


def test_clear_drops_one_rank_only() -> None:
    index = PrefixIndex()
    for key in (A, A1, B):
        index.apply(key, RouterStored(PROMPT[:4]))
        index.apply(key, RouterStored(PROMPT[:2], Tier.CPU))
    assert index.apply(A, RouterCleared()) == 6
    assert index.find_matches(PROMPT) == {A1: Match(4, [4, 0, 0]), B: Match(4, [4, 0, 0])}
    assert index.block_counts() == {A: (0, 0, 0), A1: (4, 2, 0), B: (4, 2, 0)}
    index.apply(A, RouterStored(PROMPT[:1], Tier.DISK))
    assert index.find_matches(PROMPT)[A] == Match(1, [0, 0, 1])


def test_remove_worker_drops_all_ranks_and_reuses_slots() -> None:
    index = PrefixIndex()
    index.apply(A, RouterStored(PROMPT[:2]))
    index.apply(A1, RouterStored(PROMPT[:3], Tier.CPU))
    index.apply(B, RouterStored(PROMPT[:5]))
    assert index.remove_worker("a") == 5
    assert index.keys() == [B]
    assert index.find_matches(PROMPT) == {B: Match(5, [5, 0, 0])}
    assert len(index) == 5
    # The freed slots go to newcomers, which must start empty.
    index.apply(C, RouterStored(PROMPT[:1]))
    index.apply(A, RouterStored(PROMPT[5:]))
    assert index.find_matches(PROMPT) == {B: Match(5, [5, 0, 0]), C: Match(1, [1, 0, 0])}
    assert index.block_counts() == {B: (5, 0, 0), C: (1, 0, 0), A: (5, 0, 0)}
    assert index.remove_worker("nobody") == 0


def test_many_workers_beyond_64_bits() -> None:
    index = PrefixIndex()
    keys = [WorkerKey(f"w{i}", i % 3) for i in range(40)]
    for i, key in enumerate(keys):
        index.apply(key, RouterStored(PROMPT[: i % 10 + 1], Tier(i % 3)))
    matches = index.find_matches(PROMPT)
    assert len(matches) == 40
    for i, key in enumerate(keys):
        per_tier = [0, 0, 0]
        per_tier[i % 3] = i % 10 + 1
        assert matches[key] == Match(i % 10 + 1, per_tier)
    index.remove_worker("w39")
    assert keys[39] not in index.find_matches(PROMPT)


def test_tier_changes_along_the_prompt_for_many_holders() -> None:
    """Every block a different tier mix (the run-length walk's worst case)."""
    index = PrefixIndex()
    keys = [WorkerKey(f"w{i}") for i in range(16)]
    expected = {}
    for n, key in enumerate(keys):
        per_tier = [0, 0, 0]
        for i, h in enumerate(PROMPT):
            tier = Tier((i + n) % 3)
            index.apply(key, RouterStored([h], tier))
            per_tier[tier] += 1
        expected[key] = Match(len(PROMPT), per_tier)
    assert index.find_matches(PROMPT) == expected


def test_apply_rejects_engine_events_and_bad_tiers_without_damage() -> None:
    from kvgate.protocol.events import AllBlocksCleared

    index = PrefixIndex()
    index.apply(A, RouterStored(PROMPT[:2]))
    with pytest.raises(TypeError):
        index.apply(A, AllBlocksCleared())  # type: ignore[arg-type]
    for tier in (3, -1, "GPU", 1.0):
        with pytest.raises(ValueError):
            index.apply(B, RouterStored(PROMPT[:2], tier))  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            index.apply(A, RouterRemoved(PROMPT[:2], tier))  # type: ignore[arg-type]
    index.apply(A, RouterStored(PROMPT[2:3], 2))  # type: ignore[arg-type]  # a plain int tier is fine
    assert index.find_matches(PROMPT) == {A: Match(3, [2, 0, 1])}
