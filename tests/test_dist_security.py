"""Who may speak on the bus: credentials and TLS for etcd and NATS, subjects checked
against payloads, signed messages, and the bounds on what another replica may claim.

Each forged-message case of the "bus trusts everyone" defect has a test here: a forged
replica message (``test_forged_replica_add_*``), forged load and a forged restatement
(``test_signed_bus_drops_*``), one worker's events on another's subject
(``test_subject_must_name_the_sender``), and a rogue etcd key
(``test_etcd_with_auth_*``). Real etcd and nats-server where it matters."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path
from typing import Any

import aetcd
import aetcd.exceptions
import pytest

from kvgate.bus import Bus, NatsCredentials, connect_nats
from kvgate.dev.cluster import Credentials
from kvgate.etcd import Endpoints, EtcdCredentials, close_client
from kvgate.gateway.config import config_from_dict
from kvgate.gateway.replicas import ActiveSync, GatewayBus, GatewaySecurity
from kvgate.indexer.kv_indexer import KvIndexer
from kvgate.protocol.events import RouterCleared, RouterStored
from kvgate.protocol.messages import (
    ActiveMessage,
    BusDecodeError,
    EventsMessage,
    LoadMessage,
    decode_active,
    decode_events,
    decode_load,
    encode_active,
    encode_events,
    encode_load,
    seal,
    unseal,
)
from kvgate.protocol.worker_record import WorkerInfo, worker_key
from kvgate.router.discovery import EtcdDiscovery
from kvgate.router.load import LoadTracker
from kvgate.router.registry import WorkerRegistry
from kvgate.secret import Secret, read_secret
from kvgate.worker.sidecar.__main__ import parse_args as parse_sidecar_args
from kvgate.worker.sidecar.registration import EtcdRegistration
from tests.helpers import until
from tests.servers import EtcdServer, NatsServer

NS = "sec"
KEY = b"the-bus-secret"
SUBJECT = "kvgate.sec.load.w0"


def load_msg(worker_id: str = "w0", running: int = 1) -> LoadMessage:
    return LoadMessage(worker_id=worker_id, running=running, waiting=0, kv_usage=0.1, ts=time.time())


# --- the signature envelope (pure) ---------------------------------------------------


def test_sealed_payload_opens_only_with_the_key_on_its_subject_within_the_window():
    payload = encode_load(load_msg())
    now = 1_000_000.0
    sealed = seal(SUBJECT, payload, KEY, now)
    assert unseal(SUBJECT, sealed, KEY, now + 1) == payload
    assert unseal(SUBJECT, sealed, None, now) == payload  # no secret here: stripped, unverified
    assert unseal(SUBJECT, payload, None, now) == payload
    for data, subject, key, at, kind in (
        (payload, SUBJECT, KEY, now, "unsigned"),
        (sealed, SUBJECT, b"another-secret", now, "bad_signature"),
        (sealed, "kvgate.sec.load.w1", KEY, now, "bad_signature"),  # replayed on another worker's subject
        (sealed[:-1] + bytes([sealed[-1] ^ 1]), SUBJECT, KEY, now, "bad_signature"),  # tampered payload
        (sealed[:20], SUBJECT, KEY, now, "bad_signature"),
        (sealed, SUBJECT, KEY, now + 61, "stale_signature"),  # a replay after the window
    ):
        with pytest.raises(BusDecodeError) as err:
            unseal(subject, data, key, at)
        assert err.value.kind == kind


def test_subject_must_name_the_sender():
    """One worker's events or load on another's subject, or a replica speaking for another, are dropped."""
    bus = Bus(None, NS)  # type: ignore[arg-type]  # accept() never touches the connection
    events = encode_events(EventsMessage("w1", 0, 0, 7, [RouterCleared(), RouterStored([1, 2])], reset=True))
    assert bus.accept("kvgate.sec.events.w0", events, decode_events, lambda m: m.worker_id) is None
    assert bus.accept("kvgate.sec.load.w0", encode_load(load_msg("w1")), decode_load, lambda m: m.worker_id) is None
    forged = ActiveMessage(router_id="g1", op="add", request_id="r", worker_id="w0", blocks=10)
    assert bus.accept("kvgate.sec.active.g0", encode_active(forged), decode_active, lambda m: m.router_id) is None
    assert bus.rejected == {"subject_mismatch": 3}
    ok = bus.accept("kvgate.sec.events.w1", events, decode_events, lambda m: m.worker_id)
    assert ok is not None and ok.worker_id == "w1" and bus.rejected == {"subject_mismatch": 3}


def test_bus_with_a_secret_drops_unsigned_and_foreign_signatures():
    clock = [1000.0]
    bus = Bus(None, NS, secret=Secret("s3cret"), clock=lambda: clock[0])  # type: ignore[arg-type]
    payload = encode_load(load_msg())
    assert bus.accept(SUBJECT, payload, decode_load, lambda m: m.worker_id) is None
    foreign = seal(SUBJECT, payload, b"guessed", clock[0])
    assert bus.accept(SUBJECT, foreign, decode_load, lambda m: m.worker_id) is None
    signed = seal(SUBJECT, payload, b"s3cret", clock[0])
    assert bus.accept(SUBJECT, signed, decode_load, lambda m: m.worker_id) == decode_load(payload)
    clock[0] += 120
    assert bus.accept(SUBJECT, signed, decode_load, lambda m: m.worker_id) is None
    assert bus.rejected == {"unsigned": 1, "bad_signature": 1, "stale_signature": 1}


# --- bounds on other replicas' claims (no secret needed) -----------------------------


def test_forged_replica_add_cannot_dominate_a_worker():
    load = LoadTracker()
    sync = ActiveSync("g0", load, known={"w0", "w1"}.__contains__, max_requests_per_replica=3, max_replicas=2)
    huge = ActiveMessage(router_id="evil", op="add", request_id="r", worker_id="w0", blocks=10**9)
    sync.receive(huge)
    many_tokens = ActiveMessage(router_id="evil", op="add", request_id="r2", worker_id="w0", new_prefill_tokens=10**9)
    sync.receive(many_tokens)
    unknown = ActiveMessage(router_id="evil", op="add", request_id="r3", worker_id="nowhere", blocks=1)
    sync.receive(unknown)
    assert len(load) == 0 and sync.stats.rejected == 3
    for i in range(5):  # one replica holds at most max_requests_per_replica
        sync.receive(ActiveMessage(router_id="evil", op="add", request_id=f"ok{i}", worker_id="w1", blocks=2))
    assert len(load) == 3 and sync.stats.rejected == 5
    # An update of a request it already holds is no new request.
    sync.receive(ActiveMessage(router_id="evil", op="prefill_done", request_id="ok0", worker_id="w1", blocks=2))
    assert len(load) == 3 and sync.stats.rejected == 5
    sync.receive(ActiveMessage(router_id="evil", op="finish", request_id="ok0"))
    sync.receive(ActiveMessage(router_id="evil", op="add", request_id="ok9", worker_id="w1", blocks=2))
    assert len(load) == 3
    # At most max_replicas other replicas are counted: a stranger cannot mint ids without end.
    sync.receive(ActiveMessage(router_id="other", op="alive"))
    sync.receive(ActiveMessage(router_id="third", op="add", request_id="x", worker_id="w1", blocks=1))
    assert sync.replicas() == ["evil", "other"] and len(load) == 3 and sync.stats.rejected == 6
    sync.receive(ActiveMessage(router_id="evil", op="leave"))
    assert len(load) == 0
    sync.receive(ActiveMessage(router_id="third", op="add", request_id="x", worker_id="w1", blocks=1))
    assert len(load) == 1


# --- secrets and options ---------------------------------------------------------------


def test_secrets_never_print(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    secret = Secret("hunter2")
    assert "hunter2" not in f"{secret} {secret!r} {[secret]}"
    assert secret.reveal() == "hunter2"
    (tmp_path / "pw").write_text("from-file\n")
    assert read_secret("x", file=tmp_path / "pw") == Secret("from-file")
    monkeypatch.setenv("KVGATE_TEST_SECRET", "from-env")
    assert read_secret("x", env="KVGATE_TEST_SECRET") == Secret("from-env")
    with pytest.raises(ValueError, match="more than once") as err:
        read_secret("x", file=tmp_path / "pw", env="KVGATE_TEST_SECRET")
    assert "from-env" not in str(err.value)
    config = config_from_dict(
        {"nats_url": "nats://127.0.0.1:4222", "nats_user": "u", "nats_password": "hunter2", "bus_secret": "s3cret"}
    )
    security = GatewaySecurity.from_config(config)
    assert "hunter2" not in repr(config) + repr(security) and "s3cret" not in repr(config) + repr(security)
    assert security.nats.connect_options()["password"] == "hunter2" and security.bus_secret == Secret("s3cret")
    with pytest.raises(ValueError, match="user and password"):
        NatsCredentials(user="u")
    with pytest.raises(ValueError, match="pick one"):
        NatsCredentials(user="u", password=Secret("p"), token=Secret("t"))
    with pytest.raises(ValueError, match="nkeys"):
        NatsCredentials(nkey_seed_file=str(tmp_path / "pw"))
    with pytest.raises(ValueError, match="user and password"):
        EtcdCredentials(username="root")
    with pytest.raises(ValueError, match="cannot read etcd TLS CA"):
        EtcdCredentials(ca_file=str(tmp_path / "missing.pem"))


def test_sidecar_reads_credentials_from_files_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "etcd-pw").write_text("etcd-pw\n")
    (tmp_path / "bus").write_text("bus-secret\n")
    monkeypatch.setenv("KVGATE_NATS_PASSWORD", "nats-pw")
    config = parse_sidecar_args(
        [
            *("--engine-url", "http://127.0.0.1:1", "--worker-id", "w0"),
            *("--etcd-user", "kvgate", "--etcd-password-file", str(tmp_path / "etcd-pw")),
            *("--nats-user", "kvgate", "--bus-secret-file", str(tmp_path / "bus")),
        ]
    )
    assert config.etcd_credentials == EtcdCredentials(username="kvgate", password=Secret("etcd-pw"))
    assert config.nats_credentials.connect_options() == {"user": "kvgate", "password": "nats-pw"}
    assert config.bus_secret == Secret("bus-secret")
    assert not {"etcd-pw", "nats-pw", "bus-secret"} & set(repr(config).replace("'", " ").split())


# --- real servers ----------------------------------------------------------------------


async def refused(url: str, **kwargs: Any) -> bool:
    """True when a client with ``kwargs`` cannot get connected within 3 s (refused or retrying)."""
    try:
        nc = await asyncio.wait_for(connect_nats(url, name="probe", **kwargs), 3)
    except Exception:
        return True
    ok = nc.is_connected
    await nc.close()
    return not ok


def nats_with(tmp_path: Path, config: str) -> NatsServer:
    conf = tmp_path / "nats.conf"
    conf.write_text(config)
    server = NatsServer(tmp_path / "nats", conf)
    server.start()
    return server


@pytest.mark.slow
@pytest.mark.integration
async def test_nats_user_password_and_token(tmp_path: Path):
    server = nats_with(tmp_path, 'authorization { user: "kvgate", password: "pw-123" }')
    try:
        assert await refused(server.url)
        wrong = NatsCredentials(user="kvgate", password=Secret("nope"))
        assert await refused(server.url, credentials=wrong)
        good = NatsCredentials(user="kvgate", password=Secret("pw-123"))
        assert not await refused(server.url, credentials=good)
        # The gateway's bus: without credentials it never gets ready, with them it does.
        for credentials, ready in ((None, False), (good, True)):
            bus = GatewayBus(
                server.url, NS, "g0", KvIndexer(), WorkerRegistry(), LoadTracker(), credentials=credentials
            )
            await bus.start()
            try:
                if ready:
                    await bus.wait_ready(10)
                else:
                    with pytest.raises(TimeoutError):
                        await bus.wait_ready(2)
                assert bus.connected is ready
            finally:
                await bus.stop()
    finally:
        server.kill()
    server = nats_with(tmp_path, 'authorization { token: "tok-456" }')
    try:
        assert await refused(server.url)
        assert not await refused(server.url, credentials=NatsCredentials(token=Secret("tok-456")))
    finally:
        server.kill()


def make_tls(directory: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 (openssl CLI)."""
    files = {name: directory / f"{name}.pem" for name in ("ca", "ca-key", "server", "server-key")}
    csr = directory / "server.csr"
    ext = directory / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")

    def openssl(*args: str | Path) -> None:
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=kvgate-test-ca",
            "-keyout", files["ca-key"], "-out", files["ca"])  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
            "-keyout", files["server-key"], "-out", csr)  # fmt: skip
    openssl("x509", "-req", "-in", csr, "-CA", files["ca"], "-CAkey", files["ca-key"], "-CAcreateserial",
            "-days", "1", "-extfile", ext, "-out", files["server"])  # fmt: skip
    return files


@pytest.mark.slow
@pytest.mark.integration
async def test_nats_tls_with_a_private_ca(tmp_path: Path):
    pki = make_tls(tmp_path)
    server = nats_with(tmp_path, f'tls {{ cert_file: "{pki["server"]}", key_file: "{pki["server-key"]}" }}')
    try:
        assert await refused(server.url)  # plaintext client, TLS server
        assert await refused(server.url.replace("nats://", "tls://"))  # system CAs do not know ours
        creds = NatsCredentials(ca_file=str(pki["ca"]))
        nc = await connect_nats(server.url, name="tls", credentials=creds)
        try:
            assert nc.is_connected and nc.connected_url is not None
            bus = Bus(nc, NS)
            got: list[LoadMessage] = []
            await bus.on_load(got.append)
            await bus.publish_load(load_msg())
            await until(lambda: got, "a load message over TLS")
        finally:
            await nc.close()
    finally:
        server.kill()


@pytest.mark.slow
@pytest.mark.integration
async def test_signed_bus_drops_forged_load_restatement_and_replica_messages(tmp_path: Path):
    """A stranger on the bus (connected, no secret) publishes load, a restatement and a replica add:
    the gateway's signed Bus drops them all and still takes the sidecar's signed ones."""
    server = NatsServer(tmp_path / "nats")
    server.start()
    secret = Secret("fleet-secret")
    conns = []
    try:
        gateway_nc, sidecar_nc, stranger_nc = [await connect_nats(server.url, name=n) for n in "gst"]
        conns = [gateway_nc, sidecar_nc, stranger_nc]
        gateway = Bus(gateway_nc, NS, secret=secret)
        sidecar = Bus(sidecar_nc, NS, secret=secret)
        stranger = Bus(stranger_nc, NS)
        loads: list[LoadMessage] = []
        events: list[EventsMessage] = []
        active: list[ActiveMessage] = []
        await gateway.on_load(loads.append)
        await gateway.on_events(events.append)
        await gateway.on_active(active.append)
        asked: list[object] = []
        await sidecar.on_resync("w0", asked.append)
        await gateway_nc.flush()
        await sidecar_nc.flush()
        await stranger.publish_load(load_msg(running=10**6))
        await stranger.publish_events(EventsMessage("w0", 0, 10**9, 1, [RouterCleared(), RouterStored([7])], True))
        await stranger.publish_active(
            ActiveMessage(router_id="g9", op="add", request_id="r", worker_id="w1", blocks=10**6)
        )
        # A captured signed message replayed on another worker's subject fails its signature.
        captured = seal("kvgate.sec.load.w0", encode_load(load_msg("w1")), b"fleet-secret", time.time())
        await stranger_nc.publish("kvgate.sec.load.w1", captured)
        await stranger_nc.flush()
        await until(lambda: sum(gateway.rejected.values()) == 4, lambda: f"rejected {gateway.rejected}")
        assert gateway.rejected == {"unsigned": 3, "bad_signature": 1}
        await sidecar.publish_load(load_msg(running=3))
        await sidecar.publish_events(EventsMessage("w0", 0, 0, 2, [RouterCleared()], True))
        await until(lambda: loads and events, "the sidecar's signed messages")
        assert [m.running for m in loads] == [3] and [m.epoch for m in events] == [2] and active == []
        # The sidecar obeys only signed resync requests (subscribed at the start, above).
        await stranger.request_resync("w0", "g9")
        await stranger_nc.flush()
        await until(lambda: sidecar.rejected["unsigned"] == 1, "the stranger's request dropped")

        async def ask_signed() -> None:
            # Core NATS delivers at most once: ask again until one arrives.
            await gateway.request_resync("w0", "g0")
            await gateway_nc.flush()
            await asyncio.sleep(0.2)

        await until(
            lambda: asked, lambda: f"a signed resync request (sidecar rejected {sidecar.rejected})", step=ask_signed
        )
        await asyncio.sleep(0.1)
        assert asked and all(r.requester == "g0" for r in asked)  # type: ignore[attr-defined]
        assert sidecar.rejected == {"unsigned": 1}
    finally:
        for nc in conns:
            await nc.close()
        server.kill()


@pytest.mark.slow
@pytest.mark.integration
async def test_etcd_with_auth_refuses_a_rogue_worker_key(tmp_path: Path):
    """With etcd auth on, only the kvgate user writes worker keys: a client without credentials
    cannot put a rogue worker (which gateways would forward clients' Authorization headers to)."""
    server = EtcdServer(tmp_path / "etcd")
    server.start()
    try:
        server.enable_auth("root-pw", "kvgate", "kvgate-pw")
        creds = EtcdCredentials(username="kvgate", password=Secret("kvgate-pw"))
        rogue = WorkerInfo("rogue", "http://203.0.113.9:8000", "m")
        anonymous = Endpoints(server.endpoint, 5.0).client()
        try:
            with pytest.raises(aetcd.exceptions.ClientError):
                await anonymous.put(worker_key(NS, "rogue").encode(), b"{}")
        finally:
            await close_client(anonymous)
        wrong = Endpoints(server.endpoint, 5.0, EtcdCredentials(username="kvgate", password=Secret("guess"))).client()
        try:
            with pytest.raises(aetcd.exceptions.ClientError):
                await wrong.put(worker_key(NS, "rogue").encode(), b"{}")
        finally:
            await close_client(wrong)
        # Without credentials the gateway cannot even read the fleet.
        blind = EtcdDiscovery(server.endpoint, NS, WorkerRegistry(), retry_interval=0.1)
        await blind.start()
        with pytest.raises(TimeoutError):
            await blind.wait_ready(1.5)
        await blind.stop()
        registry = WorkerRegistry()
        discovery = EtcdDiscovery(server.endpoint, NS, registry, credentials=creds)
        registration = EtcdRegistration(server.endpoint, NS, WorkerInfo("w0", "http://127.0.0.1:1", "m"),
                                        ttl=3, credentials=creds)  # fmt: skip
        await discovery.start()
        await registration.start()
        try:
            await discovery.wait_ready(10)
            await until(lambda: "w0" in registry, "w0 registered with credentials")
            assert rogue.worker_id not in registry
        finally:
            await registration.stop()
            await discovery.stop()
    finally:
        server.kill()


def test_secure_cluster_credentials_are_files_only_their_owner_reads(tmp_path: Path):
    creds = Credentials.generate(tmp_path)
    for path in (creds.etcd_password_file, creds.nats_password_file, creds.bus_secret_file):
        assert path.stat().st_mode & 0o077 == 0 and len(path.read_text().strip()) >= 32
    args = [str(a) for a in creds.client_args()]
    secrets = {p.read_text().strip() for p in (creds.etcd_password_file, creds.nats_password_file)}
    assert not secrets & set(args)  # files on the command line, never the secrets
    assert (tmp_path / "nats.conf").exists() is False and creds.nats_config(tmp_path / "nats.conf").exists()
