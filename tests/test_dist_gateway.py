"""The gateway's distributed pieces on their own: replica sync of in-flight load (pure, then
two ``GatewayBus``es over a real nats-server, through a NATS restart), stale streams routed
by load only, the distributed options of the configuration, and a gateway taking a worker's
events and load from NATS instead of ZMQ (the fleet's side of it, in process)."""

from __future__ import annotations

import time

import pytest
import yaml

from kvgate.bus import Bus, connect_nats
from kvgate.dev.launch import free_port
from kvgate.gateway.app import Gateway
from kvgate.gateway.config import GatewayConfig, config_from_dict, load_config
from kvgate.gateway.replicas import ActiveSync, GatewayBus
from kvgate.indexer.kv_indexer import KvIndexer
from kvgate.protocol.events import RouterCleared, RouterStored, Tier, WorkerKey
from kvgate.protocol.hashing import sequence_hashes
from kvgate.protocol.messages import ActiveMessage, EventsMessage, LoadMessage
from kvgate.protocol.worker_record import WorkerInfo
from kvgate.router.config import RouterConfig
from kvgate.router.load import LoadTracker
from kvgate.router.registry import WorkerRegistry
from kvgate.router.routing import Router
from kvgate.worker.sidecar.__main__ import parse_args as parse_sidecar_args
from tests.helpers import REPO, TINY_MODEL, until
from tests.servers import NatsServer

W0, W1 = WorkerKey("w0"), WorkerKey("w1")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def pair(clock: Clock) -> tuple[LoadTracker, ActiveSync, LoadTracker, ActiveSync]:
    load_a, load_b = LoadTracker(clock=clock), LoadTracker(clock=clock)
    return (
        load_a,
        ActiveSync("gw-a", load_a, replica_timeout=5.0, clock=clock),
        load_b,
        ActiveSync("gw-b", load_b, replica_timeout=5.0, clock=clock),
    )


def deliver(msgs, *to: ActiveSync) -> list[bool]:
    msgs = msgs if isinstance(msgs, list) else [msgs]
    return [sync.receive(m) for m in msgs if m is not None for sync in to]


def test_active_sync_mirrors_a_request_lifecycle_on_the_other_replica():
    clock = Clock()
    load_a, a, load_b, b = pair(clock)
    load_a.begin("r1", W0, prompt_tokens=300, new_prefill_tokens=200, blocks=5)
    add = a.began("r1")
    assert (add.op, add.worker_id, add.new_prefill_tokens, add.blocks) == ("add", "w0", 200, 5)
    deliver(add, a, b)  # NATS echoes to the sender too: it must not count itself twice
    assert load_a.snapshot(W0).requests == 1 and load_a.snapshot(W0).remote_requests == 0
    snap = load_b.snapshot(W0)
    assert (snap.requests, snap.remote_requests, snap.prefill_tokens, snap.blocks) == (1, 1, 200, 5)

    load_a.prefill_done("r1")
    deliver(a.prefill_done("r1"), b)
    assert (load_b.snapshot(W0).prefill_tokens, load_b.snapshot(W0).blocks) == (0, 5)
    # A retry on another worker moves the request there, on both replicas.
    load_a.begin("r1", W1, prompt_tokens=300, new_prefill_tokens=300, blocks=5)
    deliver(a.began("r1"), b)
    assert load_b.snapshot(W0).requests == 0 and load_b.snapshot(W1).prefill_tokens == 300

    load_a.finish("r1")
    deliver(a.finished("r1"), b)
    assert load_b.snapshot(W1).requests == 0 and len(load_b) == 0
    assert a.finished("r1") is None and a.prefill_done("nope") is None
    assert b.replicas() == ["gw-a"] and a.replicas() == []


def test_restatement_replaces_what_was_lost_and_silent_replicas_are_forgotten():
    clock = Clock()
    load_a, a, load_b, b = pair(clock)
    for rid, key in (("r1", W0), ("r2", W1)):
        load_a.begin(rid, key, prompt_tokens=128, new_prefill_tokens=128, blocks=2)
        deliver(a.began(rid), b)
    # Lost on the way (a NATS outage): r1's finish, r3's add.
    load_a.finish("r1")
    a.finished("r1")
    load_a.begin("r3", W0, prompt_tokens=64, new_prefill_tokens=0, blocks=1)
    a.began("r3")
    assert load_b.snapshot(W0).requests == 1  # b still counts r1
    restated = a.restatement()
    assert [m.op for m in restated] == ["leave", "add", "prefill_done"]
    deliver(restated, b)
    assert load_b.snapshot(W0).blocks == 1 and load_b.snapshot(W1).blocks == 2 and len(load_b) == 2

    # b asks everyone to restate: a answers the request, b ignores its own echo.
    sync = b.sync_request()
    assert deliver(sync, a, b) == [True, False]

    # a dies without leave: b forgets its requests once it has been silent long enough.
    clock.now += 4.0
    assert b.expire() == []
    deliver(a.alive(), b)
    clock.now += 4.0
    assert b.expire() == []
    clock.now += 1.5
    assert b.expire() == ["gw-a"] and len(load_b) == 0 and b.replicas() == []

    # A clean shutdown: leave drops everything at once.
    deliver(a.restatement(), b)
    assert len(load_b) == 2
    deliver(a.leave(), b)
    assert len(load_b) == 0 and b.replicas() == []


def test_bad_active_messages_are_counted_not_applied():
    clock = Clock()
    _, _, load_b, b = pair(clock)
    b.receive(ActiveMessage(router_id="gw-a", op="add", request_id="r1", worker_id="", blocks=1))
    b.receive(ActiveMessage(router_id="gw-a", op="add", request_id="r2", worker_id="a.b", blocks=1))
    assert b.stats.rejected == 2 and len(load_b) == 0
    with pytest.raises(ValueError):
        ActiveSync("gw.a", load_b)


def test_untrusted_workers_are_routed_by_load_only():
    indexer = KvIndexer(block_size=4)
    tokens = list(range(400))  # long enough for its cache to matter beside the fixed overhead
    hashes = sequence_hashes(tokens, 4)
    indexer.apply_router_events(W0, [RouterStored(hashes, Tier.GPU)])
    registry = WorkerRegistry(
        [
            WorkerInfo("w0", "http://127.0.0.1:1", "m", block_size=4),
            WorkerInfo("w1", "http://127.0.0.1:2", "m", block_size=4),
        ]
    )
    load = LoadTracker()
    router = Router(RouterConfig(block_size=4), indexer, registry, load)
    load.begin("busy", W0, 4, 4, 1)  # w0 already has a request; w1 is idle

    assert router.route(tokens).chosen == W0  # its 100 cached blocks outweigh one request
    indexer.set_trusted("w0", False)  # its event stream went stale
    decision = router.route(tokens)
    assert decision.chosen == W1 and decision.score_of(W0).depth == 0
    assert indexer.block_counts()[W0] == (100, 0, 0)  # the index keeps the blocks
    indexer.set_trusted("w0", True)
    assert router.route(tokens).chosen == W0
    indexer.set_trusted("w0", False)
    registry.remove("w0")  # the router drops a departed worker's index state, trust included
    assert indexer.block_counts() == {} and indexer.trusted("w0")


def test_distributed_options_from_yaml_env_and_flags(tmp_path):
    path = tmp_path / "gw.yaml"
    path.write_text(
        "discovery: etcd\netcd_endpoints: etcd:2379,etcd2:2379\nnats_url: nats://nats:4222\n"
        "namespace: prod\nrouter_id: gw-a\nevents_stale_after: 3\n"
    )
    config = load_config(["--config", str(path), "--replica-timeout", "7"], environ={"KVGATE_NAMESPACE": "stage"})
    assert (config.discovery, config.etcd_endpoints, config.nats_url) == (
        "etcd",
        "etcd:2379,etcd2:2379",
        "nats://nats:4222",
    )
    assert (config.namespace, config.router_id, config.replica_id) == ("stage", "gw-a", "gw-a")
    assert (config.events_stale_after, config.replica_timeout) == (3.0, 7.0)
    default_id = GatewayConfig().replica_id
    assert default_id and not any(c in default_id for c in ".*> ")

    for bad, match in (
        ({"discovery": "etcd"}, "etcd_endpoints"),
        ({"discovery": "etcd", "etcd_endpoints": "e:1", "workers": [{"id": "a", "url": "http://h:1"}]}, "workers"),
        ({"etcd_endpoints": "e:1"}, "only read with discovery etcd"),
        ({"discovery": "consul"}, "discovery"),
        ({"namespace": "a.b"}, "namespace"),
        ({"namespace": "a/b"}, "namespace"),
        ({"router_id": "gw 1"}, "router_id"),
        ({"nats_url": " , "}, "nats_url"),
        ({"events_stale_after": 0}, "events_stale_after"),
    ):
        with pytest.raises(ValueError, match=match):
            config_from_dict(bad)


@pytest.mark.slow
@pytest.mark.integration
async def test_two_replicas_share_in_flight_load_over_nats_and_through_a_restart(nats_server: NatsServer):
    def replica(router_id: str) -> tuple[GatewayBus, LoadTracker, Router]:
        registry = WorkerRegistry([WorkerInfo("w0", "http://127.0.0.1:1", "m")])
        load = LoadTracker()
        indexer = KvIndexer()
        bus = GatewayBus(nats_server.url, "t", router_id, indexer, registry, load, replica_timeout=2.0)
        router = Router(RouterConfig(), indexer, registry, load)
        router.subscribe(bus)
        return bus, load, router

    def begin(router: Router, request_id: str, prompt_tokens: int):
        return router.begin(request_id, router.route(list(range(prompt_tokens))), prompt_tokens)

    a, load_a, router_a = replica("gw-a")
    b, load_b, _ = replica("gw-b")
    await a.start()
    await b.start()
    try:
        await a.wait_ready(10)
        await b.wait_ready(10)
        await until(lambda: a.sync.replicas() == ["gw-b"] and b.sync.replicas() == ["gw-a"], what="replicas meet")
        r1 = begin(router_a, "r1", 256)
        await until(lambda: load_b.snapshot(W0).requests == 1, what="r1 shared")
        assert load_b.snapshot(W0).prefill_tokens == 256 and load_b.snapshot(W0).remote_requests == 1
        r1.first_token()
        await until(lambda: load_b.snapshot(W0).prefill_tokens == 0, what="prefill done shared")

        # NATS goes away; meanwhile r1 ends and r2 starts, and nobody hears of it.
        nats_server.kill()
        r1.finish()
        begin(router_a, "r2", 64)
        assert load_b.snapshot(W0).blocks == 4
        nats_server.start()
        took = await until(
            lambda: load_b.snapshot(W0).blocks == 1 and len(load_b) == 1,
            timeout=20,
            what="b's view restated after the restart",
        )
        print(
            f"\nNATS restart: the other replica's in-flight view was right again {took:.2f}s after nats-server answered"
        )
        assert a.reconnects >= 1 and b.reconnects >= 1

        # A clean shutdown leaves at once.
        await a.stop()
        await until(lambda: len(load_b) == 0 and b.sync.replicas() == [], what="leave applied")
    finally:
        await a.stop()
        await b.stop()


@pytest.mark.slow
@pytest.mark.integration
async def test_gateway_takes_nats_fed_workers_events_from_the_bus(nats_server: NatsServer):
    gateway = Gateway(
        config_from_dict(
            {
                "model": str(TINY_MODEL),
                "health_interval": 60.0,
                "nats_url": nats_server.url,
                "namespace": "t",
                "router_id": "gw-a",
            }
        )
    )
    sidecar = await connect_nats(nats_server.url, name="fake-sidecar")
    resyncs: list[str] = []
    bus = Bus(sidecar, "t")
    await bus.on_resync("w1", lambda r: resyncs.append(r.requester))
    await sidecar.flush()
    await gateway.start()
    try:
        await gateway.bus.wait_ready(10)
        info = WorkerInfo(
            "w1",
            f"http://127.0.0.1:{free_port()}",
            "kvgate-tiny",
            block_size=64,
            kv_events_endpoint=f"tcp://127.0.0.1:{free_port()}",
            metadata={"events": "nats"},
        )
        gateway.registry.put(info)
        # Events come over NATS: no ZMQ source; stale (load-only) until the sidecar restates.
        assert gateway.fleet.sources == {} and gateway.fleet.nats_fed == {"w1"}
        assert gateway.fleet.events_of("w1") == "nats-stale"
        await until(lambda: resyncs == ["gw-a"], what="the gateway asked the new worker to restate")
        hashes = sequence_hashes(list(range(256)), 64)
        await bus.publish_events(EventsMessage("w1", 0, 0, 7, [RouterCleared(), RouterStored(hashes)], reset=True))
        await until(lambda: gateway.fleet.events_of("w1") == "nats", what="stream in sync")
        assert gateway.indexer.block_counts() == {WorkerKey("w1"): (4, 0, 0)}
        assert gateway.router.route_hashes(hashes).chosen_score.depth == 4
        await bus.publish_load(
            LoadMessage(worker_id="w1", running=3, waiting=1, kv_usage=0.5, ts=time.time(), capacity_tokens=6_400)
        )
        await until(lambda: gateway.load.snapshot(WorkerKey("w1")).running == 3, what="load from the bus")
        assert gateway.load.snapshot(WorkerKey("w1")).capacity_tokens == 6_400
        text = gateway.metrics.render().decode()
        assert 'kvgate_worker_events_stale{worker="w1"} 0.0' in text and "kvgate_bus_connected 1.0" in text

        # The lease goes: the worker's index and load state go with it, its stream is forgotten.
        gateway.registry.remove("w1")
        assert gateway.indexer.block_counts() == {} and gateway.fleet.nats_fed == set()
        assert gateway.load.snapshot(WorkerKey("w1")).running is None
        assert gateway.bus.source.tracker.workers() == []
        # A worker that relays nothing over NATS keeps its ZMQ source.
        gateway.registry.put(
            WorkerInfo(
                "w2",
                f"http://127.0.0.1:{free_port()}",
                "kvgate-tiny",
                kv_events_endpoint=f"tcp://127.0.0.1:{free_port()}",
            )
        )
        assert set(gateway.fleet.sources) == {"w2"} and gateway.fleet.events_of("w2") == "zmq"
    finally:
        await gateway.stop()
        await sidecar.close()


def test_deployment_files_hold_valid_gateway_and_sidecar_settings(monkeypatch: pytest.MonkeyPatch):
    """configs/: the k8s ConfigMap and the compose command are valid gateway configs in etcd + NATS
    mode; the sidecar command lines of the k8s worker pod and of compose parse, with the
    secrets the deployments put in their environment."""
    for name in ("KVGATE_ETCD_PASSWORD", "KVGATE_NATS_PASSWORD", "KVGATE_BUS_SECRET"):
        monkeypatch.setenv(name, f"from-{name}")
    configmap = yaml.safe_load((REPO / "configs/k8s/gateway-configmap.yaml").read_text())
    config = config_from_dict(yaml.safe_load(configmap["data"]["gateway.yaml"]))
    assert (config.discovery, config.nats_url, config.block_size) == ("etcd", "nats://nats:4222", 64)
    compose = yaml.safe_load((REPO / "configs/compose.yaml").read_text())
    gateway_flags = compose["x-gateway-cmd"].split("python -m kvgate.gateway", 1)[1].split()
    assert load_config(gateway_flags, environ={}).discovery == "etcd"

    pods = list(yaml.safe_load_all((REPO / "configs/k8s/worker.yaml").read_text()))
    containers = pods[0]["spec"]["template"]["spec"]["containers"]
    sidecar = next(c for c in containers if c["name"] == "sidecar")["command"]
    assert sidecar[:3] == ["python", "-m", "kvgate.worker.sidecar"]
    args = [a.replace("$(POD_NAME)", "vllm-0").replace("$(POD_IP)", "10.0.0.5") for a in sidecar[3:]]
    parsed = parse_sidecar_args(args)
    assert parsed.worker_info().base_url == "http://10.0.0.5:8000" and parsed.tiers == ("GPU", "CPU")
    sim = compose["x-sim-cmd"].split("exec python -m kvgate.worker.sidecar", 1)[1].rstrip(")").split()
    parsed = parse_sidecar_args([a.replace("$$WORKER_ID", "w0") for a in sim])
    assert parsed.worker_info().metadata["events"] == "nats"
    assert parsed.etcd_credentials.username == "kvgate" and parsed.nats_credentials.user == "kvgate"
    assert parsed.bus_secret is not None
