"""The worker record: what a worker is, as static config and etcd carry it.

``WorkerInfo`` is one worker (base URL, model, block size, data-parallel size, KV-event
endpoints, tiers, metadata), validated on construction. In etcd it lives at
``/kvgate/<namespace>/workers/<worker_id>`` as the JSON of ``WorkerInfo.to_dict()``,
under a lease its sidecar keeps alive (``DEFAULT_LEASE_TTL``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from kvgate.protocol.events import Tier, WorkerKey
from kvgate.protocol.hashing import DEFAULT_BLOCK_SIZE

DEFAULT_LEASE_TTL = 10
KEY_ROOT = "/kvgate"
_HTTP_SCHEMES = ("http", "https")
_ZMQ_SCHEMES = ("tcp", "ipc", "inproc")


class WorkerConfigError(ValueError):
    """A worker description is invalid; the message names the worker and the field."""


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """One worker as discovery describes it. ``base_url`` is kept as given, minus a trailing '/'."""

    worker_id: str
    base_url: str
    model: str
    block_size: int = DEFAULT_BLOCK_SIZE
    dp_size: int = 1
    kv_events_endpoint: str | None = None
    kv_events_replay_endpoint: str | None = None
    tiers: tuple[str, ...] = ("GPU",)
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        wid = self.worker_id
        if not isinstance(wid, str) or not wid or wid != wid.strip() or "#" in wid or "/" in wid:
            # '#' separates the dp rank in WorkerKey's str form, '/' is the etcd key separator.
            raise WorkerConfigError(f"worker id must be a non-empty string without spaces, '#' or '/', got {wid!r}")
        where = f"worker {wid!r}"
        object.__setattr__(self, "base_url", _check_url(where, "base_url", self.base_url, _HTTP_SCHEMES).rstrip("/"))
        if not isinstance(self.model, str):
            raise WorkerConfigError(f"{where}: model must be a string, got {self.model!r}")
        for name in ("block_size", "dp_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise WorkerConfigError(f"{where}: {name} must be an integer >= 1, got {value!r}")
        for name in ("kv_events_endpoint", "kv_events_replay_endpoint"):
            value = getattr(self, name)
            if value is not None:
                _check_url(where, name, value, _ZMQ_SCHEMES)
        if self.kv_events_replay_endpoint is not None and self.kv_events_endpoint is None:
            raise WorkerConfigError(f"{where}: kv_events_replay_endpoint given without kv_events_endpoint")
        object.__setattr__(self, "tiers", _check_tiers(where, self.tiers))
        if not isinstance(self.metadata, Mapping):
            raise WorkerConfigError(f"{where}: metadata must be a mapping, got {type(self.metadata).__name__}")
        object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata)))

    @property
    def keys(self) -> list[WorkerKey]:
        """One routable cache per data-parallel rank."""
        return [WorkerKey(self.worker_id, rank) for rank in range(self.dp_size)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id,
            "base_url": self.base_url,
            "model": self.model,
            "block_size": self.block_size,
            "dp_size": self.dp_size,
            "kv_events_endpoint": self.kv_events_endpoint,
            "kv_events_replay_endpoint": self.kv_events_replay_endpoint,
            "tiers": list(self.tiers),
            "metadata": dict(self.metadata),
        }


def workers_prefix(namespace: str) -> str:
    if not namespace or "/" in namespace:
        raise ValueError(f"namespace must be non-empty and contain no '/', got {namespace!r}")
    return f"{KEY_ROOT}/{namespace}/workers/"


def worker_key(namespace: str, worker_id: str) -> str:
    return workers_prefix(namespace) + worker_id


def encode_worker(info: WorkerInfo) -> bytes:
    return json.dumps(info.to_dict(), sort_keys=True).encode()


def decode_worker(worker_id: str, value: bytes) -> WorkerInfo:
    """The ``WorkerInfo`` a key's JSON value describes; raises ``WorkerConfigError`` if invalid."""
    try:
        record = json.loads(value)
    except (ValueError, UnicodeDecodeError) as err:
        raise WorkerConfigError(f"worker {worker_id!r}: value is not JSON ({err})") from None
    if not isinstance(record, dict):
        raise WorkerConfigError(f"worker {worker_id!r}: value must be a JSON object")
    if record.get("worker_id", worker_id) != worker_id:
        raise WorkerConfigError(f"worker {worker_id!r}: value names worker {record['worker_id']!r}")
    if "base_url" not in record:
        raise WorkerConfigError(f"worker {worker_id!r}: missing base_url")
    fields: dict[str, Any] = {
        k: record[k]
        for k in (
            "base_url",
            "model",
            "block_size",
            "dp_size",
            "kv_events_endpoint",
            "kv_events_replay_endpoint",
            "tiers",
            "metadata",
        )
        if k in record
    }
    fields.setdefault("model", "")
    try:
        return WorkerInfo(worker_id=worker_id, **fields)
    except TypeError as err:
        raise WorkerConfigError(f"worker {worker_id!r}: {err}") from None


def _check_url(where: str, name: str, value: Any, schemes: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise WorkerConfigError(f"{where}: {name} must be a string, got {value!r}")
    try:
        parts = urlsplit(value)
        port = parts.port  # raises ValueError on a non-numeric or out-of-range port
    except ValueError as err:
        raise WorkerConfigError(f"{where}: {name} {value!r} is not a valid URL ({err})") from None
    if parts.scheme in ("ipc", "inproc"):
        ok = parts.scheme in schemes and bool(parts.netloc or parts.path)
    else:
        # ZMQ's tcp transport has no default port; HTTP does.
        ok = parts.scheme in schemes and bool(parts.hostname) and (parts.scheme != "tcp" or port is not None)
    if not ok:
        raise WorkerConfigError(
            f"{where}: {name} must look like {schemes[0]}://host:port "
            f"(scheme one of {', '.join(schemes)}), got {value!r}"
        )
    return value


def _check_tiers(where: str, tiers: Any) -> tuple[str, ...]:
    if isinstance(tiers, str) or not isinstance(tiers, Iterable):
        raise WorkerConfigError(f"{where}: tiers must be a list of GPU / CPU / DISK, got {tiers!r}")
    names: list[str] = []
    for tier in tiers:
        try:
            name = Tier.from_medium(tier).name if isinstance(tier, str) else None
        except ValueError:
            name = None
        if name is None:
            raise WorkerConfigError(f"{where}: unknown tier {tier!r} (expected GPU, CPU or DISK)")
        if name not in names:
            names.append(name)
    if "GPU" not in names:
        raise WorkerConfigError(f"{where}: tiers must include GPU, got {list(tiers)}")
    return tuple(names)
