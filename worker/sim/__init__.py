"""A simulated vLLM worker: vLLM's OpenAI API and KV-event stream over a simulated engine.

Pure core (no asyncio, no sockets): ``block_pool`` (blocks, reference counts, prefix
cache, LRU eviction, KV events), ``tiers`` (CPU / disk tiers below the GPU: offload
chain, LRU, tier events), ``request`` (a request's tokens, progress and status),
``kv_cache`` (per-request blocks, prefix lookup across tiers), ``scheduler`` (continuous
batching, chunked prefill, preemption), ``timing`` (Dynamo mocker's step-time model
plus tier load times), ``answer`` (deterministic answers, stop strings), ``protocol``
(OpenAI request validation and response shapes), ``prompt`` (chat template +
tokenization as vLLM does it). Edges: ``engine_loop`` (steps in simulated time),
``publisher`` (ZMQ PUB + replay ROUTER), ``metrics`` (Prometheus), ``server``
(aiohttp). Run it with ``python -m kvgate.worker.sim``; measure it with ``python -m
kvgate.worker.sim.bench``. Never imports the gateway or the router; reuses ``indexer`` for
event types and wire encoding.
"""
