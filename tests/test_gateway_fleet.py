"""The gateway follows its registry: a worker's events reach the index over real ZMQ, and a
worker that leaves takes its event source, health state and index blocks with it; what an
idle worker published before the gateway subscribed is caught up from its replay socket.
A worker given only its URL learns its endpoints from /kv_event_sources; one whose
requests' events never arrive is reported and routed by load only until they do; one
seen down comes back with its old engine's index forgotten."""

from __future__ import annotations

import asyncio
import logging
import time

import orjson
import pytest
import zmq
import zmq.asyncio
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from kvgate.dev.launch import free_port
from kvgate.gateway.app import CHAT, Gateway
from kvgate.gateway.config import config_from_dict, load_config
from kvgate.gateway.metrics import Outcome
from kvgate.gateway.relay import Exchange
from kvgate.protocol.events import BlockStored, EventBatch, WorkerKey
from kvgate.protocol.wire import encode_batch, encode_frames
from kvgate.protocol.worker_record import WorkerInfo
from tests.helpers import TINY_MODEL, until
from tests.test_zmq_source import Publisher, tcp


async def test_registry_changes_start_and_stop_sources_and_drop_index_state() -> None:
    events_port = free_port()
    gateway = Gateway(config_from_dict({"model": str(TINY_MODEL), "health_interval": 60.0}))
    ctx = zmq.asyncio.Context()
    pub = ctx.socket(zmq.PUB)
    pub.bind(f"tcp://127.0.0.1:{events_port}")
    await gateway.start()
    try:
        gateway.registry.put(
            WorkerInfo(
                "w9",
                f"http://127.0.0.1:{free_port()}",
                "kvgate-tiny",
                kv_events_endpoint=f"tcp://127.0.0.1:{events_port}",
            )
        )
        assert set(gateway.fleet.sources) == {"w9"} and gateway.fleet.up == {"w9": False}
        batch = EventBatch(0.0, [BlockStored([11, 12], None, list(range(128)), 64)], 0)
        seq = 0
        # PUB/SUB drops what is sent before the subscription lands; send until it is applied.
        while not gateway.indexer.block_counts():
            await pub.send_multipart(encode_frames(b"", seq, encode_batch(batch)))
            seq += 1
            await asyncio.sleep(0.05)
            assert seq < 200, "events never reached the index"
        assert gateway.indexer.block_counts() == {WorkerKey("w9"): (2, 0, 0)}
        assert 'kvgate_index_blocks{dp_rank="0",tier="GPU",worker="w9"} 2.0' in gateway.metrics.render().decode()

        gateway.registry.remove("w9")
        assert gateway.indexer.block_counts() == {}
        assert gateway.fleet.sources == {} and gateway.fleet.up == {}
        assert gateway.fleet.down_keys == frozenset()
    finally:
        await gateway.stop()
        pub.close(linger=0)
        ctx.term()


async def test_an_idle_workers_batch_published_before_the_gateway_subscribed_is_caught_up() -> None:
    events_port, replay_port = free_port(), free_port()
    config = load_config(
        ["--model", str(TINY_MODEL), "--health-interval", "60", "--events-catch-up-interval", "0.05"], environ={}
    )
    gateway = Gateway(config)
    ctx = zmq.asyncio.Context()
    engine = Publisher(ctx, events_port, replay_port)
    engine.bind()
    await engine.publish(EventBatch(0.0, [BlockStored([11, 12], None, list(range(128)), 64)], 0))  # to nobody
    await gateway.start()
    try:
        gateway.registry.put(
            WorkerInfo(
                "w9",
                f"http://127.0.0.1:{free_port()}",
                "kvgate-tiny",
                kv_events_endpoint=tcp(events_port),
                kv_events_replay_endpoint=tcp(replay_port),
            )
        )
        source = gateway.fleet.sources["w9"]
        assert source.config.catch_up_interval == 0.05
        await until(lambda: gateway.indexer.block_counts() == {WorkerKey("w9"): (2, 0, 0)}, "caught up")
        assert engine.replay_requests[0] == 0 and source.stats.caught_up == 1
    finally:
        await gateway.stop()
        await engine.close()
        ctx.destroy(linger=0)


def test_events_catch_up_interval_comes_from_env_and_is_checked() -> None:
    assert load_config([], environ={"KVGATE_EVENTS_CATCH_UP_INTERVAL": "0"}).events_catch_up_interval == 0.0
    assert load_config([], environ={}).events_catch_up_interval == 2.0
    with pytest.raises(ValueError, match="events_catch_up_interval"):
        config_from_dict({"events_catch_up_interval": -1.0})


# -- endpoints from /kv_event_sources, missing events, lost engines ---------------------------

PROMPT = list(range(300))  # 4 full blocks of 64


class FakeWorker:
    """A worker's HTTP side: /health (switchable) and, when given, vLLM's /kv_event_sources."""

    def __init__(self, port: int, event_sources: dict[str, object] | None = None) -> None:
        self.port = port
        self.healthy = True
        self.event_sources = event_sources
        self.asked = 0
        self.polls = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/health", self._health)
        if self.event_sources is not None:
            app.router.add_get("/kv_event_sources", self._sources)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _health(self, request: web.Request) -> web.Response:
        self.polls += 1
        return web.Response(status=200 if self.healthy else 503)

    async def _sources(self, request: web.Request) -> web.Response:
        self.asked += 1
        return web.json_response(self.event_sources)


def vllm_sources(events_port: int, replay_port: int, topic: str = "kv-events") -> dict[str, object]:
    """What vLLM 0.32 answers for ``--kv-events-config`` bound on ``tcp://*``."""
    return {
        "0": {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": f"tcp://*:{events_port}",
            "replay_endpoint": f"tcp://*:{replay_port}",
            "buffer_steps": 10000,
            "hwm": 100000,
            "max_queue_size": 100000,
            "topic": topic,
        }
    }


async def health_body(gateway: Gateway) -> dict[str, object]:
    # The detailed /health: the admin listener's (the public one says up/down per worker only).
    response = await gateway.admin_health(make_mocked_request("GET", "/health"))
    assert isinstance(response.body, bytes)
    return dict(orjson.loads(response.body))


def finish_request(gateway: Gateway, *, cached_tokens: int | None, prompt: list[int] = PROMPT) -> None:
    """A request to w9 answered 200, as the request path finishes it."""
    decision = gateway.router.route(prompt)
    flight = gateway.router.begin(f"r{time.perf_counter()}", decision, len(prompt), WorkerKey("w9"))
    flight.finish(Outcome(CHAT, "200", Exchange(time.perf_counter(), complete=True, cached_tokens=cached_tokens)))


def gateway_for(**options: object) -> Gateway:
    return Gateway(config_from_dict({"model": str(TINY_MODEL), **options}))


async def test_a_worker_given_only_its_url_learns_its_endpoints_from_kv_event_sources() -> None:
    events_port, replay_port = free_port(), free_port()
    worker = FakeWorker(free_port(), vllm_sources(events_port, replay_port))
    gateway = gateway_for(health_interval=0.05)
    ctx = zmq.asyncio.Context()
    engine = Publisher(ctx, events_port, replay_port, topic=b"kv-events")
    engine.bind()
    await gateway.start()
    try:
        gateway.registry.put(WorkerInfo("w9", worker.url, "kvgate-tiny"))
        await asyncio.sleep(0.2)  # not reachable yet: still asking
        assert gateway.fleet.events_of("w9") == "discovering" and not gateway.fleet.sources
        await worker.start()
        await until(lambda: "w9" in gateway.fleet.sources, "endpoints discovered")
        source = gateway.fleet.sources["w9"]
        # The wildcard host became the worker URL's; vLLM's topic is the subscription.
        assert source.endpoint == tcp(events_port) and source.replay_endpoint == tcp(replay_port)
        assert source.topic == b"kv-events" and gateway.fleet.events_of("w9") == "zmq"
        await engine.subscribed()
        await engine.publish(EventBatch(0.0, [BlockStored([11, 12], None, list(range(128)), 64)], 0))
        await until(lambda: gateway.indexer.block_counts() == {WorkerKey("w9"): (2, 0, 0)}, "events indexed")
        assert "events" not in await health_body(gateway)  # every worker's events flow
    finally:
        await gateway.stop()
        await worker.stop()
        await engine.close()
        ctx.destroy(linger=0)


@pytest.mark.parametrize("answer", [None, {}], ids=["404", "empty"])
async def test_a_worker_publishing_no_events_is_load_only_and_health_says_so(answer: dict[str, object] | None) -> None:
    worker = FakeWorker(free_port(), answer)
    await worker.start()
    gateway = gateway_for(health_interval=0.05)
    await gateway.start()
    try:
        gateway.registry.put(WorkerInfo("w9", worker.url, "kvgate-tiny"))
        await until(lambda: gateway.fleet.events_of("w9") == "none", "answered")
        await until(lambda: gateway.fleet.up.get("w9"), "up")
        assert not gateway.fleet.sources and gateway.fleet.load_only == {"w9"}
        assert (await health_body(gateway))["events"] == {"w9": "none"}
    finally:
        await gateway.stop()
        await worker.stop()


async def test_static_endpoints_win_over_kv_event_sources() -> None:
    worker = FakeWorker(free_port(), vllm_sources(1, 2))
    await worker.start()
    gateway = gateway_for(health_interval=0.05)
    await gateway.start()
    try:
        gateway.registry.put(WorkerInfo("w9", worker.url, "kvgate-tiny", kv_events_endpoint=tcp(5)))
        await until(lambda: gateway.fleet.up.get("w9"), "up")
        assert gateway.fleet.sources["w9"].endpoint == tcp(5) and worker.asked == 0
    finally:
        await gateway.stop()
        await worker.stop()


async def test_requests_whose_events_never_come_raise_the_alarm_until_a_batch_arrives(
    caplog: pytest.LogCaptureFixture,
) -> None:
    events_port = free_port()  # nothing publishes here (yet)
    # Without predictions of sent blocks, the index's figure below is the events' alone.
    gateway = gateway_for(health_interval=60.0, events_missing_after=0.3, kv={"predict_sent": False})
    ctx = zmq.asyncio.Context()
    await gateway.start()
    try:
        gateway.registry.put(
            WorkerInfo("w9", f"http://127.0.0.1:{free_port()}", "kvgate-tiny", kv_events_endpoint=tcp(events_port))
        )
        # Answers that stored nothing new owe no events: fully cached, or shorter than a block.
        finish_request(gateway, cached_tokens=256)
        finish_request(gateway, cached_tokens=0, prompt=list(range(64)))
        await asyncio.sleep(0.6)
        assert gateway.fleet.events_of("w9") == "zmq"
        finish_request(gateway, cached_tokens=0)
        with caplog.at_level(logging.WARNING, logger="kvgate.gateway.fleet"):
            took = await until(lambda: gateway.fleet.events_of("w9") == "zmq-missing", "alarm", timeout=5)
        assert took < 2.0
        assert not gateway.indexer.trusted("w9")
        (warning,) = [r.getMessage() for r in caplog.records if "no KV event batch" in r.getMessage()]
        assert "w9" in warning and "tcp://*:PORT" in warning and tcp(events_port) in warning
        assert (await health_body(gateway))["events"] == {"w9": "zmq-missing"}
        assert 'kvgate_worker_events_missing{worker="w9"} 1.0' in gateway.metrics.render().decode()

        # Its publisher comes up: the first batch brings its index back into routing.
        engine = Publisher(ctx, events_port)
        engine.bind()
        await engine.subscribed()
        await engine.publish(EventBatch(0.0, [BlockStored([11, 12], None, PROMPT[:128], 64)], 0))
        await until(lambda: gateway.fleet.events_of("w9") == "zmq", "trusted again")
        assert gateway.indexer.trusted("w9")
        assert gateway.router.route(PROMPT).score_of(WorkerKey("w9")).cached_blocks == 2  # type: ignore[union-attr]
        assert 'kvgate_worker_events_missing{worker="w9"} 0.0' in gateway.metrics.render().decode()
        await engine.close()
    finally:
        await gateway.stop()
        ctx.destroy(linger=0)


async def test_a_batch_arriving_while_the_request_ran_owes_nothing() -> None:
    events_port = free_port()
    # Without predictions of sent blocks: the second request's cache is then the index's
    # one block (with them, r1's blocks would count as held and nothing would be owed).
    gateway = gateway_for(health_interval=60.0, events_missing_after=1000.0, kv={"predict_sent": False})
    ctx = zmq.asyncio.Context()
    engine = Publisher(ctx, events_port)
    engine.bind()
    await gateway.start()
    try:
        gateway.registry.put(
            WorkerInfo("w9", f"http://127.0.0.1:{free_port()}", "kvgate-tiny", kv_events_endpoint=tcp(events_port))
        )
        await engine.subscribed()
        started = time.perf_counter()
        await engine.publish(EventBatch(0.0, [BlockStored([11], None, PROMPT[:64], 64)], 0))
        source = gateway.fleet.sources["w9"]
        await until(lambda: source.last_batch is not None, "batch heard")
        flight = gateway.router.begin("r1", gateway.router.route(PROMPT), len(PROMPT), WorkerKey("w9"))
        flight.finish(Outcome(CHAT, "200", Exchange(started, complete=True, cached_tokens=0)))
        gateway.fleet.check_events(time.perf_counter() + 2000.0)
        assert gateway.fleet.events_of("w9") == "zmq"
        # A request sent to the worker brings its quiet ranks' catch-up asks back to every interval.
        source._feeds[0].quiet_asks = 3
        finish_request(gateway, cached_tokens=0)
        assert source._feeds[0].quiet_asks == 0
        # The same answer with no batch since it arrived would have been owed.
        finish_request(gateway, cached_tokens=None)  # no usage: the index's prediction (1 block) is the cache
        gateway.fleet.check_events(time.perf_counter() + 2000.0)
        assert gateway.fleet.events_of("w9") == "zmq-missing"
    finally:
        await gateway.stop()
        await engine.close()
        ctx.destroy(linger=0)


async def test_a_worker_going_down_has_its_index_forgotten_before_it_comes_back() -> None:
    events_port, replay_port = free_port(), free_port()
    worker = FakeWorker(free_port())
    await worker.start()
    gateway = gateway_for(health_interval=0.05, events_catch_up_interval=0.05)
    ctx = zmq.asyncio.Context()
    engine = Publisher(ctx, events_port, replay_port)
    engine.bind()
    await gateway.start()
    try:
        gateway.registry.put(
            WorkerInfo(
                "w9",
                worker.url,
                "kvgate-tiny",
                kv_events_endpoint=tcp(events_port),
                kv_events_replay_endpoint=tcp(replay_port),
            )
        )
        await until(lambda: gateway.fleet.up.get("w9"), "up")
        for _ in range(3):
            await engine.publish(EventBatch(0.0, [BlockStored([11, 12], None, PROMPT[:128], 64)], 0))
        await until(lambda: gateway.indexer.block_counts() == {WorkerKey("w9"): (2, 0, 0)}, "indexed")

        # SIGKILL and restart on the same ports: the new engine has nothing cached.
        await engine.close()
        worker.healthy = False
        await until(lambda: not gateway.fleet.up["w9"], "seen down")
        assert gateway.indexer.block_counts() == {} and gateway.fleet.engine_losses["w9"] == 1
        assert 'kvgate_worker_engine_losses_total{worker="w9"} 1.0' in gateway.metrics.render().decode()
        engine = Publisher(ctx, events_port, replay_port)
        engine.bind()
        worker.healthy = True
        await until(lambda: gateway.fleet.up["w9"], "back up")
        assert gateway.router.route(PROMPT).score_of(WorkerKey("w9")).cached_blocks == 0  # type: ignore[union-attr]
        # Its seqs start over at 0 and are taken as such, past the old engine's last one.
        await engine.subscribed()
        await engine.publish(EventBatch(0.0, [BlockStored([21], None, PROMPT[:64], 64)], 0))
        await until(lambda: gateway.indexer.block_counts() == {WorkerKey("w9"): (1, 0, 0)}, "new engine indexed")
        assert gateway.indexer.stats.restarts == 0

        # A forward's connect failure counts the same.
        gateway.fleet.mark_down("w9", "connection refused")
        assert gateway.indexer.block_counts() == {} and gateway.fleet.engine_losses["w9"] == 2
        await engine.close()
    finally:
        await gateway.stop()
        await worker.stop()
        ctx.destroy(linger=0)


async def test_a_worker_answering_requests_is_not_polled_for_health() -> None:
    worker = FakeWorker(free_port())
    await worker.start()
    gateway = gateway_for(health_interval=0.05)
    await gateway.start()
    try:
        gateway.registry.put(WorkerInfo("w9", worker.url, "kvgate-tiny"))
        await until(lambda: gateway.fleet.up.get("w9"), "up")

        async def polls_in(seconds: float, *, answering: bool) -> int:
            before, end = worker.polls, time.monotonic() + seconds
            while time.monotonic() < end:
                if answering:
                    finish_request(gateway, cached_tokens=0)
                await asyncio.sleep(0.01)
            return worker.polls - before

        # Idle, it is polled every interval; completing answers, it is not (each one says it is up).
        assert await polls_in(0.5, answering=False) >= 5
        assert await polls_in(0.5, answering=True) <= 1
        assert gateway.fleet.up["w9"]
        # Answers stop: polls resume, and a failing one takes it down.
        worker.healthy = False
        await until(lambda: not gateway.fleet.up["w9"], "seen down once idle")
        # An answer completing while it is down does not spare it a poll: it stays down.
        finish_request(gateway, cached_tokens=0)
        before = worker.polls
        await until(lambda: worker.polls >= before + 2, "still polled while down")
        assert not gateway.fleet.up["w9"]
    finally:
        await gateway.stop()
        await worker.stop()


def test_events_missing_after_and_the_health_interval_defaults() -> None:
    config = load_config([], environ={"KVGATE_EVENTS_MISSING_AFTER": "2.5"})
    assert config.events_missing_after == 2.5 and config.health_interval == 0.5
    assert load_config([], environ={}).events_missing_after == 5.0
    with pytest.raises(ValueError, match="events_missing_after"):
        config_from_dict({"events_missing_after": -1.0})
