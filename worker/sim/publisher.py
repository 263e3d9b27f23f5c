"""vLLM's KV-event publisher: a ZMQ PUB socket plus a ROUTER that replays recent batches.

Each batch goes out as ``(topic, seq u64 BE, msgpack payload)`` with ``seq`` counting
from 0 at every process start (so consumers detect restarts), and is kept in a ring of
the last ``buffer_steps`` batches. A replay request ``[identity, b"", start_seq]`` is
answered with every kept batch whose seq >= start_seq, then the end marker — vLLM's
protocol, framed by ``kvgate.protocol.wire``. Bytes are made only by ``kvgate.protocol.wire``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

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
from kvgate.worker.sim.config import KvEventsConfig

log = logging.getLogger(__name__)


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
        self._pub.bind(config.endpoint)
        self._replay: zmq.asyncio.Socket | None = None
        self._replay_task: asyncio.Task | None = None
        if config.replay_endpoint is not None:
            self._replay = zmq.asyncio.Context.shadow(self._ctx).socket(zmq.ROUTER)
            self._replay.setsockopt(zmq.LINGER, 0)
            self._replay.bind(config.replay_endpoint)

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
                    await self._replay.send_multipart([identity, *encode_replay_reply(seq, payload)])
            await self._replay.send_multipart([identity, *encode_replay_reply(REPLAY_END_SEQ)])

    async def close(self) -> None:
        if self._replay_task is not None:
            self._replay_task.cancel()
            try:
                await self._replay_task
            except asyncio.CancelledError:
                pass
        self._pub.close()
        if self._replay is not None:
            self._replay.close()
        self._ctx.term()
