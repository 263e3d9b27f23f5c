"""The NATS connection and a typed publish / subscribe over ``kvgate.protocol.messages``.

``connect_nats`` opens a client that waits for the server and reconnects forever;
``Bus`` publishes and subscribes the namespace's messages, decoding on the way in and
counting (never raising on) malformed payloads. Shared by the gateway (events, load,
replica sync) and the sidecar (events, load, resync). Carries bytes; decides nothing.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from kvgate.protocol.messages import (
    ActiveMessage,
    BusDecodeError,
    EventsMessage,
    LoadMessage,
    ResyncRequest,
    Subjects,
    decode_active,
    decode_events,
    decode_load,
    decode_resync,
    encode_active,
    encode_events,
    encode_load,
    encode_resync,
)

log = logging.getLogger(__name__)

_M = TypeVar("_M")


async def connect_nats(
    url: str | Sequence[str],
    *,
    name: str,
    on_reconnected: Callable[[], Awaitable[None]] | None = None,
    on_disconnected: Callable[[], Awaitable[None]] | None = None,
    reconnect_time_wait: float = 0.5,
) -> Client:
    """A nats-py client that never gives up: waits for the server at start, reconnects forever.

    ``url``: one server, a comma-separated list, or a sequence of URLs.

    Publishes made while disconnected are buffered (up to nats-py's pending size) and
    flushed on reconnect; subscriptions are restored by nats-py itself.
    """
    servers = [u.strip() for u in url.split(",") if u.strip()] if isinstance(url, str) else list(url)

    async def error_cb(exc: Exception) -> None:
        log.debug("nats %s: %s", name, exc)

    async def reconnected_cb() -> None:
        log.info("nats %s: reconnected", name)
        if on_reconnected is not None:
            await on_reconnected()

    async def disconnected_cb() -> None:
        log.info("nats %s: disconnected", name)
        if on_disconnected is not None:
            await on_disconnected()

    return await nats.connect(
        servers,
        name=name,
        allow_reconnect=True,
        max_reconnect_attempts=-1,
        reconnect_time_wait=reconnect_time_wait,
        connect_timeout=2,
        ping_interval=5,
        max_outstanding_pings=2,
        error_cb=error_cb,
        reconnected_cb=reconnected_cb,
        disconnected_cb=disconnected_cb,
    )


class Bus:
    """Typed publish / subscribe over one NATS connection for one namespace."""

    def __init__(self, nc: Client, namespace: str = "default") -> None:
        self.nc = nc
        self.subjects = Subjects(namespace)
        self.rejected: Counter[str] = Counter()
        self._subs: list[Subscription] = []

    async def publish_events(self, msg: EventsMessage) -> None:
        await self.nc.publish(self.subjects.events(msg.worker_id), encode_events(msg))

    async def publish_load(self, msg: LoadMessage) -> None:
        await self.nc.publish(self.subjects.load(msg.worker_id), encode_load(msg))

    async def publish_active(self, msg: ActiveMessage) -> None:
        await self.nc.publish(self.subjects.active(msg.router_id), encode_active(msg))

    async def request_resync(self, worker_id: str, requester: str = "") -> None:
        msg = ResyncRequest(worker_id=worker_id, requester=requester)
        await self.nc.publish(self.subjects.resync(worker_id), encode_resync(msg))

    # Each ``on_*`` returns the nats-py subscription; ``unsubscribe`` ends it, ``close`` ends all.

    async def on_events(self, callback: Callable[[EventsMessage], None]) -> Subscription:
        return await self._subscribe(self.subjects.all_events, decode_events, callback)

    async def on_load(self, callback: Callable[[LoadMessage], None]) -> Subscription:
        return await self._subscribe(self.subjects.all_load, decode_load, callback)

    async def on_active(self, callback: Callable[[ActiveMessage], None]) -> Subscription:
        return await self._subscribe(self.subjects.all_active, decode_active, callback)

    async def on_resync(self, worker_id: str, callback: Callable[[ResyncRequest], None]) -> Subscription:
        return await self._subscribe(self.subjects.resync(worker_id), decode_resync, callback)

    async def unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subs:
            self._subs.remove(sub)
        try:
            await sub.unsubscribe()
        except Exception as exc:  # a closed connection has nothing left to unsubscribe
            log.debug("unsubscribe: %s", exc)

    async def close(self) -> None:
        """Unsubscribe everything this Bus subscribed; the connection stays the caller's."""
        for sub in list(self._subs):
            await self.unsubscribe(sub)

    async def _subscribe(
        self, subject: str, decode: Callable[[bytes], _M], callback: Callable[[_M], None]
    ) -> Subscription:
        async def handler(msg: Msg) -> None:
            try:
                decoded = decode(msg.data)
            except BusDecodeError as err:
                self.rejected[err.kind] += 1
                log.warning("dropped a bad message on %s: %s", msg.subject, err)
                return
            try:
                callback(decoded)
            except Exception:
                log.exception("bus callback for %s failed", msg.subject)

        sub = await self.nc.subscribe(subject, cb=handler)
        self._subs.append(sub)
        return sub
