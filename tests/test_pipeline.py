"""RankPipeline: one rank's ordering and translation, with the owner's output, reset and replay."""

from __future__ import annotations

import pytest

from kvgate.indexer.pipeline import START, PipelineStats, RankPipeline, StreamPosition
from kvgate.protocol.events import (
    BlockRemoved,
    BlockStored,
    EventBatch,
    RouterEvent,
    RouterRemoved,
    RouterStored,
    WorkerKey,
)
from kvgate.protocol.hashing import sequence_hashes

BS = 4
TOKENS = list(range(3 * BS))
ROUTER = sequence_hashes(TOKENS, BS)
KEY = WorkerKey("w", 1)


def batch(*events: object) -> EventBatch:
    return EventBatch(0.0, list(events), KEY.dp_rank)  # type: ignore[arg-type]


def stored(i: int, j: int, parent: int | None = None) -> BlockStored:
    return BlockStored([100 + n for n in range(i, j)], parent, TOKENS[i * BS : j * BS], BS)


class Owner:
    """What a pipeline's owner sees: outputs, resets, and the replays it asked for."""

    def __init__(self) -> None:
        self.out: list[tuple[WorkerKey, int, list[RouterEvent]]] = []
        self.resets: list[WorkerKey] = []
        self.asked: list[tuple[object, str, int, int, int]] = []

    def output(self, key: WorkerKey, b: EventBatch, events: list[RouterEvent]) -> None:
        self.out.append((key, len(b.events), events))

    def reset(self, key: WorkerKey) -> None:
        self.resets.append(key)

    def request_replay(self, sink: object, worker_id: str, rank: int, start: int, end: int) -> None:
        self.asked.append((sink, worker_id, rank, start, end))


def make(replay: bool = True) -> tuple[RankPipeline, Owner, PipelineStats]:
    owner, stats = Owner(), PipelineStats()
    sink = object()  # only handed on to the replay source
    pipeline = RankPipeline(
        KEY,
        owner.output,
        owner.reset,
        stats=stats,
        block_size=BS,
        replay=owner if replay else None,
        sink=sink if replay else None,
    )  # type: ignore[arg-type]
    return pipeline, owner, stats


def test_batches_come_out_translated_in_order() -> None:
    pipeline, owner, stats = make()
    assert pipeline.position == START
    pipeline.offer(0, batch(stored(0, 2)))
    pipeline.offer(1, batch(stored(2, 3, parent=101), BlockRemoved([100])))
    assert owner.out == [
        (KEY, 1, [RouterStored(ROUTER[:2])]),
        (KEY, 2, [RouterStored(ROUTER[2:3]), RouterRemoved(ROUTER[:1])]),
    ]
    assert pipeline.position == StreamPosition(1, 0, 0) and stats == PipelineStats()


def test_a_gap_is_asked_of_the_replay_source_for_the_sink() -> None:
    pipeline, owner, stats = make()
    pipeline.offer(0, batch(stored(0, 1)))
    pipeline.offer(2, batch(stored(2, 3, parent=101)))
    ((sink, worker_id, rank, start, end),) = owner.asked
    assert (worker_id, rank, start, end) == ("w", 1, 1, 2) and sink is not owner
    assert pipeline.position == StreamPosition(0, 0, 1)
    pipeline.offer(1, batch(stored(1, 2, parent=100)), replayed=True)
    pipeline.replay_finished(True)
    assert [e for _, _, events in owner.out for e in events] == [RouterStored([h]) for h in ROUTER]
    assert pipeline.position == StreamPosition(2, 0, 0) and stats.replays_requested == 1


def test_without_a_replay_source_a_gap_is_skipped() -> None:
    pipeline, owner, stats = make(replay=False)
    pipeline.offer(3, batch(stored(0, 1)))
    assert len(owner.out) == 1 and stats.gaps == 1 and stats.replays_requested == 0


def test_a_restart_clears_the_translator_resets_the_owner_and_bumps_the_generation() -> None:
    pipeline, owner, stats = make()
    pipeline.offer(0, batch(stored(0, 2)))
    pipeline.offer(0, batch(BlockRemoved([101])))  # seq fell back: a new engine
    assert owner.resets == [KEY] and stats.restarts == 1
    assert owner.out[-1] == (KEY, 1, []) and stats.unknown_block == 1  # the old hashes are gone
    assert pipeline.position == StreamPosition(0, 1, 0)


def test_forget_starts_over_without_a_reset() -> None:
    pipeline, owner, stats = make()
    pipeline.offer(0, batch(stored(0, 2)))
    pipeline.forget()
    assert owner.resets == [] and len(pipeline.translator) == 0
    assert pipeline.position == StreamPosition(-1, 1, 0)
    pipeline.offer(5, batch(stored(0, 1)))  # a first batch: asks from 0, no restart
    assert owner.asked[-1][1:] == ("w", 1, 0, 5) and stats.restarts == 0


def test_a_replay_source_needs_a_sink() -> None:
    owner = Owner()
    with pytest.raises(ValueError, match="sink"):
        RankPipeline(KEY, owner.output, owner.reset, stats=PipelineStats(), block_size=BS, replay=owner)
