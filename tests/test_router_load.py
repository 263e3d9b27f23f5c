"""router.load: request lifecycle, expiry, remote replicas' load, engine load staleness;
router.engine_load: the one entry point of engine-reported load."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvgate.protocol.events import WorkerKey
from kvgate.protocol.worker_record import WorkerInfo
from kvgate.router.engine_load import EngineLoadFeed
from kvgate.router.load import IDLE, LoadSnapshot, LoadTracker, RemoteRequest
from kvgate.router.registry import WorkerRegistry

A, B, A1 = WorkerKey("a"), WorkerKey("b"), WorkerKey("a", 1)


def tracker(**kw):
    return LoadTracker(ttl=kw.pop("ttl", 60.0), engine_stale_after=kw.pop("engine_stale_after", 5.0), clock=lambda: 0.0)


def test_lifecycle_prefill_then_decode_then_free():
    load = tracker()
    load.begin("r1", A, prompt_tokens=300, new_prefill_tokens=172, blocks=5, now=0.0)
    load.begin("r2", A, prompt_tokens=64, new_prefill_tokens=64, blocks=1, now=1.0)
    assert load.snapshot(A) == LoadSnapshot(requests=2, prefill_tokens=236, blocks=6)
    assert load.get("r1").in_prefill

    assert load.prefill_done("r1", now=2.0)
    assert load.snapshot(A) == LoadSnapshot(requests=2, prefill_tokens=64, blocks=6)
    assert not load.get("r1").in_prefill

    assert load.finish("r1")
    assert load.snapshot(A) == LoadSnapshot(requests=1, prefill_tokens=64, blocks=1)
    assert load.finish("r2")  # cancelled before its first token: frees its prefill too
    assert load.snapshot(A) is IDLE and len(load) == 0
    assert not load.finish("r2") and not load.prefill_done("r2")
    assert load.snapshot(B) is IDLE


def test_begin_again_moves_the_request():
    load = tracker()
    load.begin("r1", A, 128, 128, 2, now=0.0)
    load.begin("r1", B, 128, 64, 2, now=0.5)  # retried on the next-best worker
    assert load.snapshot(A) is IDLE
    assert load.snapshot(B) == LoadSnapshot(requests=1, prefill_tokens=64, blocks=2)


def test_expiry_drops_only_entries_older_than_ttl():
    load = tracker(ttl=10.0)
    load.begin("old", A, 64, 64, 1, now=0.0)
    load.begin("kept", A, 64, 64, 1, now=1.0)
    load.begin("young", B, 64, 64, 1, now=5.0)
    load.prefill_done("kept", now=8.0)  # a lifecycle event refreshes it
    assert load.expire(now=9.0) == 0
    assert load.expire(now=12.0) == 1
    assert load.get("old") is None and load.get("kept") is not None
    assert load.snapshot(A) == LoadSnapshot(requests=1, prefill_tokens=0, blocks=1)
    assert load.expire(now=30.0) == 2
    assert len(load) == 0 and load.snapshot(A) is IDLE and load.snapshot(B) is IDLE
    assert not load.finish("young")  # a finish after expiry is harmless


def test_default_clock_is_used_when_now_is_omitted():
    now = [100.0]
    load = LoadTracker(ttl=10.0, clock=lambda: now[0])
    load.begin("r", A, 64, 64, 1)
    now[0] = 109.0
    assert load.expire() == 0
    now[0] = 111.0
    assert load.expire() == 1


def test_remote_replicas_load_counts_and_is_kept_apart():
    load = tracker(ttl=10.0)
    load.begin("r1", A, 128, 128, 2, now=0.0)
    load.add_remote("gw-2", [RemoteRequest("r1", A, 64, 3), RemoteRequest("r2", B, 0, 4)], now=0.0)
    # Same request id on another replica is another request.
    assert load.snapshot(A) == LoadSnapshot(requests=2, prefill_tokens=192, blocks=5, remote_requests=1)
    assert load.snapshot(B) == LoadSnapshot(requests=1, prefill_tokens=0, blocks=4, remote_requests=1)

    load.add_remote("gw-2", [RemoteRequest("r1", A, 0, 3)], now=1.0)  # its prefill finished
    assert load.snapshot(A).prefill_tokens == 128
    assert load.remove_remote("gw-2", ["r1", "unknown"]) == 1
    assert load.snapshot(A) == LoadSnapshot(requests=1, prefill_tokens=128, blocks=2)
    assert load.get("r1").router_id is None  # ours untouched

    load.add_remote("gw-3", [RemoteRequest("x", A, 10, 1)], now=2.0)
    assert load.remove_remote("gw-2") == 1  # replica gone: all of its requests
    assert load.snapshot(B) is IDLE
    assert load.expire(now=12.5) == 2  # remote entries expire like ours
    assert load.snapshot(A) is IDLE


def test_engine_load_goes_stale():
    load = tracker(engine_stale_after=5.0)
    load.update_engine(A, running=3, waiting=2, kv_usage=0.5, now=10.0)
    assert load.snapshot(A, now=15.0) == LoadSnapshot(running=3, waiting=2, kv_usage=0.5)
    assert load.snapshot(A, now=15.1) is IDLE
    load.begin("r", A, 64, 64, 1, now=16.0)
    load.update_engine(A, running=1, waiting=0, kv_usage=0.25, now=16.0)
    assert load.snapshots([A, B], now=17.0) == {
        A: LoadSnapshot(requests=1, prefill_tokens=64, blocks=1, running=1, waiting=0, kv_usage=0.25),
        B: IDLE,
    }


def test_engine_load_feed_applies_known_fresh_valid_reports_and_counts_the_rest():
    load = tracker(engine_stale_after=5.0)
    registry = WorkerRegistry([WorkerInfo("a", "http://127.0.0.1:1", "m", dp_size=2)])
    feed = EngineLoadFeed(load, registry, wall_clock=lambda: 1000.0)
    assert feed.report(A1, running=2, waiting=1, kv_usage=0.5)  # just measured (a scrape)
    assert feed.report(A, 1, 0, 0.25, measured_at=995.0)  # exactly engine_stale_after old
    assert load.snapshot(A1) == LoadSnapshot(running=2, waiting=1, kv_usage=0.5)
    assert load.snapshot(A) == LoadSnapshot(running=1, waiting=0, kv_usage=0.25)
    ignored = [
        (B, 1, 1, 0.5, None),  # unknown worker
        (WorkerKey("a", 2), 1, 1, 0.5, None),  # a rank it does not have
        (A, 7, 7, 0.9, 994.9),  # waited in a buffer too long
        (A, 1, -1, 0.5, None),  # invalid figures
        (A, 1, 1, 1.5, 1000.0),
    ]
    for key, running, waiting, kv_usage, measured_at in ignored:
        assert not feed.report(key, running, waiting, kv_usage, measured_at)
    assert (feed.received, feed.ignored) == (7, 5)
    assert load.snapshot(A) == LoadSnapshot(running=1, waiting=0, kv_usage=0.25) and load.snapshot(B) is IDLE


def test_remove_worker_forgets_all_its_ranks():
    load = tracker()
    load.begin("r1", A, 64, 64, 1, now=0.0)
    load.begin("r2", A1, 64, 64, 1, now=0.0)
    load.begin("r3", B, 64, 64, 1, now=0.0)
    load.add_remote("gw-2", [RemoteRequest("x", A1, 1, 1)], now=0.0)
    load.update_engine(A, 1, 1, 0.1, now=0.0)
    load.remove_worker("a")
    assert load.snapshot(A, now=0.0) is IDLE and load.snapshot(A1, now=0.0) is IDLE
    assert load.snapshot(B, now=0.0).requests == 1 and len(load) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        ((-1, 0, 0), "prompt_tokens must be a non-negative integer"),
        ((10, 11, 1), "new_prefill_tokens (11) > prompt_tokens (10)"),
        ((10, 5, 1.5), "blocks must be a non-negative integer"),
        ((True, 0, 0), "prompt_tokens must be a non-negative integer"),
    ],
)
def test_begin_rejects_bad_counts_without_changing_state(args, message):
    load = tracker()
    with pytest.raises(ValueError) as err:
        load.begin("r", A, *args)
    assert message in str(err.value)
    assert len(load) == 0 and load.snapshot(A) is IDLE


def test_update_engine_and_remote_validation():
    load = tracker()
    with pytest.raises(ValueError, match="kv_usage must be a number in"):
        load.update_engine(A, 1, 1, 1.5)
    with pytest.raises(ValueError, match="waiting must be a non-negative integer"):
        load.update_engine(A, 1, -1, 0.5)
    with pytest.raises(ValueError, match="router_id must be a non-empty string"):
        load.add_remote("", [])
    with pytest.raises(ValueError, match="ttl and engine_stale_after must be > 0"):
        LoadTracker(ttl=0)
    assert load.snapshot(A) is IDLE


def test_add_remote_is_all_or_nothing():
    load = tracker()
    with pytest.raises(ValueError, match="blocks must be a non-negative integer"):
        load.add_remote("gw-2", [RemoteRequest("ok", A, 1, 1), RemoteRequest("bad", A, 1, -1)])
    assert len(load) == 0 and load.snapshot(A) is IDLE


# -- property: the tracker's incremental totals and cached snapshots equal a recount ----

KEYS = [A, A1, B]
_ids = st.sampled_from(["r0", "r1", "r2", "r3"])
_ops = st.one_of(
    st.tuples(st.just("begin"), _ids, st.sampled_from(KEYS), st.integers(0, 500), st.integers(0, 9)),
    st.tuples(st.just("prefill_done"), _ids),
    st.tuples(st.just("finish"), _ids),
    st.tuples(
        st.just("add_remote"),
        st.sampled_from(["g1", "g2"]),
        _ids,
        st.sampled_from(KEYS),
        st.integers(0, 300),
        st.integers(0, 9),
    ),
    st.tuples(st.just("remove_remote"), st.sampled_from(["g1", "g2"]), st.one_of(st.none(), _ids)),
    st.tuples(st.just("engine"), st.sampled_from(KEYS), st.integers(0, 9), st.integers(0, 9), st.floats(0, 1)),
    st.tuples(st.just("expire")),
    st.tuples(st.just("remove_worker"), st.sampled_from(["a", "b"])),
)


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_ops, st.floats(0, 4)), max_size=60))
def test_snapshots_match_a_recount(steps):
    ttl, stale = 10.0, 3.0
    load = LoadTracker(ttl=ttl, engine_stale_after=stale, clock=lambda: 0.0)
    live: dict[tuple, list] = {}  # (origin, id) -> [key, prefill, blocks, touched]
    engine: dict[WorkerKey, tuple] = {}
    now = 0.0
    for op, dt in steps:
        now += dt
        kind = op[0]
        if kind == "begin":
            _, rid, key, prefill, blocks = op
            load.begin(rid, key, prefill, prefill, blocks, now=now)
            live[(None, rid)] = [key, prefill, blocks, now]
        elif kind == "prefill_done":
            assert load.prefill_done(op[1], now=now) == ((None, op[1]) in live)
            if (None, op[1]) in live:
                live[(None, op[1])][1] = 0
                live[(None, op[1])][3] = now
        elif kind == "finish":
            assert load.finish(op[1]) == ((None, op[1]) in live)
            live.pop((None, op[1]), None)
        elif kind == "add_remote":
            _, router_id, rid, key, prefill, blocks = op
            load.add_remote(router_id, [RemoteRequest(rid, key, prefill, blocks)], now=now)
            live[(router_id, rid)] = [key, prefill, blocks, now]
        elif kind == "remove_remote":
            _, router_id, rid = op
            gone = [i for i in live if i[0] == router_id and (rid is None or i[1] == rid)]
            assert load.remove_remote(router_id, None if rid is None else [rid]) == len(gone)
            for i in gone:
                del live[i]
        elif kind == "engine":
            _, key, running, waiting, kv = op
            load.update_engine(key, running, waiting, kv, now=now)
            engine[key] = (running, waiting, kv, now)
        elif kind == "expire":
            old = [i for i, e in live.items() if e[3] <= now - ttl]
            assert load.expire(now=now) == len(old)
            for i in old:
                del live[i]
        else:
            for i in [i for i, e in live.items() if e[0].worker_id == op[1]]:
                del live[i]
            for k in [k for k in engine if k.worker_id == op[1]]:
                del engine[k]
            load.remove_worker(op[1])
        for key in KEYS:
            mine = [e for e in live.values() if e[0] == key]
            eng = engine.get(key)
            fresh = eng is not None and now <= eng[3] + stale  # the tracker's own arithmetic (floats)
            expected = LoadSnapshot(
                requests=len(mine),
                prefill_tokens=sum(e[1] for e in mine),
                blocks=sum(e[2] for e in mine),
                remote_requests=sum(1 for i, e in live.items() if e[0] == key and i[0] is not None),
                running=eng[0] if fresh else None,
                waiting=eng[1] if fresh else None,
                kv_usage=eng[2] if fresh else None,
            )
            assert load.snapshot(key, now=now) == expected
        assert load.snapshots(KEYS, now=now) == {k: load.snapshot(k, now=now) for k in KEYS}
        assert len(load) == len(live)


def test_engine_pool_size_is_kept_past_staleness_and_forgotten_with_the_worker():
    load = tracker(engine_stale_after=5.0)
    load.update_engine(A, 1, 0, 0.5, now=0.0, capacity_tokens=64_000)
    assert load.snapshot(A, now=1.0) == LoadSnapshot(running=1, waiting=0, kv_usage=0.5, capacity_tokens=64_000)
    # The figures go stale; the pool's size does not (it is configuration, not load).
    assert load.snapshot(A, now=6.0) == LoadSnapshot(capacity_tokens=64_000)
    load.update_engine(A, 2, 0, 0.25, now=7.0)  # a report without it keeps the last one
    assert load.snapshot(A, now=7.0).capacity_tokens == 64_000
    with pytest.raises(ValueError, match="capacity_tokens must be a non-negative integer"):
        load.update_engine(A, 1, 0, 0.5, capacity_tokens=-1)
    load.remove_worker("a")
    assert load.snapshot(A, now=7.0) is IDLE


def test_blocks_freed_since_the_engines_report_are_not_held_any_more():
    load = tracker()
    load.begin("r1", A, 640, 640, 10, now=1.0)
    load.begin("r2", A, 640, 640, 10, now=1.0)
    load.update_engine(A, 2, 0, 0.5, now=2.0)  # its usage counts r1 and r2
    load.begin("r3", A, 64, 64, 1, now=3.0)  # sent after the report: not in its usage
    load.prefill_done("r2", now=3.0)
    load.add_remote("gw-b", [RemoteRequest("x", A, 64, 1)], now=1.0)
    load.add_remote("gw-b", [RemoteRequest("x", A, 0, 1)], now=3.0)  # an update, not a finish
    assert load.snapshot(A, now=3.0).freed_blocks == 0
    load.finish("r1")
    load.finish("r3")  # began after the report: its blocks were never in the usage
    assert load.snapshot(A, now=3.0).freed_blocks == 10
    load.remove_remote("gw-b")  # sent before the report: freed
    assert load.snapshot(A, now=3.0).freed_blocks == 11
    load.update_engine(A, 1, 0, 0.2, now=4.0)  # a new report counts only what runs now
    assert load.snapshot(A, now=4.0).freed_blocks == 0
