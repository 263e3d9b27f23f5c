"""The simulated worker's ZMQ publisher in process: vLLM 0.32's bind/connect rule, replay
framing and ``/kv_event_sources`` body, over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from kvgate.dev.launch import free_port
from kvgate.protocol.events import BlockStored, EventBatch
from kvgate.protocol.wire import decode_batch, decode_frames, encode_batch, encode_replay_request
from kvgate.worker.sim.config import KvEventsConfig
from kvgate.worker.sim.publisher import KvEventPublisher, binds, kv_event_sources
from tests.helpers import until

END_MARKER = [b"", b"", b"\xff" * 8, b""]


def batch(n: int) -> EventBatch:
    return EventBatch(float(n), [BlockStored([n], None, [n] * 4, 4)], 0)


@pytest.fixture
async def ctx() -> AsyncIterator[zmq.asyncio.Context]:
    context = zmq.asyncio.Context()
    try:
        yield context
    finally:
        context.destroy(linger=0)


@pytest.fixture
async def publishers() -> AsyncIterator[Callable[..., KvEventPublisher]]:
    made: list[KvEventPublisher] = []

    def make(**config: object) -> KvEventPublisher:
        publisher = KvEventPublisher(KvEventsConfig(**config))  # type: ignore[arg-type]
        made.append(publisher)
        publisher.start()
        return publisher

    try:
        yield make
    finally:
        for publisher in made:
            await publisher.close()


def sub_socket(ctx: zmq.asyncio.Context) -> zmq.asyncio.Socket:
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.setsockopt(zmq.LINGER, 0)
    return sock


async def receive_while_publishing(sock: zmq.asyncio.Socket, publisher: KvEventPublisher) -> tuple[bytes, int, bytes]:
    """Publish until the SUB socket hears a batch (ZMQ's slow joiner drops the first ones)."""
    got: list[list[bytes]] = []

    async def step() -> None:
        publisher.publish(batch(publisher.next_seq))
        try:
            got.append(await asyncio.wait_for(sock.recv_multipart(), 0.05))
        except TimeoutError:
            pass

    await until(lambda: bool(got), "no batch reached the subscriber", 10.0, step=step)
    return decode_frames(got[0])


@pytest.mark.parametrize(
    ("endpoint", "bound"),
    [
        ("tcp://*:5557", True),
        ("tcp://[::]:5557", True),
        ("ipc:///tmp/kv.sock", True),
        ("inproc://kv", True),
        ("tcp://127.0.0.1:5557", False),
        ("tcp://10.0.0.5:5557", False),
        ("tcp://localhost:5557", False),
    ],
)
def test_pub_binds_only_what_vllm_binds(endpoint: str, bound: bool) -> None:
    assert binds(endpoint) is bound


async def test_a_host_endpoint_connects_to_a_bound_subscriber(ctx, publishers) -> None:
    port = free_port()
    sock = sub_socket(ctx)
    sock.bind(f"tcp://127.0.0.1:{port}")  # had the publisher bound the port, one of us would fail
    publisher = publishers(endpoint=f"tcp://127.0.0.1:{port}", topic="kv-events")
    topic, seq, payload = await receive_while_publishing(sock, publisher)
    assert topic == b"kv-events" and decode_batch(payload) == batch(seq)


async def test_a_wildcard_endpoint_binds(ctx, publishers) -> None:
    port = free_port()
    publisher = publishers(endpoint=f"tcp://*:{port}")
    taken = ctx.socket(zmq.PUB)
    with pytest.raises(zmq.ZMQError):
        taken.bind(f"tcp://127.0.0.1:{port}")
    taken.close(linger=0)
    sock = sub_socket(ctx)
    sock.connect(f"tcp://127.0.0.1:{port}")
    topic, seq, payload = await receive_while_publishing(sock, publisher)
    assert topic == b"" and decode_batch(payload) == batch(seq)


async def test_an_ipc_endpoint_binds(ctx, publishers, tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/kv.sock"
    publisher = publishers(endpoint=endpoint)
    sock = sub_socket(ctx)
    sock.connect(endpoint)
    _, seq, payload = await receive_while_publishing(sock, publisher)
    assert decode_batch(payload) == batch(seq)


async def dealer_replies(ctx: zmq.asyncio.Context, endpoint: str, start_seq: int) -> list[list[bytes]]:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    await sock.send_multipart([b"", encode_replay_request(start_seq)])
    out: list[list[bytes]] = []
    while not out or out[-1] != END_MARKER:
        out.append(await asyncio.wait_for(sock.recv_multipart(), 10.0))
    sock.close()
    return out


async def test_the_replay_router_binds_a_host_endpoint_and_answers_in_vllm_032_framing(ctx, publishers) -> None:
    events_port, replay = free_port(), f"tcp://127.0.0.1:{free_port()}"
    publisher = publishers(
        endpoint=f"tcp://127.0.0.1:{events_port}", replay_endpoint=replay, topic="kv-events", buffer_steps=3
    )
    payloads = [encode_batch(batch(n)) for n in range(5)]
    for n in range(5):
        assert publisher.publish(batch(n)) == n
    # The ring keeps the last three batches: a replay from 0 gets seq 2..4, then the end.
    assert await dealer_replies(ctx, replay, 0) == [
        *([b"", b"kv-events", seq.to_bytes(8, "big"), payloads[seq]] for seq in (2, 3, 4)),
        END_MARKER,
    ]
    assert await dealer_replies(ctx, replay, 4) == [
        [b"", b"kv-events", (4).to_bytes(8, "big"), payloads[4]],
        END_MARKER,
    ]
    assert await dealer_replies(ctx, replay, 5) == [END_MARKER]
    assert await dealer_replies(ctx, replay, 2**63) == [END_MARKER]


def test_kv_event_sources_reports_the_config_as_vllm_032_does() -> None:
    assert kv_event_sources(KvEventsConfig()) == {}
    assert kv_event_sources(KvEventsConfig(endpoint="tcp://127.0.0.1:15559")) == {
        "0": {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": "tcp://127.0.0.1:15559",
            "replay_endpoint": None,
            "buffer_steps": 10000,
            "hwm": 100000,
            "max_queue_size": 100000,
            "topic": "",
        }
    }
