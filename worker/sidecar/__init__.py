"""The sidecar that runs beside one vLLM engine (``python -m kvgate.worker.sidecar``).

Registers the worker in etcd while its engine is healthy, relays the engine's ZMQ KV
events to NATS as router-native events, publishes its load, and serves its own
``/health`` and ``/metrics``. See README.md for the contract and data flow.
"""
