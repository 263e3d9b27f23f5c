"""kvgate: a KV-cache-aware, OpenAI-compatible gateway for fleets of vLLM workers.

The embedding API routes token lists against a prefix index fed with KV events, with
no HTTP involved::

    from kvgate import KvIndexer, Router, RouterConfig, RouterStored, WorkerInfo, WorkerKey, WorkerRegistry
    from kvgate import sequence_hashes

    indexer = KvIndexer(block_size=64)
    registry = WorkerRegistry([WorkerInfo("w0", "http://10.0.0.5:8000", "m"),
                               WorkerInfo("w1", "http://10.0.0.6:8000", "m")])
    router = Router(RouterConfig(), indexer, registry)
    prompt = list(range(640))
    indexer.apply_router_events(WorkerKey("w1"), [RouterStored(sequence_hashes(prompt, 64))])
    decision = router.route(prompt)   # decision.chosen == WorkerKey("w1"); decision.explain()

Packages: ``kvgate.protocol`` (wire contracts), ``kvgate.indexer``, ``kvgate.router``,
``kvgate.gateway`` (``python -m kvgate.gateway``), ``kvgate.worker`` (``sim``,
``sidecar``), ``kvgate.loadtest``, ``kvgate.dev`` (demo, cluster, launchers, benches).
Names below load on first use, so ``import kvgate`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "AllBlocksCleared": "kvgate.protocol.events",
    "BlockRemoved": "kvgate.protocol.events",
    "BlockStored": "kvgate.protocol.events",
    "EventBatch": "kvgate.protocol.events",
    "RouterCleared": "kvgate.protocol.events",
    "RouterRemoved": "kvgate.protocol.events",
    "RouterStored": "kvgate.protocol.events",
    "Tier": "kvgate.protocol.events",
    "WorkerKey": "kvgate.protocol.events",
    "sequence_hashes": "kvgate.protocol.hashing",
    "WorkerInfo": "kvgate.protocol.worker_record",
    "KvIndexer": "kvgate.indexer.kv_indexer",
    "Match": "kvgate.indexer.index",
    "Decision": "kvgate.router.policies",
    "NoWorkerAvailable": "kvgate.router.policies",
    "Router": "kvgate.router.routing",
    "RouterConfig": "kvgate.router.config",
    "SpeedConfig": "kvgate.router.config",
    "WorkerRegistry": "kvgate.router.registry",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from kvgate.indexer.index import Match as Match
    from kvgate.indexer.kv_indexer import KvIndexer as KvIndexer
    from kvgate.protocol.events import (
        AllBlocksCleared as AllBlocksCleared,
    )
    from kvgate.protocol.events import (
        BlockRemoved as BlockRemoved,
    )
    from kvgate.protocol.events import (
        BlockStored as BlockStored,
    )
    from kvgate.protocol.events import (
        EventBatch as EventBatch,
    )
    from kvgate.protocol.events import (
        RouterCleared as RouterCleared,
    )
    from kvgate.protocol.events import (
        RouterRemoved as RouterRemoved,
    )
    from kvgate.protocol.events import (
        RouterStored as RouterStored,
    )
    from kvgate.protocol.events import (
        Tier as Tier,
    )
    from kvgate.protocol.events import (
        WorkerKey as WorkerKey,
    )
    from kvgate.protocol.hashing import sequence_hashes as sequence_hashes
    from kvgate.protocol.worker_record import WorkerInfo as WorkerInfo
    from kvgate.router.config import RouterConfig as RouterConfig
    from kvgate.router.config import SpeedConfig as SpeedConfig
    from kvgate.router.policies import Decision as Decision
    from kvgate.router.policies import NoWorkerAvailable as NoWorkerAvailable
    from kvgate.router.registry import WorkerRegistry as WorkerRegistry
    from kvgate.router.routing import Router as Router


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvgate' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
