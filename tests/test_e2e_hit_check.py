"""Hit accounting end to end: a gateway in this process, simulated workers in theirs.

Each answer's reported cached tokens are compared with what the index predicted for the
worker that served it. A worker whose engine uses another block size than the gateway
(its events are all rejected, its hits never predicted) is distrusted within the window,
while a correct worker beside it stays trusted with every answer predicted exactly; a
worker whose index claims prompts its engine never saw is distrusted too, then trusted
again once a window of its answers agrees with what its index would have said.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from kvgate.dev.launch import free_port
from kvgate.gateway.app import GATEWAY_KEY, Gateway, build_app
from kvgate.gateway.config import config_from_dict
from kvgate.protocol.events import RouterStored, WorkerKey
from kvgate.protocol.hashing import sequence_hashes
from tests.helpers import TINY_MODEL, until, wait_http
from tests.test_e2e_gateway import CONTEXT, MODEL, Worker, start_worker, stop_all

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BS = 64
WINDOW, MISMATCHES = 4, 3


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Worker]]:
    log_dir = tmp_path_factory.mktemp("e2e-hit-check")
    extra = ("--speedup-ratio", "20")
    started = {
        "w0": start_worker("w0", log_dir, *extra),
        "w1": start_worker("w1", log_dir, *extra),
        # Misconfigured: the gateway keys 64-token blocks, this engine caches 32-token ones.
        "wbad": start_worker("wbad", log_dir, "--block-size", "32", *extra),
    }
    try:
        for w in started.values():
            wait_http(w.url + "/health", timeout=60, proc=w.proc)
        yield started
    finally:
        stop_all(*(w.proc for w in started.values()))


@asynccontextmanager
async def serving(fleet: list[Worker]):
    config = config_from_dict(
        {
            "model": str(TINY_MODEL),
            "port": free_port(),
            "router_mode": "round-robin",
            "admin_on_public_port": True,
            "context_length": CONTEXT,
            "health_interval": 0.2,
            "prediction_window": WINDOW,
            "prediction_mismatches": MISMATCHES,
            "workers": [
                {
                    "id": w.worker_id,
                    "url": w.url,
                    "kv_events_endpoint": f"tcp://127.0.0.1:{w.events}",
                    "kv_events_replay_endpoint": f"tcp://127.0.0.1:{w.replay}",
                }
                for w in fleet
            ],
        }
    )
    app = build_app(config)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", config.port).start()
    gateway = app[GATEWAY_KEY]
    try:
        await until(lambda: len(gateway.fleet.up) == len(fleet) and all(gateway.fleet.up.values()), "workers up", 30)
        async with aiohttp.ClientSession(f"http://127.0.0.1:{config.port}") as session:
            yield gateway, session
    finally:
        await runner.cleanup()


def chat(system: str, question: str) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
        "max_tokens": 4,
    }


def system_prompt(topic: str) -> str:
    return f"You are the {topic} assistant. " + " ".join(f"{topic} fact {i} is worth remembering." for i in range(60))


async def ask(gateway: Gateway, session: aiohttp.ClientSession, body: dict[str, Any], settle: set[str]) -> str:
    """Send ``body``; once answered by a worker in ``settle``, wait until its events are indexed
    (the next prediction must not race them). Returns the worker that answered."""
    async with session.post("/v1/chat/completions", json=body) as response:
        assert response.status == 200, await response.text()
        worker = response.headers["x-kvgate-worker"]
        usage = (await response.json())["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] is not None
    if worker in settle:
        hashes = sequence_hashes(gateway.preprocessor.encode_chat(body["messages"]), BS)
        key = WorkerKey(worker)

        def indexed() -> bool:
            match = gateway.indexer.find_matches(hashes, include_untrusted=True).get(key)
            return match is not None and match.depth >= len(hashes)

        await until(indexed, f"{worker}'s events for the prompt", 20)
    return worker


def counter(gateway: Gateway, name: str, worker: str) -> float:
    found = gateway.metrics.registry.get_sample_value(name, {"worker": worker})
    return 0.0 if found is None else found


async def test_a_worker_with_another_block_size_is_distrusted_within_the_window_and_a_correct_one_is_not(
    workers: dict[str, Worker], caplog: pytest.LogCaptureFixture
) -> None:
    system = system_prompt("lighthouse")
    answered = {"w0": 0, "wbad": 0}
    alarm_after: int | None = None
    async with serving([workers["w0"], workers["wbad"]]) as (gateway, session):
        with caplog.at_level(logging.WARNING, logger="kvgate.gateway.hit_check"):
            for i in range(10):
                worker = await ask(gateway, session, chat(system, f"Question {i} about lighthouses?"), {"w0"})
                answered[worker] += 1
                if alarm_after is None and not gateway.indexer.trusted("wbad"):
                    alarm_after = answered["wbad"]
        # Its first answer had nothing cached anywhere; each later one hit the shared system
        # prompt on the engine, which the index never learnt of (every event rejected).
        assert alarm_after is not None and alarm_after <= WINDOW, answered
        assert gateway.indexer.stats.rejected["bad_block_size"] > 0
        assert gateway.indexer.trusted("w0")
        checks = counter(gateway, "kvgate_prediction_checks_total", "w0")
        predicted = counter(gateway, "kvgate_predicted_cached_tokens_total", "w0")
        actual = counter(gateway, "kvgate_engine_cached_tokens_total", "w0")
        print(
            f"\nw0 (correct): predicted {predicted:,.0f} / actual {actual:,.0f} cached tokens over {checks:.0f} answers"
        )
        assert checks == answered["w0"] and predicted == actual > 0
        assert counter(gateway, "kvgate_prediction_mismatches_total", "w0") == 0
        assert counter(gateway, "kvgate_prediction_mismatches_total", "wbad") >= MISMATCHES
        assert counter(gateway, "kvgate_predicted_cached_tokens_total", "wbad") == 0
        assert counter(gateway, "kvgate_engine_cached_tokens_total", "wbad") > 0
        async with session.get("/health") as response:
            health = await response.json()
        assert set(health["predictions"]) == {"wbad"} and health["predictions"]["wbad"]["trusted"] is False
        async with session.get("/metrics") as response:
            text = await response.text()
        assert 'kvgate_worker_prediction_trusted{worker="wbad"} 0.0' in text
        assert 'kvgate_worker_prediction_trusted{worker="w0"} 1.0' in text
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "worker wbad" in warnings[0] and "0 over-predicted" in warnings[0]
    assert "block-size or hash mismatch" in warnings[0]


async def test_a_worker_whose_index_claims_what_its_engine_lacks_is_distrusted_then_trusted_again(
    workers: dict[str, Worker], caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    async with serving([workers["w0"], workers["w1"]]) as (gateway, session):
        # w1's index is told it holds prompts its engine never saw (what a missed restart leaves).
        bodies = [chat(system_prompt(f"orchard {i}"), "Which apples keep best?") for i in range(8)]
        for body in bodies:
            hashes = sequence_hashes(gateway.preprocessor.encode_chat(body["messages"]), BS)
            gateway.indexer.apply_router_events(WorkerKey("w1"), [RouterStored(hashes)])
        with caplog.at_level(logging.INFO, logger="kvgate.gateway.hit_check"):
            served_by_w1 = 0
            for body in bodies:
                if await ask(gateway, session, body, {"w0", "w1"}) == "w1":
                    served_by_w1 += 1
                    assert gateway.indexer.trusted("w1") == (served_by_w1 < MISMATCHES)
            assert not gateway.indexer.trusted("w1") and gateway.indexer.trusted("w0")
            assert counter(gateway, "kvgate_prediction_mismatches_total", "w0") == 0
            # Conversations sharing a system prompt: both engines hit it, and w1's index,
            # asked with trust ignored, predicts those hits exactly.
            system = system_prompt("harbour")
            for i in range(4 * WINDOW):
                await ask(gateway, session, chat(system, f"Tide question {i}?"), {"w0", "w1"})
                if gateway.indexer.trusted("w1"):
                    break
        assert gateway.indexer.trusted("w1"), gateway.hit_check.distrusted(["w1"])
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    warning = [m for level, m in messages if level == logging.WARNING]
    assert len(warning) == 1 and "worker w1" in warning[0] and "0 under-predicted" in warning[0]
    assert "restart" in warning[0]
    assert any(level == logging.INFO and "worker w1" in m and "trusted again" in m for level, m in messages)
