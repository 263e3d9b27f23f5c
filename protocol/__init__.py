"""kvgate protocol: the wire contracts every other package shares, and nothing else.

* ``events``: typed engine events (vLLM / SGLang) and router-native events, ``Tier``,
  ``WorkerKey``;
* ``hashing``: the router's block key scheme (Dynamo-compatible);
* ``wire``: engine bytes -> typed events, and the ZMQ live / replay framing (the only
  decoder of engine bytes);
* ``messages``: NATS subjects and the codecs of the events, load, active and resync
  messages;
* ``engine_metrics``: vLLM's ``/metrics`` page read as per-rank engine load;
* ``worker_record``: ``WorkerInfo`` and its etcd key and JSON value.

Pure: no sockets, no clients, no asyncio. Everything imports it; it imports nothing of
kvgate's. See protocol/README.md.
"""
