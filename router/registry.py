"""The worker registry: which workers exist right now, and who must hear when that changes.

A discovery source pushes changes in: ``StaticDiscovery`` (the embedded default, a list
from the config file) now, an etcd watcher later, both through ``put`` / ``remove``.
Listeners (the gateway starting / stopping a worker's event source, the router
dropping its index and load state) are told after the registry has changed. The
registry never opens a socket and never decides where a request goes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from kvgate.protocol.events import WorkerKey
from kvgate.protocol.hashing import DEFAULT_BLOCK_SIZE
from kvgate.protocol.worker_record import WorkerConfigError, WorkerInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RegistryChange:
    kind: Literal["added", "removed"]
    worker: WorkerInfo


Listener = Callable[[RegistryChange], None]


class WorkerRegistry:
    """The current set of workers, keyed by id; listeners hear every add and remove."""

    def __init__(self, workers: Iterable[WorkerInfo] = ()) -> None:
        self._workers: dict[str, WorkerInfo] = {}
        self._listeners: list[Listener] = []
        self._keys: list[WorkerKey] | None = None
        for info in workers:
            self.add(info)

    def add(self, info: WorkerInfo) -> None:
        """Add a new worker; an id already present is a configuration error."""
        if info.worker_id in self._workers:
            raise WorkerConfigError(f"duplicate worker id {info.worker_id!r}")
        self._insert(info)

    def put(self, info: WorkerInfo) -> None:
        """Add or replace: what a discovery watch does on every PUT.

        An identical description is a no-op (etcd re-puts on lease refresh). A changed one
        is announced as removed then added, because a new endpoint may be a new engine
        whose cache shares nothing with the old one's.
        """
        old = self._workers.get(info.worker_id)
        if old == info:
            return
        if old is not None:
            self.remove(info.worker_id)
        self._insert(info)

    def remove(self, worker_id: str) -> WorkerInfo | None:
        """Drop a worker; returns what was removed, None if it was unknown (a late DELETE)."""
        info = self._workers.pop(worker_id, None)
        if info is not None:
            self._keys = None
            self._notify(RegistryChange("removed", info))
        return info

    def get(self, worker_id: str) -> WorkerInfo | None:
        return self._workers.get(worker_id)

    def all(self) -> list[WorkerInfo]:
        return [self._workers[wid] for wid in sorted(self._workers)]

    def keys(self) -> list[WorkerKey]:
        """Every (worker, dp rank), sorted; the router's candidate set. Do not mutate."""
        if self._keys is None:
            self._keys = sorted(key for info in self._workers.values() for key in info.keys)
        return self._keys

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` after every change; returns the function that unsubscribes it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def __len__(self) -> int:
        return len(self._workers)

    def __contains__(self, worker_id: object) -> bool:
        return worker_id in self._workers

    def _insert(self, info: WorkerInfo) -> None:
        if not isinstance(info, WorkerInfo):
            raise TypeError(f"expected WorkerInfo, got {type(info).__name__}")
        self._workers[info.worker_id] = info
        self._keys = None
        self._notify(RegistryChange("added", info))

    def _notify(self, change: RegistryChange) -> None:
        # The registry has already changed; one failing listener must not keep the others
        # (e.g. the index cleanup) from hearing about it.
        for listener in list(self._listeners):
            try:
                listener(change)
            except Exception:
                log.exception("registry listener %r failed on %s %s", listener, change.kind, change.worker.worker_id)


class StaticDiscovery:
    """Workers listed in the config file (the embedded default).

    Each entry: ``id``, ``url`` (required); ``model``, ``block_size``, ``dp_size``,
    ``kv_events_endpoint``, ``kv_events_replay_endpoint``, ``tiers``, ``metadata``.
    ``model`` / ``block_size`` default to the gateway's. Everything is validated here,
    so a bad list never reaches a registry half-applied.
    """

    _KEYS = (
        "id",
        "url",
        "model",
        "block_size",
        "dp_size",
        "kv_events_endpoint",
        "kv_events_replay_endpoint",
        "tiers",
        "metadata",
    )

    def __init__(
        self, entries: Sequence[Mapping[str, Any]], *, model: str = "", block_size: int = DEFAULT_BLOCK_SIZE
    ) -> None:
        if isinstance(entries, (str, bytes, Mapping)) or not isinstance(entries, Sequence):
            raise WorkerConfigError(f"workers must be a list of mappings, got {type(entries).__name__}")
        workers: list[WorkerInfo] = []
        seen: set[str] = set()
        for i, entry in enumerate(entries):
            info = self._parse(i, entry, model, block_size)
            if info.worker_id in seen:
                raise WorkerConfigError(f"workers[{i}]: duplicate worker id {info.worker_id!r}")
            seen.add(info.worker_id)
            workers.append(info)
        self.workers: tuple[WorkerInfo, ...] = tuple(workers)

    def apply(self, registry: WorkerRegistry) -> None:
        """Push every listed worker into ``registry`` (as a discovery watch would)."""
        for info in self.workers:
            registry.put(info)

    def registry(self) -> WorkerRegistry:
        registry = WorkerRegistry()
        self.apply(registry)
        return registry

    @classmethod
    def _parse(cls, i: int, entry: Any, model: str, block_size: int) -> WorkerInfo:
        where = f"workers[{i}]"
        if not isinstance(entry, Mapping):
            raise WorkerConfigError(f"{where} must be a mapping, got {type(entry).__name__}")
        unknown = sorted(str(k) for k in entry if k not in cls._KEYS)
        if unknown:
            raise WorkerConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(cls._KEYS)}")
        for required in ("id", "url"):
            if required not in entry:
                raise WorkerConfigError(f"{where}: missing required key {required!r}")
        try:
            return WorkerInfo(
                worker_id=entry["id"],
                base_url=entry["url"],
                model=entry.get("model", model),
                block_size=entry.get("block_size", block_size),
                dp_size=entry.get("dp_size", 1),
                kv_events_endpoint=entry.get("kv_events_endpoint"),
                kv_events_replay_endpoint=entry.get("kv_events_replay_endpoint"),
                tiers=entry.get("tiers", ("GPU",)),
                metadata=entry.get("metadata", {}),
            )
        except WorkerConfigError as err:
            raise WorkerConfigError(f"{where}: {err}") from None
