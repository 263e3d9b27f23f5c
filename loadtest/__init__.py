"""kvgate load testing: workloads, trace replay, the benchmark orchestrator, reports (see README.md).

Talks to gateways and workers over HTTP only; never imports gateway, router, indexer or worker code.
"""
