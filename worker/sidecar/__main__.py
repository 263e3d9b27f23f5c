"""``python -m kvgate.worker.sidecar``: run the sidecar beside one engine until SIGTERM / SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from kvgate.bus import NatsCredentials
from kvgate.etcd import EtcdCredentials
from kvgate.protocol.worker_record import DEFAULT_LEASE_TTL
from kvgate.secret import read_secret
from kvgate.worker.sidecar.config import SidecarConfig
from kvgate.worker.sidecar.service import Sidecar

DEFAULTS = SidecarConfig(engine_url="http://127.0.0.1:8000", worker_id="w")


def parse_args(argv: list[str] | None = None) -> SidecarConfig:
    p = argparse.ArgumentParser(
        prog="python -m kvgate.worker.sidecar",
        description="Register a vLLM worker in etcd, relay its KV events to NATS as router events, report its load.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--engine-url", required=True, help="the engine's OpenAI server (health, metrics)")
    p.add_argument("--worker-id", required=True, help="unique worker id (no '.', '/', '#', '*', '>' or spaces)")
    p.add_argument("--model", default=DEFAULTS.model, help="served model name, registered for the gateway")
    p.add_argument("--advertise-url", default=None, help="base URL gateways forward to (default: --engine-url)")
    p.add_argument("--kv-events-endpoint", default=None, help="engine ZMQ PUB endpoint, e.g. tcp://127.0.0.1:5557")
    p.add_argument("--kv-events-replay-endpoint", default=None, help="engine ZMQ replay (ROUTER) endpoint")
    p.add_argument("--kv-events-topic", default=DEFAULTS.kv_events_topic, help="ZMQ topic prefix to subscribe to")
    p.add_argument("--etcd-endpoints", default=None, help="comma-separated etcd host:port list (omit: no registration)")
    p.add_argument("--nats-url", default=None, help="NATS server URL(s), comma-separated (omit: publish nothing)")
    p.add_argument("--namespace", default=DEFAULTS.namespace)
    auth = p.add_argument_group(
        "credentials",
        "secrets come from files or from the environment variables KVGATE_ETCD_PASSWORD, "
        "KVGATE_NATS_PASSWORD, KVGATE_NATS_TOKEN and KVGATE_BUS_SECRET (never from flags: ps shows them)",
    )
    auth.add_argument("--etcd-user", default=None, help="etcd user (etcd auth enabled)")
    auth.add_argument("--etcd-password-file", default=None, help="file holding the etcd password")
    auth.add_argument("--etcd-tls-ca", default=None, help="CA certificate (PEM) of etcd's server: talk TLS to etcd")
    auth.add_argument("--etcd-tls-cert", default=None, help="client certificate (PEM) for etcd --client-cert-auth")
    auth.add_argument("--etcd-tls-key", default=None, help="private key (PEM) of --etcd-tls-cert")
    auth.add_argument("--nats-user", default=None, help="NATS user")
    auth.add_argument("--nats-password-file", default=None, help="file holding the NATS password")
    auth.add_argument("--nats-token-file", default=None, help="file holding the NATS token")
    auth.add_argument("--nats-nkey-seed-file", default=None, help="NATS NKey seed file (needs the nkeys package)")
    auth.add_argument("--nats-creds-file", default=None, help="NATS creds file (JWT + seed; needs nkeys)")
    auth.add_argument("--nats-tls-ca", default=None, help="CA certificate (PEM) of the NATS server: talk TLS")
    auth.add_argument("--nats-tls-cert", default=None, help="client certificate (PEM) for NATS")
    auth.add_argument("--nats-tls-key", default=None, help="private key (PEM) of --nats-tls-cert")
    auth.add_argument("--bus-secret-file", default=None, help="file holding the secret that signs NATS messages")
    p.add_argument("--block-size", type=int, default=DEFAULTS.block_size)
    p.add_argument("--dp-size", type=int, default=DEFAULTS.dp_size)
    p.add_argument("--tiers", default=",".join(DEFAULTS.tiers), help="cache tiers the engine has: GPU[,CPU[,DISK]]")
    p.add_argument("--health-host", default=DEFAULTS.health_host, help="address of the sidecar's /health and /metrics")
    p.add_argument("--health-port", type=int, default=DEFAULTS.health_port, help="0: any free port (logged)")
    p.add_argument("--lease-ttl", type=int, default=DEFAULT_LEASE_TTL, help="etcd lease TTL in seconds")
    p.add_argument("--health-interval", type=float, default=DEFAULTS.health_interval)
    p.add_argument("--unhealthy-after", type=int, default=DEFAULTS.unhealthy_after)
    p.add_argument("--load-interval", type=float, default=DEFAULTS.load_interval)
    p.add_argument("--heartbeat-interval", type=float, default=DEFAULTS.heartbeat_interval)
    p.add_argument(
        "--catch-up-interval",
        type=float,
        default=DEFAULTS.catch_up_interval,
        help="seconds between asks of the replay socket for batches the SUB socket missed (0: never)",
    )
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return SidecarConfig(
            engine_url=args.engine_url,
            worker_id=args.worker_id,
            model=args.model,
            advertise_url=args.advertise_url,
            kv_events_endpoint=args.kv_events_endpoint,
            kv_events_replay_endpoint=args.kv_events_replay_endpoint,
            kv_events_topic=args.kv_events_topic,
            etcd_endpoints=args.etcd_endpoints,
            nats_url=args.nats_url,
            namespace=args.namespace,
            etcd_credentials=EtcdCredentials.from_options(
                user=args.etcd_user,
                password=os.environ.get("KVGATE_ETCD_PASSWORD"),
                password_file=args.etcd_password_file,
                ca_file=args.etcd_tls_ca,
                cert_file=args.etcd_tls_cert,
                key_file=args.etcd_tls_key,
            ),
            nats_credentials=NatsCredentials.from_options(
                user=args.nats_user,
                password=os.environ.get("KVGATE_NATS_PASSWORD"),
                password_file=args.nats_password_file,
                token=os.environ.get("KVGATE_NATS_TOKEN"),
                token_file=args.nats_token_file,
                nkey_seed_file=args.nats_nkey_seed_file,
                creds_file=args.nats_creds_file,
                ca_file=args.nats_tls_ca,
                cert_file=args.nats_tls_cert,
                key_file=args.nats_tls_key,
            ),
            bus_secret=read_secret("bus secret", value=os.environ.get("KVGATE_BUS_SECRET"), file=args.bus_secret_file),
            block_size=args.block_size,
            dp_size=args.dp_size,
            tiers=tuple(t.strip().upper() for t in args.tiers.split(",") if t.strip()),
            health_host=args.health_host,
            health_port=args.health_port,
            lease_ttl=args.lease_ttl,
            health_interval=args.health_interval,
            unhealthy_after=args.unhealthy_after,
            load_interval=args.load_interval,
            heartbeat_interval=args.heartbeat_interval,
            catch_up_interval=args.catch_up_interval,
        )
    except ValueError as err:
        p.error(str(err))


async def run(config: SidecarConfig) -> None:
    sidecar = Sidecar(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await sidecar.start()
    try:
        await stop.wait()
    finally:
        await sidecar.stop()


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        asyncio.run(run(config))
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
