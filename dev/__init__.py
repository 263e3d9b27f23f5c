"""kvgate dev tooling: child-process launchers, the one-command demo and cluster, the gateway benchmark.

``launch`` (free ports, ``Service``: start in its own session, wait for health, stop by
PID), ``demo`` (``python -m kvgate.dev.demo``: simulated workers + the gateway),
``cluster`` (``python -m kvgate.dev.cluster``: etcd + NATS + workers with sidecars +
gateway replicas), ``gateway_bench`` (``python -m kvgate.dev.gateway_bench``). Not part
of the serving path: the product packages never import it.
"""
