"""The oracle (pooled LRU and infinite cache replays), hand-computed on small sequences."""

from __future__ import annotations

import pytest

from kvgate.loadtest.oracle import LruBlockCache, OracleRequest, engine_cached_tokens, oracle_summary, replay

BS = 4  # tokens per block in these examples


def req(hashes: list[int], tokens: int) -> OracleRequest:
    return OracleRequest(hashes, tokens)


def test_the_engine_recomputes_the_last_token():
    # 12 tokens = exactly 3 blocks, all cached: the last block holds the last token, so 2 count.
    assert engine_cached_tokens(12, 3, BS) == 8
    # 14 tokens: 3 full blocks and a partial one; 3 cached blocks all count.
    assert engine_cached_tokens(14, 3, BS) == 12
    assert engine_cached_tokens(14, 1, BS) == 4
    assert engine_cached_tokens(0, 0, BS) == 0


def test_infinite_cache_reuses_the_longest_cached_prefix_only():
    a = req([1, 2, 3], 12)
    seq = [a, a, req([1, 2, 9], 14), req([5, 2, 3], 13)]
    result = replay(seq, BS, None)
    # a: nothing; a again: whole prompt, a block less (8); [1,2,9]: prefix [1,2] (8);
    # [5,2,3]: block 5 is new, so blocks 2 and 3 (cached, but behind a miss) do not count.
    assert result.per_request == (0, 8, 8, 0)
    assert result.prompt_tokens == 12 + 12 + 14 + 13
    assert result.cached_tokens == 16
    assert result.cached_fraction == pytest.approx(16 / 51)


def test_pooled_lru_evicts_least_recently_used_tails_first():
    a, b = req([1, 2], 9), req([3, 4], 9)
    seq = [a, b, a, b]
    pooled = replay(seq, BS, 3)
    # After a: LRU->MRU [2, 1] (the head is the most recent); after b: [2, 1, 4, 3] -> evict 2.
    # a again: 1 cached, 2 gone: one block (4 tokens); its touch makes [4, 3, 2, 1] -> evict 4.
    # b again: 3 cached, 4 gone: 4 tokens.
    assert pooled.per_request == (0, 0, 4, 4)
    assert pooled.cached_tokens == 8
    infinite = replay(seq, BS, None)
    assert infinite.per_request == (0, 0, 8, 8)


def test_lru_cache_order_and_capacity():
    cache = LruBlockCache(3)
    cache.touch([1, 2])
    assert cache.lru_order() == [2, 1]
    cache.touch([3, 4])
    assert cache.lru_order() == [1, 4, 3] and len(cache) == 3
    assert cache.cached_prefix([1, 4, 7]) == 2 and cache.cached_prefix([2, 1]) == 0
    cache.touch([1])  # a hit refreshes
    assert cache.lru_order() == [4, 3, 1]
    assert LruBlockCache(0).cached_prefix([1]) == 0
    with pytest.raises(ValueError):
        LruBlockCache(-1)


def test_a_request_longer_than_the_cache_keeps_its_head():
    pooled = replay([req([1, 2, 3], 13), req([1, 2, 3], 13)], BS, 2)
    # Touched tail first, the head stays: [2, 1] survive, so the repeat finds 2 blocks.
    assert pooled.per_request == (0, 8)


def test_summary_relates_the_measured_fraction_to_both_oracles():
    seq = [req([1, 2], 9), req([3, 4], 9), req([1, 2], 9), req([3, 4], 9)]
    s = oracle_summary(seq, BS, 3, 0.2)
    assert s["pooled_lru_fraction"] == pytest.approx(8 / 36)
    assert s["infinite_fraction"] == pytest.approx(16 / 36)
    assert s["measured_of_pooled"] == pytest.approx(0.2 / (8 / 36))
    assert s["measured_of_infinite"] == pytest.approx(0.2 / (16 / 36))
    assert oracle_summary(seq[:2], BS, 3, 0.0)["measured_of_pooled"] is None  # the oracle cached nothing
    assert oracle_summary(seq, BS, 3, None)["measured_of_pooled"] is None
