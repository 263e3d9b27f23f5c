"""ShardedDict: the same answers as one dict, with no shard holding much more than its share."""

from __future__ import annotations

import gc
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvgate.indexer.shards import ShardedDict

# Keys that collide in their low bits (small ints, multiples of 256, negatives) as well as spread ones.
KEYS = st.one_of(
    st.integers(min_value=-5, max_value=5),
    st.integers(min_value=0, max_value=20).map(lambda k: k * 256),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
)
VALUES = st.sampled_from(["a", "b", "c"])
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("set"), KEYS, VALUES),
        st.tuples(st.just("del"), KEYS),
        st.tuples(st.just("put_all"), st.lists(KEYS, max_size=8), VALUES),
        st.tuples(st.just("discard_all"), st.lists(KEYS, max_size=8), VALUES),
        st.tuples(st.just("clear")),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(OPS, st.lists(KEYS, max_size=10), st.integers(min_value=0, max_value=8))
def test_answers_as_one_dict_would(ops: list[tuple[Any, ...]], probe: list[int], bits: int) -> None:
    sharded: ShardedDict[str] = ShardedDict(bits)
    model: dict[int, str] = {}
    for op in ops:
        if op[0] == "set":
            sharded[op[1]] = op[2]
            model[op[1]] = op[2]
        elif op[0] == "del":
            if op[1] in model:
                del sharded[op[1]]
                del model[op[1]]
            else:
                with pytest.raises(KeyError):
                    del sharded[op[1]]
        elif op[0] == "put_all":
            sharded.put_all(op[1], op[2])
            model.update(dict.fromkeys(op[1], op[2]))
        elif op[0] == "discard_all":
            sharded.discard_all(op[1], op[2])
            for key in op[1]:
                if key in model and model[key] == op[2]:
                    del model[key]
        else:
            sharded.clear()
            model.clear()
        assert len(sharded) == len(model) and bool(sharded) == bool(model)
    assert sorted(sharded) == sorted(model)
    for key in [*probe, *model]:
        assert (key in sharded) == (key in model)
        assert sharded.get(key) == model.get(key)
        assert sharded.get(key, "none") == model.get(key, "none")
    # deepest: how many keys, in order, are present, and the last one's value
    depth = 0
    while depth < len(probe) and probe[depth] in model:
        depth += 1
    assert sharded.deepest(probe) == ((model[probe[depth - 1]] if depth else None), depth)


def test_discard_all_removes_only_keys_that_map_to_that_value() -> None:
    sharded: ShardedDict[int] = ShardedDict()
    sharded.put_all([1, 2, 3], 10**30)  # a big int: equal values are not the same object
    sharded[2] = 7
    sharded.discard_all([1, 2, 3], 10**30 + 0 * len(sharded))
    assert list(sharded) == [2] and sharded[2] == 7


def test_a_map_of_ints_stays_out_of_the_collectors_way() -> None:
    sharded: ShardedDict[int] = ShardedDict()
    sharded.put_all(range(10_000), 5)
    assert not any(gc.is_tracked(shard) for shard in sharded._shards)  # noqa: SLF001


def test_hash_keys_spread_so_that_a_rebuild_moves_a_small_share() -> None:
    rng = random.Random(5)
    sharded: ShardedDict[int] = ShardedDict()
    n = 200_000
    sharded.put_all((rng.getrandbits(64) for _ in range(n)), 1)
    assert len(sharded) == n
    # 256 shards: the fullest holds well under 1 % of the keys (a plain dict's rebuild moves all of them)
    assert sharded.largest_shard() < n / 256 * 1.3


def test_bits_are_bounded() -> None:
    with pytest.raises(ValueError, match="bits"):
        ShardedDict(17)
    with pytest.raises(ValueError, match="bits"):
        ShardedDict(-1)
