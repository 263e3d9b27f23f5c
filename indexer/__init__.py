"""kvgate indexer: what each worker caches, per tier, fed by the workers' KV events.

Owns the per-worker, per-tier prefix index (``index``), engine-hash translation
(``translation``), seq ordering and recovery (``recovery``), the per-rank event
pipeline (``pipeline``), the facade (``kv_indexer.KvIndexer``) and the transport
adapters that feed it (``zmq_source`` from engines, ``nats_source`` from sidecars).
Wire formats come from ``kvgate.protocol``. It never makes routing decisions.
"""
