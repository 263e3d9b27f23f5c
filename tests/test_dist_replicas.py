"""Two gateway replicas on etcd + NATS in front of three simulated workers with sidecars, all
real processes (``kvgate.dev.cluster``): the next turn lands on the prefix holder whichever replica
gets it, replicas share in-flight load, and the faults of distributed mode, each with its cost.

One cluster serves the module; every fault test restores it (all workers back, both gateways
seeing them) before it ends. Recovery figures are printed at the end of the module (and as
they are measured, with ``-s``); they are never asserted on, only the behaviour is.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import aetcd
import pytest

from kvgate.dev.cluster import Cluster, ClusterOptions
from kvgate.protocol.worker_record import worker_key
from tests.helpers import wait_until
from tests.test_e2e_gateway import MODEL, conversation, get, metric, metrics, post

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NS = "t"
LEASE_TTL = 3
FIGURES: list[str] = []


def figure(line: str) -> None:
    FIGURES.append(line)
    print("\n" + line)


def report_figures(request: pytest.FixtureRequest, title: str, lines: list[str]) -> None:
    """Write ``lines`` to the terminal, past pytest's output capture, so every run shows them."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or not lines:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        reporter.write_sep("-", title)
        for line in lines:
            reporter.write_line(line)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    c = Cluster(
        ClusterOptions(
            gateways=2,
            workers=3,
            port=0,
            namespace=NS,
            lease_ttl=LEASE_TTL,
            log_dir=tmp_path_factory.mktemp("dist-replicas"),
            sidecar_args=[
                "--health-interval",
                "0.25",
                "--load-interval",
                "0.5",
                "--heartbeat-interval",
                "0.5",
                "--catch-up-interval",
                "0.5",
            ],
            gateway_args=["--health-interval", "0.5", "--events-stale-after", "2", "--replica-timeout", "2"],
        )
    )
    c.start()
    try:
        yield c
    finally:
        c.stop()
        report_figures(request, "distributed mode: what each fault cost", FIGURES)


# -- clients -------------------------------------------------------------------------------


def chat(topic: str, turns: int = 1, **extra) -> dict:
    return {"model": MODEL, "messages": conversation(topic, turns), "max_tokens": 8, **extra}


class HeldStream:
    """A streamed chat kept open: the request stays in flight until ``close``."""

    def __init__(self, base_url: str, body: dict) -> None:
        url = urlsplit(base_url)
        self.conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        self.conn.request(
            "POST", "/v1/chat/completions", json.dumps({**body, "stream": True}), {"Content-Type": "application/json"}
        )
        self.response = self.conn.getresponse()  # headers come with the worker's first byte
        assert self.response.status == 200, self.response.read()
        self.worker = self.response.getheader("x-kvgate-worker")

    def close(self) -> None:
        self.conn.close()


@dataclass
class Outcome:
    start: float
    end: float
    ok: bool
    worker: str


class Traffic:
    """Clients streaming chats through both gateways in turn until stopped; prompts share a few
    long prefixes (cache hits and KV events on every worker)."""

    def __init__(self, cluster: Cluster, clients: int = 4) -> None:
        self.urls = [cluster.gateway_url(i) for i in range(len(cluster.gateways))]
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        wait_until(lambda: len(self.outcomes) >= 4, what="traffic flowing")
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def _client(self, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            body = {**chat(f"shared{(i + n) % 5}"), "stream": True}
            body["messages"].append({"role": "user", "content": f"client {i} request {n}"})
            start = time.monotonic()
            status, headers, payload = post(self.urls[(i + n) % len(self.urls)] + "/v1/chat/completions", body)
            ok = status == 200 and payload.rstrip().endswith(b"data: [DONE]") and b'"error"' not in payload
            self.outcomes.append(Outcome(start, time.monotonic(), ok, headers.get("x-kvgate-worker", "?")))

    def split(self, at: float) -> tuple[list[Outcome], list[Outcome]]:
        """(requests in flight at ``at``, requests started after it)."""
        return ([o for o in self.outcomes if o.start < at <= o.end], [o for o in self.outcomes if o.start >= at])


def active(gateway_url: str) -> int:
    """In-flight requests on every worker, as one replica counts them (its own and the others')."""
    return int(metric(metrics(gateway_url), "kvgate_active_requests"))


def on_every_gateway(cluster: Cluster, predicate) -> bool:
    return all(predicate(cluster.gateway_health(i)) for i in range(len(cluster.gateways)))


def index_blocks(cluster: Cluster, i: int, worker: str) -> tuple[int, int, int]:
    text = metrics(cluster.gateway_url(i))
    return tuple(int(metric(text, "kvgate_index_blocks", worker=worker, tier=t)) for t in ("GPU", "CPU", "DISK"))


def announced_blocks(cluster: Cluster, worker_index: int) -> tuple[int, int, int]:
    """What the worker's sidecar has announced on NATS (rank 0)."""
    w = cluster.workers[worker_index]
    status, _, body = get(f"http://127.0.0.1:{w.sidecar_port}/health")
    return tuple(json.loads(body)["blocks"][0]) if status == 200 else (-1, -1, -1)


def debug_route(gateway_url: str, body: dict) -> dict:
    status, _, payload = post(gateway_url + "/debug/route", body)
    assert status == 200, payload
    return json.loads(payload)


def chosen_by(gateway_url: str, body: dict) -> str:
    """The worker a replica would route ``body`` to."""
    return debug_route(gateway_url, body)["chosen"]


def overlaps(gateway_url: str, body: dict) -> dict[str, int]:
    """Prefix blocks of ``body`` the replica counts per worker."""
    return {c["worker"]: c["overlap"]["blocks"] for c in debug_route(gateway_url, body)["candidates"]}


def indexes_agree_with_sidecars(cluster: Cluster) -> bool:
    for k, w in enumerate(cluster.workers):
        announced = announced_blocks(cluster, k)
        if any(index_blocks(cluster, i, w.worker_id) != announced for i in range(len(cluster.gateways))):
            return False
    return True


def restore(cluster: Cluster) -> float:
    """Every worker back and seen up by both gateways; returns the seconds it took."""
    t0 = time.monotonic()
    for w in cluster.workers:
        for service in w.services:
            if not service.alive():
                service.start()
    cluster.wait_fleet(60)
    wait_until(
        lambda: on_every_gateway(cluster, lambda h: set(h.get("events", {}).values()) == {"nats"}),
        what="every stream in sync",
    )
    return time.monotonic() - t0


# -- replicas agree ------------------------------------------------------------------------


def test_next_turn_lands_on_the_prefix_holder_whichever_replica_receives_it(cluster: Cluster) -> None:
    g = [cluster.gateway_url(i) for i in range(2)]
    topics = ["astronomy", "botany", "cartography"]
    # First turns in flight together, sent through alternating replicas: the shared load
    # spreads them over the three workers, so each conversation has its own holder.
    streams = []
    for n, topic in enumerate(topics):
        streams.append(HeldStream(g[n % 2], chat(topic, max_tokens=4000, ignore_eos=True)))
        wait_until(lambda n=n: all(active(u) == n + 1 for u in g), what="first turn seen by both replicas")
    holders = {topic: stream.worker for topic, stream in zip(topics, streams)}
    for stream in streams:
        stream.close()  # the prompt's blocks stay cached on the worker
    wait_until(lambda: all(active(u) == 0 for u in g), what="first turns over on both replicas")
    assert sorted(holders.values()) == ["w0", "w1", "w2"], holders
    next_turns = {
        topic: {
            "model": MODEL,
            "max_tokens": 4,
            "messages": conversation(topic)
            + [{"role": "assistant", "content": "Noted."}, {"role": "user", "content": "And then?"}],
        }
        for topic in topics
    }
    # Every replica consumes every event: both see each holder's blocks, and their indexes
    # hold exactly what the sidecars announced.
    wait_until(
        lambda: (
            all(overlaps(u, next_turns[t])[holders[t]] > 0 for u in g for t in topics)
            and indexes_agree_with_sidecars(cluster)
        ),
        what="both replicas' indexes agree with the sidecars",
    )
    for n, topic in enumerate(topics):
        other = g[(n + 1) % 2]  # the replica that did not serve the first turn
        status, headers, answer = post(other + "/v1/chat/completions", next_turns[topic])
        assert status == 200 and headers["x-kvgate-worker"] == holders[topic], (topic, holders)
        assert json.loads(answer)["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


def test_replicas_share_in_flight_load(cluster: Cluster) -> None:
    g = [cluster.gateway_url(i) for i in range(2)]
    streams: list[HeldStream] = []
    try:
        # Six long requests, one at a time, alternating replicas. Each replica alone would send
        # its first one to the same idle worker (w0, the tie-break); with the shared view the
        # six spread two per worker.
        for n in range(6):
            streams.append(HeldStream(g[n % 2], chat(f"load{n}", max_tokens=4000, ignore_eos=True)))
            wait_until(lambda n=n: all(active(u) == n + 1 for u in g), what="request seen by both replicas")
        chosen = sorted(s.worker for s in streams)
        views = []
        for u in g:
            text = metrics(u)
            views.append(
                {
                    w.worker_id: (
                        int(metric(text, "kvgate_active_requests", worker=w.worker_id)),
                        int(metric(text, "kvgate_active_remote_requests", worker=w.worker_id)),
                    )
                    for w in cluster.workers
                }
            )
        figure(
            f"shared load: 6 concurrent requests via 2 replicas -> workers {chosen}; active (all, of which "
            f"remote) per worker: g0 {views[0]}, g1 {views[1]}"
        )
        assert chosen == ["w0", "w0", "w1", "w1", "w2", "w2"]
        for view in views:
            assert {w: total for w, (total, _) in view.items()} == {"w0": 2, "w1": 2, "w2": 2}
            assert sum(remote for _, remote in view.values()) == 3  # the other replica's three
    finally:
        for s in streams:
            s.close()
    wait_until(lambda: all(active(u) == 0 for u in g), what="cancelled requests freed on both replicas")


# -- faults --------------------------------------------------------------------------------


def test_sigkill_worker_under_load_leaves_routing_and_no_later_request_fails(cluster: Cluster) -> None:
    victim = cluster.workers[1]
    wid = victim.worker_id
    with Traffic(cluster) as traffic:
        wait_until(lambda: all(index_blocks(cluster, i, wid)[0] > 0 for i in range(2)), what="victim caching")
        # Engine and sidecar: a lost node, no deregistration. The clock starts once both are gone (kill
        # reaps the sidecar, then the engine): a request the engine took meanwhile was in flight at its death.
        victim.kill()
        killed = time.monotonic()
        wait_until(lambda: on_every_gateway(cluster, lambda h: not h["workers"].get(wid)), what="marked down")
        down = time.monotonic() - killed
        wait_until(
            lambda: on_every_gateway(cluster, lambda h: wid not in h["workers"]),
            timeout=LEASE_TTL + 5,
            what="lease expired",
        )
        gone = time.monotonic() - killed
        time.sleep(1.0)
    in_flight, later = traffic.split(killed)
    failed_in_flight = sum(not o.ok for o in in_flight)
    figure(
        f"worker SIGKILL (engine + sidecar) under load: out of routing {down:.2f}s after the kill (health / "
        f"connect failure), out of discovery {gone:.2f}s (lease TTL {LEASE_TTL}s); {failed_in_flight} of "
        f"{len(in_flight)} requests in flight failed, 0 of {len(later)} later ones"
    )
    assert later and all(o.ok for o in later)
    assert gone <= LEASE_TTL + 2
    # Its lease went, and with it its index state, on both replicas.
    assert all(index_blocks(cluster, i, wid) == (0, 0, 0) for i in range(2))
    figure(f"  back: worker restarted and routed again after {restore(cluster):.2f}s")


def test_sidecar_losing_its_engine_takes_the_worker_out_of_traffic(cluster: Cluster) -> None:
    victim = cluster.workers[2]
    wid = victim.worker_id
    with Traffic(cluster) as traffic:
        time.sleep(0.5)
        killed = time.monotonic()
        victim.engine.kill()  # the sidecar lives on
        wait_until(lambda: on_every_gateway(cluster, lambda h: wid not in h["workers"]), what="deregistered")
        gone = time.monotonic() - killed
        time.sleep(1.0)
        after = time.monotonic()
        time.sleep(1.0)
    in_flight, later = traffic.split(killed)
    served_after = [o.worker for o in traffic.outcomes if o.start >= after]
    figure(
        f"engine lost, sidecar alive, under load: out of discovery {gone:.2f}s after the kill (probe 0.25 s x 2); "
        f"{sum(not o.ok for o in in_flight)} of {len(in_flight)} in-flight requests failed, "
        f"0 of {len(later)} later ones"
    )
    assert later and all(o.ok for o in later)
    assert served_after and wid not in served_after
    assert cluster.workers[2].sidecar.alive()
    figure(f"  back: engine restarted, registered and routed again after {restore(cluster):.2f}s")


def test_etcd_restart_loses_no_worker_and_discovery_resumes(cluster: Cluster) -> None:
    expected = {w.worker_id: True for w in cluster.workers}
    with Traffic(cluster) as traffic:
        cluster.etcd.kill()
        lost = []
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:  # etcd is down: nothing may disappear
            lost += [h.get("workers") for i in range(2) if (h := cluster.gateway_health(i)).get("workers") != expected]
            time.sleep(0.1)
        cluster.etcd.start()
        cluster.etcd.wait_healthy(30)
        answered = time.monotonic()
        wait_until(lambda: on_every_gateway(cluster, lambda h: h["discovery"]["connected"]), what="watch back")
        resumed = time.monotonic() - answered
        # The watch is live again: a worker registered now shows up, and goes.
        key = worker_key(NS, "probe").encode()
        record = json.dumps({"worker_id": "probe", "base_url": "http://127.0.0.1:9", "model": MODEL}).encode()
        asyncio.run(_etcd(cluster, "put", key, record))
        wait_until(lambda: on_every_gateway(cluster, lambda h: "probe" in h["workers"]), what="new worker seen")
        asyncio.run(_etcd(cluster, "delete", key))
        wait_until(lambda: on_every_gateway(cluster, lambda h: "probe" not in h["workers"]), what="delete seen")
        # Leases outlived the outage and are refreshed again: still all there past a TTL.
        time.sleep(LEASE_TTL + 0.5)
        assert on_every_gateway(cluster, lambda h: h["workers"] == expected)
    failed = sum(not o.ok for o in traffic.outcomes)
    figure(
        f"etcd SIGKILL + restart under load: 0 workers lost, watch resumed {resumed:.2f}s after etcd answered, "
        f"{failed} of {len(traffic.outcomes)} requests failed"
    )
    assert lost == [] and failed == 0


async def _etcd(cluster: Cluster, op: str, key: bytes, value: bytes = b"") -> None:
    async with aetcd.Client("127.0.0.1", cluster.etcd.client_port) as client:
        if op == "put":
            await client.put(key, value)
        else:
            await client.delete(key)


def test_nats_restart_events_resume_and_indexes_converge(cluster: Cluster) -> None:
    g = [cluster.gateway_url(i) for i in range(2)]
    cached = chat("shared0", turns=2)  # a prefix the traffic keeps cached
    with Traffic(cluster) as traffic:
        wait_until(lambda: max(overlaps(g[0], cached).values()) > 0, what="prefix indexed")
        cluster.nats.kill()
        killed = time.monotonic()
        # The workers keep caching and nobody hears about it: once the streams are stale,
        # the replicas stop trusting the index and route on load alone.
        wait_until(
            lambda: on_every_gateway(cluster, lambda h: set(h["events"].values()) == {"nats-stale"}),
            what="streams stale",
        )
        stale = time.monotonic() - killed
        assert all(max(overlaps(u, cached).values()) == 0 for u in g)
        time.sleep(0.5)
    outage = [o for o in traffic.outcomes if o.end >= killed]
    cluster.nats.start()
    cluster.nats.wait_healthy(30)
    answered = time.monotonic()
    wait_until(
        lambda: (
            on_every_gateway(
                cluster,
                lambda h: h["nats"]["connected"] and set(h["events"].values()) == {"nats"} and h["nats"]["replicas"],
            )
            and indexes_agree_with_sidecars(cluster)
        ),
        timeout=30,
        what="indexes converged",
    )
    converged = time.monotonic() - answered
    # Events flow again: a new prefix cached through one replica is routed to by the other.
    status, headers, _ = post(g[0] + "/v1/chat/completions", chat("after-the-restart"))
    assert status == 200
    holder = headers["x-kvgate-worker"]
    wait_until(
        lambda: chosen_by(g[1], chat("after-the-restart", turns=2)) == holder,
        what="the other replica routes to the new prefix",
    )
    failed = sum(not o.ok for o in outage)
    figure(
        f"NATS SIGKILL + restart under load: {failed} of {len(outage)} requests during the outage failed; "
        f"streams stale (load-only routing) {stale:.2f}s after the kill (events_stale_after 2 s); both indexes "
        f"equal the sidecars' announced blocks {converged:.2f}s after nats-server answered"
    )
    assert failed == 0
