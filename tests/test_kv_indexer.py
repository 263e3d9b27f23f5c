"""KvIndexer: engine batches through ordering, translation and the index, end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvgate.indexer.index import Match
from kvgate.indexer.kv_indexer import IndexerStats, KvIndexer
from kvgate.indexer.pipeline import StreamPosition
from kvgate.protocol.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    RouterCleared,
    RouterRemoved,
    RouterStored,
    Tier,
    WorkerKey,
)
from kvgate.protocol.hashing import sequence_hashes
from kvgate.protocol.wire import decode_batch

FIXTURES = Path(__file__).parent / "fixtures" / "kv_events"
BS = 64
TOKENS = [(i * 7919) % 150_000 for i in range(6 * BS)]
SEQ = sequence_hashes(TOKENS, BS)
E = [1000 + i for i in range(6)]
W0 = WorkerKey("w")


def batch(*events: object, rank: int | None = None) -> EventBatch:
    return EventBatch(0.0, list(events), rank)  # type: ignore[arg-type]


def stored(i: int, j: int, parent: int | None = None, tier: Tier = Tier.GPU, tokens: bool = True) -> BlockStored:
    return BlockStored(E[i:j], parent, TOKENS[i * BS : j * BS] if tokens else [], BS, medium=tier)


class Replays:
    """A ``ReplaySource`` that records requests the way a source would receive them."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, int, int, int]] = []
        self.answer_to: list[object] = []

    def request_replay(self, sink: object, worker_id: str, rank: int, start: int, end: int) -> None:
        self.asked.append((worker_id, rank, start, end))
        self.answer_to.append(sink)


def test_engine_batches_become_prefix_matches() -> None:
    ix = KvIndexer(BS)
    ix.apply_engine_batch("w", 0, batch(stored(0, 3)))
    ix.apply_engine_batch("w", 1, batch(stored(3, 6, parent=E[2]), BlockRemoved([E[5]])))
    ix.apply_engine_batch("v", 0, batch(stored(0, 2)))
    assert ix.find_matches(SEQ) == {W0: Match(5, [5, 0, 0]), WorkerKey("v"): Match(2, [2, 0, 0])}
    assert ix.block_counts() == {W0: (5, 0, 0), WorkerKey("v"): (2, 0, 0)}
    assert len(ix) == 5 and ix.keys() == [WorkerKey("v"), W0]
    assert ix.stats == IndexerStats(events_applied=4, blocks_stored=8, blocks_removed=1)


def test_data_parallel_ranks_are_separate_caches_with_separate_seqs() -> None:
    ix = KvIndexer(BS)
    ix.apply_engine_batch("w", 0, batch(stored(0, 2), rank=0))
    ix.apply_engine_batch("w", 0, batch(stored(0, 4), rank=1))
    ix.apply_engine_batch("w", 1, batch(BlockRemoved(E[:2]), rank=1))
    assert ix.find_matches(SEQ) == {W0: Match(2, [2, 0, 0])}
    assert ix.block_counts()[WorkerKey("w", 1)] == (2, 0, 0)
    assert ix.stats.restarts == 0 and ix.stats.gaps == 0


def test_tier_moves_through_the_engine_path() -> None:
    ix = KvIndexer(BS)
    ix.apply_engine_batch("w", 0, batch(stored(0, 4)))
    ix.apply_engine_batch("w", 1, batch(stored(2, 4, tier=Tier.CPU, tokens=False), BlockRemoved(E[2:4])))
    ix.apply_engine_batch("w", 2, batch(stored(3, 4, tier=Tier.DISK, tokens=False), BlockRemoved(E[3:4], Tier.CPU)))
    assert ix.find_matches(SEQ) == {W0: Match(4, [2, 1, 1])}
    assert ix.block_counts() == {W0: (2, 1, 1)}


def test_gap_replays_through_the_callback() -> None:
    replays = Replays()
    ix = KvIndexer(BS, replays)
    ix.apply_engine_batch("w", 0, batch(stored(0, 2), rank=2))
    ix.apply_engine_batch("w", 3, batch(stored(4, 6, parent=E[3]), rank=2))
    assert replays.asked == [("w", 2, 1, 3)] and replays.answer_to == [ix]
    assert ix.stats.unknown_parent == 0  # the out-of-order child waits, it is not dropped
    ix.apply_engine_batch("w", 1, batch(stored(2, 3, parent=E[1]), rank=2), replayed=True)
    ix.apply_engine_batch("w", 2, batch(stored(3, 4, parent=E[2]), rank=2), replayed=True)
    ix.replay_finished("w", 2, True)
    assert ix.find_matches(SEQ) == {WorkerKey("w", 2): Match(6, [6, 0, 0])}
    assert (ix.stats.gaps, ix.stats.replays_requested, ix.stats.replays_failed) == (1, 1, 0)


def test_without_replay_source_gaps_are_skipped_and_unknown_finishes_are_ignored() -> None:
    ix = KvIndexer(BS)
    ix.replay_finished("nobody", 0, True)
    ix.apply_engine_batch("w", 5, batch(stored(0, 1)))  # no replay source: gap skipped
    assert ix.find_matches(SEQ) == {W0: Match(1, [1, 0, 0])}
    ix.apply_engine_batch("w", 9, batch(stored(1, 2, parent=E[0])))
    assert ix.find_matches(SEQ) == {W0: Match(2, [2, 0, 0])}
    assert (ix.stats.gaps, ix.stats.replays_requested) == (2, 0)


def test_a_failed_replay_continues_with_the_buffered_batches() -> None:
    replays = Replays()
    ix = KvIndexer(BS, replays)
    ix.apply_engine_batch("w", 5, batch(stored(0, 1)))
    assert replays.asked == [("w", 0, 0, 5)]
    ix.replay_finished("w", 0, False)
    ix.apply_engine_batch("w", 9, batch(stored(1, 2, parent=E[0])))
    assert replays.asked == [("w", 0, 0, 5), ("w", 0, 6, 9)]
    ix.replay_finished("w", 0, False)
    assert ix.find_matches(SEQ) == {W0: Match(2, [2, 0, 0])}
    assert ix.stats.replays_failed == 2


def test_restart_drops_that_rank_before_the_new_batch() -> None:
    ix = KvIndexer(BS)
    ix.apply_engine_batch("w", 0, batch(stored(0, 4)))
    ix.apply_engine_batch("w", 0, batch(stored(0, 4), rank=1))
    ix.apply_engine_batch("w", 1, batch(BlockRemoved(E[3:4])))
    ix.apply_engine_batch("w", 0, batch(stored(0, 1)))  # seq fell back: engine restarted
    assert ix.find_matches(SEQ) == {W0: Match(1, [1, 0, 0]), WorkerKey("w", 1): Match(4, [4, 0, 0])}
    # The old incarnation's engine hashes are forgotten too.
    ix.apply_engine_batch("w", 1, batch(BlockRemoved(E[2:3])))
    assert ix.stats.restarts == 1 and ix.stats.unknown_block == 1


def test_all_blocks_cleared_drops_every_tier() -> None:
    ix = KvIndexer(BS)
    ix.apply_engine_batch("w", 0, batch(stored(0, 3), stored(0, 3, tier=Tier.CPU, tokens=False)))
    ix.apply_engine_batch("w", 1, batch(AllBlocksCleared(), stored(0, 1)))
    assert ix.find_matches(SEQ) == {W0: Match(1, [1, 0, 0])}
    assert ix.block_counts() == {W0: (1, 0, 0)}


def test_remove_worker_forgets_blocks_maps_and_seqs() -> None:
    ix = KvIndexer(BS)
    for rank in (0, 1):
        ix.apply_engine_batch("w", 0, batch(stored(0, 3), rank=rank))
        ix.apply_engine_batch("w", 1, batch(stored(3, 4, parent=E[2]), rank=rank))
    ix.apply_engine_batch("v", 0, batch(stored(0, 2)))
    ix.remove_worker("w")
    assert ix.find_matches(SEQ) == {WorkerKey("v"): Match(2, [2, 0, 0])}
    assert ix.keys() == [WorkerKey("v")]
    # Coming back it starts from scratch: seq 0 is not a restart, old parents are unknown.
    ix.apply_engine_batch("w", 0, batch(stored(4, 5, parent=E[3])))
    assert ix.stats.restarts == 0
    assert W0 not in ix.find_matches(SEQ)


def test_replay_finishes_owed_by_a_removed_worker_do_not_end_its_next_replay() -> None:
    replays = Replays()
    ix = KvIndexer(BS, replays)
    ix.apply_engine_batch("w", 0, batch(stored(0, 1)))
    ix.apply_engine_batch("w", 4, batch(stored(1, 2, parent=E[0])))
    assert ix.position("w", 0) == StreamPosition(0, 0, 1)
    ix.remove_worker("w")
    assert ix.position("w", 0) == StreamPosition(-1, 0, 1)  # its source may still be running it
    ix.apply_engine_batch("w", 2, batch(stored(1, 2, parent=E[0])))  # back: asks (0, 2)
    assert replays.asked == [("w", 0, 1, 4), ("w", 0, 0, 2)]
    ix.replay_finished("w", 0, False)  # answers the request made before the removal
    assert ix.find_matches(SEQ) == {}
    ix.apply_engine_batch("w", 0, batch(stored(0, 1)), replayed=True)
    ix.apply_engine_batch("w", 1, batch(), replayed=True)
    ix.replay_finished("w", 0, True)
    assert ix.find_matches(SEQ) == {W0: Match(2, [2, 0, 0])}
    assert ix.stats.replays_failed == 0


def test_rejections_are_counted_and_nothing_applies() -> None:
    ix = KvIndexer(BS)
    ix.record_rejected("w", "truncated")
    ix.record_rejected("w", "truncated")
    ix.apply_engine_batch("w", 0, batch(BlockStored(E[:1], None, TOKENS[:32], 32)))
    ix.apply_engine_batch("w", 1, batch(stored(1, 2, parent=E[0])))
    assert ix.find_matches(SEQ) == {}
    assert ix.stats.rejected == {"truncated": 2, "bad_block_size": 1}


def test_router_events_path() -> None:
    ix = KvIndexer(BS)
    key = WorkerKey("n", 3)
    ix.apply_router_events(key, [RouterStored(SEQ[:4]), RouterStored(SEQ[:2], Tier.CPU), RouterRemoved(SEQ[:2])])
    assert ix.find_matches(SEQ) == {key: Match(4, [2, 2, 0])}
    ix.apply_router_events(key, [RouterCleared()])
    assert ix.find_matches(SEQ) == {}
    assert ix.stats.events_applied == 4 and ix.stats.blocks_stored == 6 and ix.stats.blocks_removed == 2


def test_bad_router_events_apply_nothing() -> None:
    ix = KvIndexer(BS)
    key = WorkerKey("n")
    for bad in (RouterStored(SEQ[:1], 5), AllBlocksCleared()):  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            ix.apply_router_events(key, [RouterStored(SEQ[:3]), bad])  # type: ignore[list-item]
    assert ix.find_matches(SEQ) == {} and ix.stats.events_applied == 0


def test_block_size_must_be_positive() -> None:
    with pytest.raises(ValueError):
        KvIndexer(0)


def test_decoded_fixtures_compose_gpu_and_offload_events() -> None:
    """The golden payloads: vLLM's GPU events, then the offloading connector's."""
    gpu = decode_batch((FIXTURES / "vllm_tagged_map.msgpack").read_bytes())
    offload = decode_batch((FIXTURES / "offload_cpu_tier.msgpack").read_bytes())
    assert gpu.data_parallel_rank == 1 and offload.data_parallel_rank == 0
    gpu.data_parallel_rank = 0  # replay the two as one rank's stream
    tokens = gpu.events[0].token_ids  # type: ignore[union-attr]
    seq = sequence_hashes(tokens, BS)
    ix = KvIndexer(BS)
    ix.apply_engine_batch("w", 0, gpu)
    assert ix.find_matches(seq) == {W0: Match(1, [1, 0, 0])}
    ix.apply_engine_batch("w", 1, offload)
    # Block 0 moved to CPU; block 1 (already evicted) was announced and removed on CPU.
    assert ix.find_matches(seq) == {W0: Match(1, [0, 1, 0])}
    assert ix.block_counts() == {W0: (0, 1, 0)}
    assert ix.stats.unknown_block == 0 and ix.stats.events_applied == 5


def test_position_tells_a_source_the_last_applied_seq_and_restarts() -> None:
    ix = KvIndexer(BS)
    assert ix.position("w", 0) == StreamPosition(-1, 0, 0)
    ix.apply_engine_batch("w", 0, batch(stored(0, 1)))
    ix.apply_engine_batch("w", 1, batch(stored(1, 2, parent=E[0])))
    assert ix.position("w", 0) == StreamPosition(1, 0, 0)
    ix.apply_engine_batch("w", 0, batch(stored(0, 1)))  # seq fell back: a new engine
    assert ix.position("w", 0) == StreamPosition(0, 1, 0)
    assert ix.position("w", 1) == StreamPosition(-1, 0, 0)


def test_an_untrusted_workers_blocks_stay_indexed_but_are_not_matched() -> None:
    ix = KvIndexer(BS)
    ix.apply_router_events(W0, [RouterStored(SEQ[:4])])
    ix.apply_router_events(WorkerKey("w", 1), [RouterStored(SEQ[:3])])
    ix.apply_router_events(WorkerKey("v"), [RouterStored(SEQ[:2])])
    everyone = ix.find_matches(SEQ)
    assert ix.trusted("w") and len(everyone) == 3

    ix.set_trusted("w", False)  # e.g. its NATS stream went out of sync
    assert not ix.trusted("w") and ix.trusted("v")
    assert ix.find_matches(SEQ) == {WorkerKey("v"): Match(2, [2, 0, 0])}  # every rank of w left out
    assert ix.block_counts()[W0] == (4, 0, 0) and len(ix) == 4  # still indexed
    ix.apply_router_events(W0, [RouterStored(SEQ[4:5])])  # still fed
    assert W0 not in ix.find_matches(SEQ)

    ix.set_trusted("w", True)  # back in sync
    assert ix.find_matches(SEQ)[W0] == Match(5, [5, 0, 0]) and ix.find_matches(SEQ) == {
        **everyone,
        W0: Match(5, [5, 0, 0]),
    }


def test_removing_a_worker_forgets_its_trust_state() -> None:
    ix = KvIndexer(BS)
    ix.set_trusted("w", False)
    ix.remove_worker("w")
    assert ix.trusted("w")
    ix.apply_router_events(W0, [RouterStored(SEQ[:1])])
    assert ix.find_matches(SEQ) == {W0: Match(1, [1, 0, 0])}


def test_engine_lost_forgets_blocks_maps_and_seqs_but_keeps_the_worker_and_its_trust() -> None:
    replays = Replays()
    ix = KvIndexer(BS, replays)
    for rank in (0, 1):
        ix.apply_engine_batch("w", 0, batch(stored(0, 3), rank=rank))
        ix.apply_engine_batch("w", 1, batch(stored(3, 4, parent=E[2]), rank=rank))
    ix.apply_engine_batch("v", 0, batch(stored(0, 2)))
    ix.engine_lost("w")
    assert ix.find_matches(SEQ) == {WorkerKey("v"): Match(2, [2, 0, 0])}
    assert ix.block_counts() == {WorkerKey("v"): (2, 0, 0)} and ix.trusted("w")
    # Its order starts over in a new generation: a catch-up fetched before is stale.
    assert ix.position("w", 0) == StreamPosition(-1, 1, 0) and ix.position("w", 1) == StreamPosition(-1, 1, 0)
    # A restarted engine whose seq already passed the old one is not taken for a gap to
    # replay onto the old blocks: it is a first batch, asking from 0.
    ix.apply_engine_batch("w", 5, batch(stored(3, 4, parent=E[2])))
    assert replays.asked == [("w", 0, 0, 5)]
    ix.replay_finished("w", 0, False)
    assert W0 not in ix.find_matches(SEQ)  # the old engine's parent is unknown now
    ix.apply_engine_batch("w", 6, batch(stored(0, 1)))
    assert ix.find_matches(SEQ)[W0] == Match(1, [1, 0, 0])
    assert ix.stats.restarts == 0


def test_engine_lost_keeps_an_untrusted_worker_untrusted() -> None:
    ix = KvIndexer(BS)
    ix.apply_engine_batch("w", 0, batch(stored(0, 2)))
    ix.set_trusted("w", False)
    ix.engine_lost("w")
    assert not ix.trusted("w")
    ix.engine_lost("unknown")  # nothing to forget
    assert ix.keys() == []
