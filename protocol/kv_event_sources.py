"""A vLLM worker's ``GET /kv_event_sources`` answer -> where a subscriber finds its KV events.

vLLM (0.32) answers ``{"<dp_rank>": {"enable_kv_cache_events", "publisher", "endpoint",
"replay_endpoint", "topic", ...}}``, each endpoint exactly as configured (ports already
offset by the rank). A wildcard host (``*``, ``0.0.0.0``, ``::``) means "this machine",
so a subscriber elsewhere reaches it at the worker URL's host: ``parse_kv_event_sources``
puts that host in its place. vLLM binds its PUB socket only for ``*`` or ``::`` (and
``ipc://``); for any other TCP host it *connects* instead and no subscriber will ever
hear it, so such live endpoints are kept as given but also reported in
``EventSources.connecting`` (the replay ROUTER always binds). ``{}``, a disabled
publisher or a non-ZMQ one mean the worker publishes no events a subscriber can reach
(``None``).

Pure: JSON in, endpoints out; never fetches the page.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

WILDCARD_HOSTS = frozenset({"*", "0.0.0.0", "::", "[::]"})
BINDING_HOSTS = frozenset({"*", "::", "[::]"})
"""The TCP hosts for which vLLM binds its PUB socket; for any other it connects."""


class KvEventSourcesError(ValueError):
    """The answer is not the shape vLLM gives."""


@dataclass(frozen=True, slots=True)
class RankSource:
    """One data-parallel rank's publisher, as a subscriber on another host reaches it."""

    endpoint: str
    replay_endpoint: str | None
    topic: str


@dataclass(frozen=True, slots=True)
class EventSources:
    """Every rank's publisher, by rank (0, 1, ...)."""

    ranks: tuple[RankSource, ...]
    connecting: tuple[str, ...] = ()
    """Live endpoints as configured for which vLLM connects rather than binds (nobody hears them)."""


def parse_kv_event_sources(base_url: str, answer: Any) -> EventSources | None:
    """The endpoints of the worker at ``base_url`` from its ``/kv_event_sources`` JSON; None: it publishes none."""
    if not isinstance(answer, Mapping):
        raise KvEventSourcesError(f"expected a JSON object, got {type(answer).__name__}")
    host = urlsplit(base_url).hostname
    if not host:
        raise KvEventSourcesError(f"no host in worker URL {base_url!r}")
    if ":" in host:
        host = f"[{host}]"  # an IPv6 literal, bracketed as a ZMQ endpoint needs it
    by_rank: dict[int, RankSource] = {}
    connecting: list[str] = []
    for key, entry in answer.items():
        try:
            rank = int(key)
        except (TypeError, ValueError):
            raise KvEventSourcesError(f"rank key {key!r} is not an integer") from None
        if not isinstance(entry, Mapping):
            raise KvEventSourcesError(f"rank {rank}: expected an object, got {type(entry).__name__}")
        if entry.get("enable_kv_cache_events") is False or entry.get("publisher", "zmq") != "zmq":
            continue
        endpoint = entry.get("endpoint")
        if not isinstance(endpoint, str) or not endpoint:
            raise KvEventSourcesError(f"rank {rank}: no endpoint")
        replay = entry.get("replay_endpoint")
        if replay is not None and not isinstance(replay, str):
            raise KvEventSourcesError(f"rank {rank}: replay_endpoint must be a string or null")
        topic = entry.get("topic", "")
        if not isinstance(topic, str):
            raise KvEventSourcesError(f"rank {rank}: topic must be a string")
        if endpoint.startswith("tcp://") and _tcp_host(endpoint) not in BINDING_HOSTS:
            connecting.append(endpoint)
        by_rank[rank] = RankSource(_reachable(endpoint, host), _reachable(replay, host) if replay else None, topic)
    if not by_rank:
        return None
    if sorted(by_rank) != list(range(len(by_rank))):
        raise KvEventSourcesError(f"ranks {sorted(by_rank)} are not 0..{len(by_rank) - 1}")
    return EventSources(tuple(by_rank[r] for r in range(len(by_rank))), tuple(connecting))


def _tcp_host(endpoint: str) -> str:
    return endpoint[len("tcp://") :].rpartition(":")[0]


def _reachable(endpoint: str, host: str) -> str:
    """``endpoint`` with a wildcard TCP host replaced by ``host``; anything else as given."""
    if not endpoint.startswith("tcp://"):
        return endpoint
    bound, _, port = endpoint[len("tcp://") :].rpartition(":")
    if bound in WILDCARD_HOSTS:
        return f"tcp://{host}:{port}"
    return endpoint
