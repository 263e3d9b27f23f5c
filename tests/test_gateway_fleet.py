"""The gateway follows its registry: a worker's events reach the index over real ZMQ, and a
worker that leaves takes its event source, health state and index blocks with it; what an
idle worker published before the gateway subscribed is caught up from its replay socket."""

from __future__ import annotations

import asyncio

import pytest
import zmq
import zmq.asyncio

from kvgate.dev.launch import free_port
from kvgate.gateway.app import Gateway
from kvgate.gateway.config import config_from_dict, load_config
from kvgate.protocol.events import BlockStored, EventBatch, WorkerKey
from kvgate.protocol.wire import encode_batch, encode_frames
from kvgate.protocol.worker_record import WorkerInfo
from tests.helpers import TINY_MODEL, until
from tests.test_zmq_source import Publisher, tcp


async def test_registry_changes_start_and_stop_sources_and_drop_index_state() -> None:
    events_port = free_port()
    gateway = Gateway(config_from_dict({"model": str(TINY_MODEL), "health_interval": 60.0}))
    ctx = zmq.asyncio.Context()
    pub = ctx.socket(zmq.PUB)
    pub.bind(f"tcp://127.0.0.1:{events_port}")
    await gateway.start()
    try:
        gateway.registry.put(
            WorkerInfo(
                "w9",
                f"http://127.0.0.1:{free_port()}",
                "kvgate-tiny",
                kv_events_endpoint=f"tcp://127.0.0.1:{events_port}",
            )
        )
        assert set(gateway.fleet.sources) == {"w9"} and gateway.fleet.up == {"w9": False}
        batch = EventBatch(0.0, [BlockStored([11, 12], None, list(range(128)), 64)], 0)
        seq = 0
        # PUB/SUB drops what is sent before the subscription lands; send until it is applied.
        while not gateway.indexer.block_counts():
            await pub.send_multipart(encode_frames(b"", seq, encode_batch(batch)))
            seq += 1
            await asyncio.sleep(0.05)
            assert seq < 200, "events never reached the index"
        assert gateway.indexer.block_counts() == {WorkerKey("w9"): (2, 0, 0)}
        assert 'kvgate_index_blocks{dp_rank="0",tier="GPU",worker="w9"} 2.0' in gateway.metrics.render().decode()

        gateway.registry.remove("w9")
        assert gateway.indexer.block_counts() == {}
        assert gateway.fleet.sources == {} and gateway.fleet.up == {}
        assert gateway.fleet.down_keys == frozenset()
    finally:
        await gateway.stop()
        pub.close(linger=0)
        ctx.term()


async def test_an_idle_workers_batch_published_before_the_gateway_subscribed_is_caught_up() -> None:
    events_port, replay_port = free_port(), free_port()
    config = load_config(
        ["--model", str(TINY_MODEL), "--health-interval", "60", "--events-catch-up-interval", "0.05"], environ={}
    )
    gateway = Gateway(config)
    ctx = zmq.asyncio.Context()
    engine = Publisher(ctx, events_port, replay_port)
    engine.bind()
    await engine.publish(EventBatch(0.0, [BlockStored([11, 12], None, list(range(128)), 64)], 0))  # to nobody
    await gateway.start()
    try:
        gateway.registry.put(
            WorkerInfo(
                "w9",
                f"http://127.0.0.1:{free_port()}",
                "kvgate-tiny",
                kv_events_endpoint=tcp(events_port),
                kv_events_replay_endpoint=tcp(replay_port),
            )
        )
        source = gateway.fleet.sources["w9"]
        assert source.config.catch_up_interval == 0.05
        await until(lambda: gateway.indexer.block_counts() == {WorkerKey("w9"): (2, 0, 0)}, "caught up")
        assert engine.replay_requests[0] == 0 and source.stats.caught_up == 1
    finally:
        await gateway.stop()
        await engine.close()
        ctx.destroy(linger=0)


def test_events_catch_up_interval_comes_from_env_and_is_checked() -> None:
    assert load_config([], environ={"KVGATE_EVENTS_CATCH_UP_INTERVAL": "0"}).events_catch_up_interval == 0.0
    assert load_config([], environ={}).events_catch_up_interval == 2.0
    with pytest.raises(ValueError, match="events_catch_up_interval"):
        config_from_dict({"events_catch_up_interval": -1.0})
