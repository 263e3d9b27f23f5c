"""kvgate indexer: block hashing, KV-event wire formats, event sources, the prefix index.

Owns the key scheme (``hashing``), the one place engine bytes are decoded (``wire``),
typed events (``events``), the per-worker, per-tier prefix index (``index``) and the
edges that feed it (``sources``). It never makes routing decisions.
"""
