"""The one-command demo: it serves, the README's curl and SDK calls work, and SIGTERM leaves nothing behind."""

from __future__ import annotations

import json
import re
import signal
import socket
from pathlib import Path

import openai
import pytest

from kvgate.dev.launch import free_port
from tests.helpers import python_module, wait_http, wait_until
from tests.test_e2e_gateway import get, post

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_demo_serves_and_stops_its_workers(tmp_path: Path) -> None:
    port = free_port()
    demo = python_module(
        "kvgate.dev.demo",
        "--workers",
        2,
        "--host",
        "127.0.0.1",
        "--port",
        port,
        "--log-dir",
        tmp_path / "workers",
        # The demo's admin listener on a free port, not port + 1 (which another test may hold).
        "--admin-port",
        0,
        log_path=tmp_path / "demo.log",
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=90, proc=demo)
        status, headers, body = post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            {"model": "kvgate-tiny", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16},
        )
        assert status == 200 and headers["x-kvgate-worker"] in ("w0", "w1")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        stream = client.chat.completions.create(
            model="kvgate-tiny", stream=True, max_tokens=8, messages=[{"role": "user", "content": "Stream, please."}]
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert json.loads(get(f"http://127.0.0.1:{port}/health")[2])["workers"] == {"w0": True, "w1": True}
        worker_ports = [int(p) for p in re.findall(r"worker w\d on http://127\.0\.0\.1:(\d+)", demo.log())]
        assert len(worker_ports) == 2 and all(listening(p) for p in worker_ports)
    finally:
        demo.popen.send_signal(signal.SIGTERM)
        demo.popen.wait(timeout=30)
        demo.stop()
    assert demo.popen.returncode == 0, demo.log()
    wait_until(lambda: not any(listening(p) for p in worker_ports), timeout=10, what="workers stopped")
