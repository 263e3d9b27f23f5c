"""EventStream: ordering, gap replay, restarts, duplicates, failure and overflow."""

from __future__ import annotations

from kvgate.indexer.recovery import EventStream, RecoveryStats


class Recorder:
    """A real sink for a stream: what was applied, when resets happened, what was asked."""

    def __init__(self, can_replay: bool = True) -> None:
        self.log: list[object] = []  # applied batch names and "RESET" markers, in order
        self.asked: list[tuple[int, int]] = []
        self.can_replay = can_replay

    def apply(self, batch: str) -> None:
        self.log.append(batch)

    def reset(self) -> None:
        self.log.append("RESET")

    def request_replay(self, start: int, end: int) -> bool:
        self.asked.append((start, end))
        return self.can_replay


def make(max_buffered: int = 16, can_replay: bool = True) -> tuple[EventStream[str], Recorder]:
    rec = Recorder(can_replay)
    return EventStream("w", rec.apply, rec.reset, rec.request_replay, max_buffered=max_buffered), rec


def live(stream: EventStream[str], *seqs: int) -> None:
    for s in seqs:
        stream.offer(s, f"b{s}")


def replay(stream: EventStream[str], *seqs: int) -> None:
    for s in seqs:
        stream.offer(s, f"b{s}", replayed=True)


def test_in_order_batches_apply() -> None:
    stream, rec = make()
    live(stream, 0, 1, 2)
    assert rec.log == ["b0", "b1", "b2"] and stream.last_seq == 2
    assert stream.stats == RecoveryStats()


def test_gap_asks_for_replay_buffers_live_then_flushes_in_order() -> None:
    stream, rec = make()
    live(stream, 0, 1, 4, 5)
    assert rec.asked == [(2, 4)]
    assert rec.log == ["b0", "b1"] and stream.replaying and stream.buffered == 2
    # The replay socket also returns what was received live (4, 5) and what is applied (1).
    replay(stream, 1, 2, 3, 4, 5)
    live(stream, 6)
    assert rec.log == ["b0", "b1", "b2", "b3"]
    stream.replay_finished(True)
    assert rec.log == ["b0", "b1", "b2", "b3", "b4", "b5", "b6"]
    assert not stream.replaying and stream.last_seq == 6
    assert stream.stats == RecoveryStats(gaps=1, replays_requested=1, duplicates=3)


def test_subscriber_joining_mid_stream_asks_from_zero() -> None:
    stream, rec = make()
    live(stream, 7)
    assert rec.asked == [(0, 7)]
    stream.replay_finished(False)
    assert rec.log == ["b7"]
    assert stream.stats.replays_failed == 1


def test_failed_replay_continues_from_the_buffer_without_reset() -> None:
    stream, rec = make()
    live(stream, 0, 3, 4)
    replay(stream, 1)
    stream.replay_finished(False)
    assert rec.log == ["b0", "b1", "b3", "b4"]  # 2 is lost; no RESET (see recovery's docstring)
    live(stream, 5)
    assert rec.log[-1] == "b5" and stream.stats.replays_failed == 1 and stream.stats.gaps == 1


def test_replay_with_a_hole_or_stopping_short_counts_as_failed() -> None:
    stream, rec = make()
    live(stream, 0, 5)
    replay(stream, 1, 3)  # 2 missing from the engine's buffer
    stream.replay_finished(True)
    assert rec.log == ["b0", "b1", "b3", "b5"]
    assert stream.stats.replays_failed == 1
    live(stream, 9)
    replay(stream, 6)
    stream.replay_finished(True)  # "ok" but 7 and 8 never came
    assert rec.log[-2:] == ["b6", "b9"] and stream.stats.replays_failed == 2


def test_no_replay_socket_skips_the_gap() -> None:
    stream, rec = make(can_replay=False)
    live(stream, 0, 2, 3)
    assert rec.log == ["b0", "b2", "b3"]
    assert stream.stats == RecoveryStats(gaps=1)
    bare = Recorder()
    stream2: EventStream[str] = EventStream("w", bare.apply, bare.reset)
    live(stream2, 3, 4)
    assert bare.log == ["b3", "b4"]


def test_replay_request_raising_is_a_failed_replay() -> None:
    rec = Recorder()

    def broken(start: int, end: int) -> bool:
        raise RuntimeError("socket gone")

    stream: EventStream[str] = EventStream("w", rec.apply, rec.reset, broken)
    live(stream, 0, 2)
    assert rec.log == ["b0", "b2"] and not stream.replaying
    assert stream.stats.replays_failed == 1


def test_replay_finishing_inside_the_request() -> None:
    rec = Recorder()
    stream: EventStream[str]

    def immediate(start: int, end: int) -> bool:
        for s in range(start, end):
            stream.offer(s, f"b{s}", replayed=True)
        stream.replay_finished(True)
        return True

    stream = EventStream("w", rec.apply, rec.reset, immediate)
    live(stream, 0, 3, 4, 7)
    assert rec.log == [f"b{i}" for i in range(8)]
    assert stream.stats == RecoveryStats(gaps=2, replays_requested=2)


def test_restart_resets_before_the_new_batch_applies() -> None:
    stream, rec = make()
    live(stream, 0, 1, 2, 0, 1)
    assert rec.log == ["b0", "b1", "b2", "RESET", "b0", "b1"]
    assert stream.stats.restarts == 1 and rec.asked == []


def test_restart_to_a_nonzero_seq_asks_from_zero() -> None:
    stream, rec = make()
    live(stream, 0, 1, 2, 3, 4, 2)
    assert rec.log[-1] == "RESET" and rec.asked == [(0, 2)]
    replay(stream, 0, 1)
    stream.replay_finished(True)
    assert rec.log[-4:] == ["RESET", "b0", "b1", "b2"]
    assert stream.stats.replays_failed == 0


def test_restart_during_a_replay_abandons_it() -> None:
    stream, rec = make()
    live(stream, 0, 1, 5, 6, 0)
    assert rec.log == ["b0", "b1", "RESET", "b0"]
    assert not stream.replaying and stream.stats.restarts == 1
    replay(stream, 2, 3)  # late frames of the abandoned replay
    stream.replay_finished(True)
    live(stream, 1)
    assert rec.log == ["b0", "b1", "RESET", "b0", "b1"]
    assert stream.stats.duplicates == 2


def test_buffer_overflow_gives_up_on_the_replay() -> None:
    stream, rec = make(max_buffered=3)
    live(stream, 0, 5, 6, 7)
    assert stream.buffered == 3
    live(stream, 8)
    assert rec.log == ["b0", "b5", "b6", "b7", "b8"]
    assert not stream.replaying and stream.stats.replays_failed == 1
    replay(stream, 1, 2)
    stream.replay_finished(True)
    assert rec.log[-1] == "b8" and stream.stats.duplicates == 2


def test_a_gap_inside_the_flushed_buffer_opens_a_new_replay() -> None:
    stream, rec = make()
    live(stream, 0, 3, 6)  # 6 arrives live during the first replay: 4 and 5 were lost too
    replay(stream, 1, 2)
    stream.replay_finished(True)
    assert rec.log == ["b0", "b1", "b2", "b3"]
    assert rec.asked == [(1, 3), (4, 6)] and stream.replaying
    live(stream, 7)
    replay(stream, 4, 5)
    stream.replay_finished(True)
    assert rec.log == [f"b{i}" for i in range(8)]


def test_unsolicited_replayed_batches_and_finish_are_ignored() -> None:
    stream, rec = make()
    live(stream, 0)
    replay(stream, 1)
    stream.replay_finished(True)
    assert rec.log == ["b0"] and stream.stats.duplicates == 1 and stream.stats.replays_failed == 0


def test_an_abandoned_replays_finish_does_not_end_the_next_one() -> None:
    stream, rec = make()
    live(stream, 0, 1, 5)  # asks (2, 5) of the engine that is about to restart
    live(stream, 0, 1, 4)  # restart, then a gap in the new incarnation: asks (2, 4)
    assert rec.asked == [(2, 5), (2, 4)]
    stream.replay_finished(False)  # the dead engine's answer to the first request
    assert stream.replaying and stream.stats.replays_failed == 0
    replay(stream, 2, 3)
    stream.replay_finished(True)
    assert rec.log == ["b0", "b1", "RESET", "b0", "b1", "b2", "b3", "b4"]
    assert stream.unanswered == 0 and stream.stats.replays_failed == 0


def test_forget_starts_over_and_still_absorbs_the_replays_asked_before() -> None:
    stream, rec = make()
    live(stream, 0, 1, 5, 6)  # asks (2, 5); 5 and 6 buffered
    stream.forget()
    assert not stream.replaying and stream.buffered == 0 and stream.last_seq == -1
    assert stream.unanswered == 1 and stream.stats.restarts == 0 and "RESET" not in rec.log
    live(stream, 0, 3)  # a first batch again, then a gap of the new order: asks (1, 3)
    assert rec.asked == [(2, 5), (1, 3)] and rec.log == ["b0", "b1", "b0"]
    stream.replay_finished(True)  # answers the forgotten request
    assert stream.replaying
    replay(stream, 1, 2)
    stream.replay_finished(True)
    assert rec.log == ["b0", "b1", "b0", "b1", "b2", "b3"] and stream.stats.replays_failed == 0
