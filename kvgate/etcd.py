"""etcd connections shared by discovery (the gateway) and registration (the sidecar).

``parse_endpoints`` reads ``host:port`` lists; ``Endpoints`` hands out a fresh client
per connection attempt, rotating through the endpoints, with gRPC keepalives that
detect a silently dead etcd. Knows nothing of what is stored.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from urllib.parse import urlsplit

import aetcd

log = logging.getLogger(__name__)

# Keepalive pings detect a silently dead etcd (partition, SIGSTOP) on a watch stream that
# would otherwise wait forever; etcd refuses pings more often than every 5 s by default.
_GRPC_OPTIONS = {
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.keepalive_permit_without_calls": 1,
    "grpc.initial_reconnect_backoff_ms": 200,
    "grpc.max_reconnect_backoff_ms": 2_000,
}


def parse_endpoints(endpoints: str | Sequence[str]) -> list[tuple[str, int]]:
    """``"host:port,host:port"`` (or a list; ``http://`` prefixes allowed) -> [(host, port)]."""
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    parsed: list[tuple[str, int]] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        parts = urlsplit(item if "://" in item else f"http://{item}")
        try:
            port = parts.port or 2379
        except ValueError:
            raise ValueError(f"bad etcd endpoint {item!r}") from None
        if not parts.hostname:
            raise ValueError(f"bad etcd endpoint {item!r}")
        parsed.append((parts.hostname, port))
    if not parsed:
        raise ValueError("at least one etcd endpoint is required")
    return parsed


class Endpoints:
    """Round-robin over etcd endpoints; a fresh client per connection attempt."""

    def __init__(self, endpoints: str | Sequence[str], timeout: float) -> None:
        self.endpoints = parse_endpoints(endpoints)
        self.timeout = timeout
        self._next = random.randrange(len(self.endpoints))

    def client(self) -> aetcd.Client:
        host, port = self.endpoints[self._next % len(self.endpoints)]
        self._next += 1
        return aetcd.Client(host=host, port=port, timeout=self.timeout, options=dict(_GRPC_OPTIONS))


async def close_client(client: aetcd.Client | None) -> None:
    if client is None:
        return
    try:
        await client.close()
    except Exception as exc:  # closing a broken channel can itself fail; nothing to keep
        log.debug("etcd client close: %s", exc)
