"""Engine-reported load in: the one way a worker's own figures reach the ``LoadTracker``.

Both sources of engine load, the gateway's scrape of a worker's ``/metrics`` and the
sidecars' load messages over NATS, call ``EngineLoadFeed.report``. A report is ignored
(and counted) when the registry does not know its worker or rank (a scrape racing the
worker's removal, a message from a worker not registered yet), when it was measured
longer than ``engine_stale_after`` ago (a message that waited in a buffer is worth less
than none), or when its figures are invalid.

Never reads the network and never decides anything from the load; the tracker keeps it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from kvgate.protocol.events import WorkerKey
from kvgate.router.load import LoadTracker
from kvgate.router.registry import WorkerRegistry

__all__ = ["EngineLoadFeed"]

log = logging.getLogger(__name__)


class EngineLoadFeed:
    """Validates engine load reports against the registry and writes them into the tracker."""

    def __init__(
        self, load: LoadTracker, registry: WorkerRegistry, *, wall_clock: Callable[[], float] = time.time
    ) -> None:
        self.load = load
        self.registry = registry
        self.wall_clock = wall_clock
        self.received = 0
        self.ignored = 0

    def report(
        self,
        key: WorkerKey,
        running: int,
        waiting: int,
        kv_usage: float,
        measured_at: float | None = None,
        capacity_tokens: int | None = None,
    ) -> bool:
        """``key``'s engine runs ``running``, queues ``waiting``, fills ``kv_usage`` of its KV cache
        (``capacity_tokens`` of GPU KV pool, when known).

        ``measured_at``: wall-clock time of the measurement (None: just now). True when applied.
        """
        self.received += 1
        info = self.registry.get(key.worker_id)
        if (
            info is None
            or key.dp_rank >= info.dp_size
            or (measured_at is not None and self.wall_clock() - measured_at > self.load.engine_stale_after)
        ):
            self.ignored += 1
            return False
        try:
            self.load.update_engine(key, running, waiting, kv_usage, capacity_tokens=capacity_tokens)
        except ValueError as err:
            self.ignored += 1
            log.warning("ignored load of %s: %s", key.worker_id, err)
            return False
        return True
