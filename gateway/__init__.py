"""kvgate gateway: the OpenAI-compatible HTTP front door (see gateway/README.md).

Owns the aiohttp app, request validation, tokenization, forwarding with retries, the
SSE relay, the fleet's health / load / event feeds (ZMQ, or NATS with etcd discovery
and in-flight load shared between replicas) and the ``kvgate_*`` metrics; plus the
one-command launchers (``demo``: embedded mode, ``cluster``: etcd + NATS + replicas).
It never scores workers (``router``) nor decodes engine bytes (``indexer``); nothing
imports it.
"""
