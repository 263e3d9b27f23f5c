"""kvgate router: which worker serves a request, and why.

Owns the routing policies (``kv``, ``round-robin``, ``random``) and the ``kv`` cost model
(``policies``), their typed configuration (``config``), active-load tracking
(``load``; its writers: a request's ``lifecycle.InFlight`` handle, the gateway's replica
sync, ``engine_load.EngineLoadFeed``), the worker registry and its discovery sources
(``registry``, ``discovery``), the bookkeeping of predicted against reported cached
tokens per worker (``accounting``) and the facade the gateway calls (``routing.Router``).
Data enters as token ids (or block hashes), the index's matches and lifecycle calls on
``InFlight`` handles; it leaves as a ``Decision`` that can explain itself. Never serves
HTTP, never decodes engine bytes, never writes the index except to drop a worker that
left discovery. See router/README.md.
"""
