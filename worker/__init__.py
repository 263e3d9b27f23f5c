"""kvgate worker side: what runs beside (or instead of) a vLLM engine.

``worker.sim`` is a simulated vLLM worker — vLLM's OpenAI HTTP API and KV-event stream
over a simulated paged-KV engine — used by the demo, the end-to-end tests and every
benchmark on machines without GPUs. ``worker.sidecar`` runs beside a real vLLM.
Imports only ``indexer``; never the gateway or the router. See worker/README.md.
"""
