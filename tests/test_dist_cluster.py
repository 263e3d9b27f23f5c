"""The one-command deployment: ``python -m kvgate.dev.cluster`` starts etcd, NATS, three simulated
workers with sidecars and two gateways, each gateway serves a chat, SIGTERM stops everything."""

from __future__ import annotations

import json
import re
import signal
import socket
from pathlib import Path

import pytest

from tests.helpers import python_module, wait_until
from tests.test_e2e_gateway import MODEL, get, post

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_cluster_command_serves_through_every_gateway_and_stops_everything(tmp_path: Path) -> None:
    cluster = python_module(
        "kvgate.dev.cluster",
        "--gateways",
        2,
        "--workers",
        3,
        "--port",
        0,
        "--lease-ttl",
        3,
        "--log-dir",
        tmp_path / "cluster",
        log_path=tmp_path / "cluster.log",
    )
    try:
        wait_until(lambda: "Ctrl-C" in cluster.log() or not cluster.alive(), timeout=120, what="cluster up")
        out = cluster.log()
        assert cluster.alive(), out
        gateways = re.findall(r"gateway\s+(g\d)\s+(http://127\.0\.0\.1:\d+)/v1", out)
        workers = re.findall(r"worker\s+(w\d)\s+http://127\.0\.0\.1:(\d+)\s+\(sidecar http://127\.0\.0\.1:(\d+)", out)
        infra = [int(p) for p in re.findall(r"(?:etcd|nats)\s+\S*127\.0\.0\.1:(\d+)", out)]
        assert [g for g, _ in gateways] == ["g0", "g1"] and [w for w, _, _ in workers] == ["w0", "w1", "w2"], out
        assert len(infra) == 2
        for name, url in gateways:
            health = json.loads(get(url + "/health")[2])
            assert health["workers"] == {"w0": True, "w1": True, "w2": True}
            assert health["discovery"]["connected"] and health["nats"]["router_id"] == name
            status, headers, body = post(
                url + "/v1/chat/completions",
                {"model": MODEL, "messages": [{"role": "user", "content": f"Hello {name}!"}], "max_tokens": 8},
            )
            assert status == 200 and headers["x-kvgate-worker"] in ("w0", "w1", "w2")
            assert json.loads(body)["choices"][0]["message"]["content"]
        ports = [int(url.rsplit(":", 1)[1]) for _, url in gateways] + infra
        ports += [int(p) for _, engine, sidecar in workers for p in (engine, sidecar)]
        assert all(listening(p) for p in ports)
    finally:
        cluster.popen.send_signal(signal.SIGTERM)
        cluster.popen.wait(timeout=60)
        cluster.stop()
    assert cluster.popen.returncode == 0, cluster.log()
    wait_until(lambda: not any(listening(p) for p in ports), timeout=15, what="every process stopped")
