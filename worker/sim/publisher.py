"""vLLM 0.32's KV-event publisher: a ZMQ PUB socket plus a ROUTER that replays recent batches.

Each batch goes out as ``(topic, seq u64 BE, msgpack payload)`` with ``seq`` counting
from 0 at every process start (so consumers detect restarts), and is kept in a ring of
the last ``buffer_steps`` batches. A replay request ``[identity, b"", start_seq]`` is
answered with ``[identity, b"", topic, seq, payload]`` for every kept batch whose seq >=
start_seq, then the end marker ``[identity, b"", b"", -1, b""]`` — vLLM 0.32's framing.

Sockets follow vLLM's rule: the PUB socket binds only a wildcard endpoint
(``tcp://*:P``, a ``::`` host) or an ``ipc://`` / ``inproc://`` one and *connects* to
anything else (``tcp://127.0.0.1:P`` makes the engine connect to a subscriber bound
there); the replay ROUTER always binds. Bytes are made only by ``kvgate.protocol.wire``;
this module never decides what the events are.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

import zmq
import zmq.asyncio

from kvgate.protocol.events import EventBatch
from kvgate.protocol.wire import (
    REPLAY_END_SEQ,
    DecodeError,
    decode_replay_request,
    encode_batch,
    encode_frames,
    encode_replay_reply,
)
from kvgate.tasks import cancel_and_wait
from kvgate.worker.sim.config import KvEventsConfig

log = logging.getLogger(__name__)

# vLLM bounds the queue between its engine and its publisher thread by this; the sim
# publishes from the engine loop itself, with no queue, and only reports vLLM's default.
MAX_QUEUE_SIZE = 100_000


def binds(endpoint: str) -> bool:
    """Whether vLLM's PUB socket binds ``endpoint`` (True) or connects to it (False)."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


def kv_event_sources(config: KvEventsConfig) -> dict[str, dict[str, Any]]:
    """``GET /kv_event_sources`` as vLLM 0.32 answers it: the publisher's config per DP rank
    (the sim is rank 0), endpoints exactly as configured; ``{}`` with events off."""
    if config.endpoint is None:
        return {}
    return {
        "0": {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": config.endpoint,
            "replay_endpoint": config.replay_endpoint,
            "buffer_steps": config.buffer_steps,
            "hwm": config.hwm,
            "max_queue_size": MAX_QUEUE_SIZE,
            "topic": config.topic,
        }
    }


class KvEventPublisher:
    def __init__(self, config: KvEventsConfig) -> None:
        if config.endpoint is None:
            raise ValueError("KvEventPublisher needs an endpoint")
        self.config = config
        self._topic = config.topic.encode()
        self._seq = 0
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)
        self._ctx = zmq.Context()
        # PUB never blocks (it drops at the high-water mark), so a plain socket will do.
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.set_hwm(config.hwm)
        self._replay: zmq.asyncio.Socket | None = None
        self._replay_task: asyncio.Task | None = None
        try:
            if binds(config.endpoint):
                self._pub.bind(config.endpoint)
            else:
                self._pub.connect(config.endpoint)
            if config.replay_endpoint is not None:
                self._replay = zmq.asyncio.Context.shadow(self._ctx).socket(zmq.ROUTER)
                self._replay.setsockopt(zmq.LINGER, 0)
                self._replay.bind(config.replay_endpoint)
        except zmq.ZMQError:
            self._close_sockets()
            raise

    @property
    def next_seq(self) -> int:
        return self._seq

    def start(self) -> None:
        """Serve replay requests (call from the running event loop)."""
        if self._replay is not None and self._replay_task is None:
            self._replay_task = asyncio.get_running_loop().create_task(self._serve_replay())

    def publish(self, batch: EventBatch) -> int:
        """Send one batch; returns its seq."""
        seq = self._seq
        self._seq += 1
        payload = encode_batch(batch, self.config.encoding)
        self._buffer.append((seq, payload))
        self._pub.send_multipart(encode_frames(self._topic, seq, payload))
        return seq

    async def _serve_replay(self) -> None:
        assert self._replay is not None
        while True:
            frames = await self._replay.recv_multipart()
            try:
                identity, start_seq = decode_replay_request(frames)
            except DecodeError as exc:
                log.warning("ignoring malformed replay request: %s", exc)
                continue
            for seq, payload in list(self._buffer):
                if seq >= start_seq:
                    reply = encode_replay_reply(seq, payload, topic=self._topic)
                    await self._replay.send_multipart([identity, *reply])
            await self._replay.send_multipart([identity, *encode_replay_reply(REPLAY_END_SEQ, topic=self._topic)])

    async def close(self) -> None:
        await cancel_and_wait(self._replay_task)
        self._close_sockets()

    def _close_sockets(self) -> None:
        self._pub.close()
        if self._replay is not None:
            self._replay.close()
        self._ctx.term()
