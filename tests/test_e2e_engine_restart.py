"""An engine SIGKILLed and restarted on the same ports is never routed on its old blocks.

Real processes: a ``worker.sim`` engine, a gateway polling its health at the default
interval. The restarted engine comes back empty with its event seqs from 0; the gateway
saw it go down, forgot its index, and predicts no overlap before any request reaches it.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from tests.helpers import wait_http, wait_until
from tests.test_e2e_gateway import explain, get, metric, metrics, overlap_of, post, start_gateway, start_worker

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_a_restarted_engine_is_routed_on_nothing_of_its_old_cache(tmp_path: Path) -> None:
    worker = start_worker("w0", tmp_path)
    gateway = start_gateway("restart", tmp_path, worker.flag(), "--health-interval", "0.5")
    try:
        wait_http(worker.url + "/health", proc=worker.proc)
        wait_http(gateway.url + "/health", timeout=60, proc=gateway.proc)
        system = "You are the restart assistant. " + " ".join(f"fact {i} is worth keeping." for i in range(80))
        body = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": "Hi"}], "max_tokens": 4}
        status, _, _ = post(gateway.url + "/v1/chat/completions", body)
        assert status == 200
        wait_until(lambda: overlap_of(explain(gateway, body), "w0")["blocks"] > 0, "w0's blocks indexed")

        worker.proc.kill(signal.SIGKILL)
        time.sleep(1.0)  # a restart that takes a second
        worker.proc.start()
        wait_http(worker.url + "/health", proc=worker.proc)
        wait_until(lambda: json.loads(get(gateway.url + "/health")[2])["workers"]["w0"], "w0 up again")
        # Before any request went there: nothing of the old engine is left to route on.
        assert overlap_of(explain(gateway, body), "w0")["blocks"] == 0
        assert metric(metrics(gateway.url), "kvgate_worker_engine_losses_total", worker="w0") == 1

        status, _, payload = post(gateway.url + "/v1/chat/completions", body)
        assert status == 200 and json.loads(payload)["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        # Neither request was routed on a block: the first was new, the second found the old ones gone.
        assert metric(metrics(gateway.url), "kvgate_overlap_blocks_total", worker="w0") == 0
        # The new engine's own events take its index up again.
        wait_until(lambda: overlap_of(explain(gateway, body), "w0")["blocks"] > 0, "the new engine's blocks indexed")
    finally:
        gateway.proc.stop()
        worker.proc.stop()
