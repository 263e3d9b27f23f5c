"""Sidecar configuration: one typed dataclass, every default in one place.

The CLI (``python -m kvgate.worker.sidecar --help``) only fills it in. Values are checked on
construction so a bad flag fails at start-up with a message naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvgate.bus import NatsCredentials
from kvgate.etcd import EtcdCredentials
from kvgate.protocol.hashing import DEFAULT_BLOCK_SIZE
from kvgate.protocol.messages import check_token
from kvgate.protocol.worker_record import DEFAULT_LEASE_TTL, WorkerInfo
from kvgate.secret import Secret


@dataclass(frozen=True, slots=True)
class SidecarConfig:
    engine_url: str
    """The engine's OpenAI server, e.g. http://127.0.0.1:8000 (health, metrics)."""
    worker_id: str
    model: str = ""
    advertise_url: str | None = None
    """Base URL gateways forward to (registered in etcd); default: ``engine_url``."""
    kv_events_endpoint: str | None = None
    kv_events_replay_endpoint: str | None = None
    kv_events_topic: str = ""
    etcd_endpoints: str | None = None
    """Comma-separated host:port list; None: do not register (events and load only)."""
    nats_url: str | None = None
    """None: publish nothing (discovery only)."""
    namespace: str = "default"
    etcd_credentials: EtcdCredentials = field(default_factory=EtcdCredentials)
    nats_credentials: NatsCredentials = field(default_factory=NatsCredentials)
    bus_secret: Secret | None = None
    """Signs every NATS message (the gateways' ``bus_secret``); None: unsigned."""
    block_size: int = DEFAULT_BLOCK_SIZE
    dp_size: int = 1
    tiers: tuple[str, ...] = ("GPU",)
    health_host: str = "127.0.0.1"
    health_port: int = 0
    lease_ttl: int = DEFAULT_LEASE_TTL
    health_interval: float = 1.0
    """Seconds between engine /health probes."""
    unhealthy_after: int = 2
    """Consecutive failed probes before the worker is deregistered."""
    engine_timeout: float = 2.0
    load_interval: float = 1.0
    """Seconds between engine /metrics scrapes (each publishes load)."""
    heartbeat_interval: float = 2.0
    """An idle event stream sends an empty message this often (consumers' staleness clock)."""
    catch_up_interval: float = 2.0
    """Seconds between asks of the engine's replay socket for batches after the last one
    seen (PUB/SUB drops what is published before the SUB socket connects, and a lost
    last batch would otherwise wait for the next one to reveal the gap); 0: never.
    Passed to ``indexer.sources.ZmqSourceConfig``."""
    resync_min_interval: float = 0.5
    """Resync requests within this window share one snapshot."""
    max_queued_messages: int = 10_000
    """Event messages held while NATS is unreachable; beyond it they are dropped (a
    snapshot follows the reconnect anyway)."""

    def __post_init__(self) -> None:
        check_token("worker_id", self.worker_id)
        check_token("namespace", self.namespace)
        if "/" in self.worker_id or "#" in self.worker_id:
            raise ValueError(f"worker_id must not contain '/' or '#', got {self.worker_id!r}")
        for name in ("block_size", "dp_size", "unhealthy_after", "max_queued_messages"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("health_interval", "engine_timeout", "load_interval", "heartbeat_interval", "resync_min_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.catch_up_interval < 0:
            raise ValueError(f"catch_up_interval must be >= 0 (0: off), got {self.catch_up_interval}")
        if self.lease_ttl < 2:
            raise ValueError(f"lease_ttl must be >= 2 (etcd's minimum), got {self.lease_ttl}")
        if not 0 <= self.health_port < 65536:
            raise ValueError(f"health_port out of range: {self.health_port}")
        if self.kv_events_replay_endpoint and not self.kv_events_endpoint:
            raise ValueError("kv_events_replay_endpoint needs kv_events_endpoint")
        self.worker_info()  # URLs, endpoints and tiers are checked where the gateway checks them

    def worker_info(self) -> WorkerInfo:
        """What the sidecar registers in etcd for gateways."""
        return WorkerInfo(
            worker_id=self.worker_id,
            base_url=self.base_url,
            model=self.model,
            block_size=self.block_size,
            dp_size=self.dp_size,
            kv_events_endpoint=self.kv_events_endpoint,
            kv_events_replay_endpoint=self.kv_events_replay_endpoint,
            tiers=self.tiers,
            metadata={"events": "nats" if self.nats_url else "zmq"},
        )

    @property
    def base_url(self) -> str:
        return (self.advertise_url or self.engine_url).rstrip("/")
