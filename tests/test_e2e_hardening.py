"""End to end, real processes: a gzip body reaches a ``worker.sim`` decoded, and a worker
killed mid-stream makes the OpenAI SDK raise ``APIError`` instead of hanging or ending quietly."""

from __future__ import annotations

import gzip
import json
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from tests.helpers import wait_http, wait_until
from tests.test_e2e_gateway import MODEL, Gateway, Worker, get, post, start_gateway, start_worker, stop_all

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@dataclass
class Pair:
    worker: Worker
    gateway: Gateway


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    worker = start_worker("w0", tmp_path)
    procs = [worker.proc]
    try:
        wait_http(worker.url + "/health", timeout=60, proc=worker.proc)
        gateway = start_gateway("hardening", tmp_path, worker.flag())
        procs.append(gateway.proc)
        wait_http(gateway.url + "/health", timeout=60, proc=gateway.proc)
        yield Pair(worker, gateway)
    finally:
        stop_all(*procs)


def test_a_gzip_body_is_decoded_and_served(pair: Pair) -> None:
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "zipped"}], "max_tokens": 4})
    status, headers, payload = post(
        pair.gateway.url + "/v1/chat/completions", gzip.compress(body.encode()), {"Content-Encoding": "gzip"}
    )
    assert status == 200, payload
    assert json.loads(payload)["usage"]["completion_tokens"] == 4
    assert headers["server"] == "kvgate"


def test_the_sdk_raises_when_the_worker_is_killed_mid_stream(pair: Pair) -> None:
    client = openai.OpenAI(base_url=pair.gateway.url + "/v1", api_key="unused", max_retries=0, timeout=30)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "A long answer, please."}],
        max_tokens=4000,
        extra_body={"ignore_eos": True},
        stream=True,
    )
    received = 0
    with pytest.raises(openai.APIError) as raised:
        for _ in stream:
            received += 1
            if received == 3:
                pair.worker.proc.kill(signal.SIGKILL)
    assert received >= 3
    assert raised.value.message == "worker w0 dropped the connection mid-stream"
    assert raised.value.body == {
        "message": "worker w0 dropped the connection mid-stream",
        "type": "upstream_error",
        "param": None,
        "code": 502,
    }
    # The gateway keeps serving: the dead worker shows in /health.
    wait_until(lambda: json.loads(get(pair.gateway.url + "/health")[2])["workers"] == {"w0": False}, "w0 down")
