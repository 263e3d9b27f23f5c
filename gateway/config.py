"""Gateway configuration: typed dataclasses with every default in one place.

Sources fill them in, lowest precedence first: the defaults below, the YAML file
(``--config``), environment variables ``KVGATE_<OPTION>`` and command-line flags. The
YAML keys are the option names in snake_case; the flags are the same names in kebab
case. The router's own settings (``router.config.RouterConfig``: cost weights, busy
thresholds, temperature, ...) live under the ``kv:`` section / ``--kv-*`` flags and keep
their defaults in ``router/config.py``. ``router_mode`` and ``block_size`` sit at the top
level because the workers' block size must agree with them.

This module never starts anything; ``load_config`` only parses and validates.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from kvgate.etcd import parse_endpoints
from kvgate.protocol.messages import check_token
from kvgate.protocol.worker_record import workers_prefix
from kvgate.router.config import ROUTER_MODES, RouterConfig
from kvgate.router.registry import StaticDiscovery

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "models" / "kvgate-tiny"
ENV_PREFIX = "KVGATE_"
DISCOVERY_MODES = ("static", "etcd")


def _opt(default: Any, help: str, **extra: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


@dataclass(slots=True)
class GatewayConfig:
    host: str = _opt("127.0.0.1", "address to listen on")
    port: int = _opt(8000, "port to listen on")
    api_keys: list[str] = field(
        default_factory=list,
        repr=False,
        metadata={
            "help": "keys a client must send as 'Authorization: Bearer <key>' on the OpenAI routes; none: "
            "those routes are open. Prefer api_key_file or KVGATE_API_KEYS (comma-separated): flags show in ps"
        },
    )
    api_key_file: str | None = _opt(None, "file of API keys, one per line ('#' comments); added to api_keys")
    admin_key: str | None = field(
        default=None,
        repr=False,
        metadata={
            "help": "key /debug/route and /metrics require ('Authorization: Bearer <key>'), wherever they are "
            "served; set it as KVGATE_ADMIN_KEY or use admin_key_file (flags show in ps)"
        },
    )
    admin_key_file: str | None = _opt(None, "file holding the admin key")
    admin_host: str = _opt("127.0.0.1", "address of the admin listener (/debug/route, /metrics, detailed /health)")
    admin_port: int | None = _opt(
        None, "port of the admin listener; 0: any free port (default: port + 1, or any free port when port is 0)"
    )
    admin_on_public_port: bool = _opt(
        False,
        "serve /debug/route and /metrics on the public port instead of an admin listener "
        "(single-box setups and the dev tooling; an admin key, if set, is still required)",
    )
    rate_limit_requests: int = _opt(
        0, "requests per minute per API key (per client address without keys); past it: 429; 0: no limit"
    )
    rate_limit_tokens: int = _opt(
        0, "prompt tokens per minute per API key (per client address without keys); past it: 429; 0: no limit"
    )
    model: str = _opt(str(DEFAULT_MODEL), "tokenizer + chat template: a local directory or a hub id")
    served_model_name: str | None = _opt(None, "model name clients send (default: basename of --model)")
    revision: str | None = _opt(None, "hub revision of --model (branch, tag or commit)")
    trust_remote_code: bool = _opt(False, "allow a hub tokenizer's custom code")
    chat_template: str | None = _opt(
        None,
        "chat template file or text overriding the tokenizer's (like vLLM's "
        "--chat-template; give the workers the same one)",
    )
    trust_request_chat_template: bool = _opt(
        False,
        "render a request's own `chat_template` (like vLLM's --trust-request-chat-template; give the workers "
        "the same flag); without it such requests get vLLM's 400",
    )
    tokenizer_offload_chars: int | None = _opt(
        None,
        "prompts at least this long are tokenized in a thread, off the event loop (default: tokenization.py's, 1536)",
    )
    tokenizer_threads: int | None = _opt(None, "threads that tokenize long prompts (default: tokenization.py's, 2)")
    tokenizer_split_parts: int | None = _opt(
        None,
        "a long text to encode (8k+ chars) is encoded in up to this many parts at once, joined where the cut "
        "is exact; 1: off (default: one per CPU the process may use)",
    )
    route_head_chars: int | None = _opt(
        None,
        "a prompt with at least 4x this many chars to encode is first encoded only to a head (512 chars, or "
        "this many if fewer), and routed on that head alone when no worker holds all of it (the rest is never "
        "encoded; when one does, a head 4x as long follows); 0: off (default: tokenization.py's, 2048)",
    )
    tokenizer_cache_bytes: int | None = _opt(
        None, "byte budget of the tokenizer's per-segment LRU; 0: off (default: tokenization.py's, 128 MiB)"
    )
    lora_adapters: list[str] = _opt(
        [], "LoRA adapter names served by the workers; a request naming one is hashed with the adapter's seed"
    )
    context_length: int | None = _opt(None, "max prompt + completion tokens (default: the model's)")
    router_mode: str = _opt("kv", "routing policy", choices=ROUTER_MODES)
    kv_events: str = _opt(
        "on",
        "off: ignore the workers' KV events and route on what this gateway sent (approximate mode; "
        "set --kv-prediction-capacity-blocks to the engines' GPU block count)",
        choices=("on", "off"),
    )
    block_size: int = _opt(64, "KV block size in tokens; must match the workers' --block-size")
    workers: list[dict[str, Any]] = _opt(
        [],
        "static workers (router.registry.StaticDiscovery entries); flag form: "
        "url=http://H:P[,id=NAME][,kv_events_endpoint=tcp://H:P]"
        "[,kv_events_replay_endpoint=tcp://H:P][,dp_size=N] (repeatable)",
    )
    discovery: str = _opt(
        "static",
        "where workers come from: the workers list, or etcd (leases under "
        "/kvgate/<namespace>/workers/, kept by each worker's sidecar)",
        choices=DISCOVERY_MODES,
    )
    etcd_endpoints: str | None = _opt(None, "etcd host:port list, comma-separated (discovery etcd)")
    nats_url: str | None = _opt(
        None,
        "NATS server URL(s), comma-separated: KV events and load of workers whose "
        "sidecar publishes them, in-flight load shared with the other gateway "
        "replicas (default: none; events come from each worker's ZMQ socket)",
    )
    namespace: str = _opt(
        "default", "fleet name: etcd keys /kvgate/<namespace>/workers/, NATS subjects kvgate.<namespace>.*"
    )
    etcd_user: str | None = _opt(None, "etcd user (etcd auth enabled); its password from etcd_password[_file]")
    etcd_password: str | None = field(
        default=None,
        repr=False,
        metadata={"help": "etcd password; set it as KVGATE_ETCD_PASSWORD or use etcd_password_file (flags show in ps)"},
    )
    etcd_password_file: str | None = _opt(None, "file holding the etcd password")
    etcd_tls_ca: str | None = _opt(None, "CA certificate (PEM) of etcd's server certificate: talk TLS to etcd")
    etcd_tls_cert: str | None = _opt(None, "client certificate (PEM) for etcd --client-cert-auth; needs etcd_tls_key")
    etcd_tls_key: str | None = _opt(None, "private key (PEM) of etcd_tls_cert")
    nats_user: str | None = _opt(None, "NATS user; its password from nats_password[_file]")
    nats_password: str | None = field(
        default=None,
        repr=False,
        metadata={"help": "NATS password; set it as KVGATE_NATS_PASSWORD or use nats_password_file (flags show in ps)"},
    )
    nats_password_file: str | None = _opt(None, "file holding the NATS password")
    nats_token: str | None = field(
        default=None,
        repr=False,
        metadata={"help": "NATS token; set it as KVGATE_NATS_TOKEN or use nats_token_file (flags show in ps)"},
    )
    nats_token_file: str | None = _opt(None, "file holding the NATS token")
    nats_nkey_seed_file: str | None = _opt(None, "NATS NKey seed file (needs the nkeys package)")
    nats_creds_file: str | None = _opt(None, "NATS creds file: user JWT + NKey seed (needs the nkeys package)")
    nats_tls_ca: str | None = _opt(None, "CA certificate (PEM) of the NATS server's certificate: talk TLS to NATS")
    nats_tls_cert: str | None = _opt(None, "client certificate (PEM) for a NATS server that verifies clients")
    nats_tls_key: str | None = _opt(None, "private key (PEM) of nats_tls_cert")
    bus_secret: str | None = field(
        default=None,
        repr=False,
        metadata={
            "help": "shared secret signing every NATS message (HMAC-SHA256); unsigned or badly signed "
            "ones are dropped. Set it as KVGATE_BUS_SECRET or use bus_secret_file (flags show in ps)"
        },
    )
    bus_secret_file: str | None = _opt(None, "file holding the bus secret (same on every gateway and sidecar)")
    router_id: str | None = _opt(
        None,
        "this replica's id on NATS (kvgate.<namespace>.active.<router_id>); "
        "unique per replica (default: <hostname>-<pid>)",
    )
    events_stale_after: float = _opt(
        6.0,
        "seconds a NATS-fed worker's event stream may stay silent or out of "
        "sync before its index state is ignored and it is routed by load only "
        "(sidecars heartbeat every 2 s)",
    )
    events_max_batch_blocks: int = _opt(
        16_384,
        "a ZMQ event batch naming more blocks than this is rejected (kind batch_too_large) "
        "instead of holding the event loop while it applies",
    )
    events_catch_up_interval: float = _opt(
        2.0,
        "seconds between asks of a quiet ZMQ-fed worker's replay socket "
        "for batches its SUB socket missed (published before it connected); "
        "0: never",
    )
    events_missing_after: float = _opt(
        5.0,
        "seconds after a ZMQ-fed worker answered a request that stored new KV blocks "
        "without any event batch arriving from it before its events are declared "
        "missing (a warning, kvgate_worker_events_missing, /health) and it is routed "
        "by load only until a batch arrives; keep it above events_catch_up_interval; 0: never",
    )
    replica_timeout: float = _opt(
        5.0,
        "seconds without a message from another replica (each heartbeats every "
        "replica_timeout/4) before its in-flight requests are forgotten",
    )
    prediction_window: int = _opt(
        20,
        "answers per worker (with cached tokens predicted or reported) over which the index's "
        "predictions are judged against the engine's reported cached tokens; 0: count, never judge",
    )
    prediction_mismatches: int = _opt(
        10,
        "answers of that window off by a block or more that stop trusting the worker's index "
        "(routed by load alone until a full window agrees again)",
    )
    connect_timeout: float = _opt(3.0, "seconds to open a connection to a worker before trying the next one")
    read_timeout: float = _opt(
        600.0,
        "seconds a worker may stay silent (before the first byte or between chunks) before the request fails with 504",
    )
    max_attempts: int = _opt(3, "workers tried per request on connect failure or 5xx before the first byte")
    keepalive_connections: int = _opt(256, "idle keep-alive connections kept open per worker")
    client_max_size: int = _opt(16 * 1024 * 1024, "largest request body accepted, in bytes (413 above)")
    health_interval: float = _opt(
        0.5,
        "seconds between polls of each worker's /health (skipped when it completed an answer "
        "since the last one); a worker seen down has its index forgotten (its engine may "
        "come back empty), so an outage longer than twice this plus one poll is always seen",
    )
    max_messages: int = _opt(4096, "most messages one chat request may carry (400 above; vLLM has no such limit)")
    header_timeout: float = _opt(
        10.0, "seconds from a request's first byte until its headers are complete; past it: 408, connection closed"
    )
    body_timeout: float = _opt(60.0, "seconds from a request's headers until its whole body has arrived; past it: 408")
    keepalive_timeout: float = _opt(75.0, "seconds a client connection may sit idle between requests before closing")
    max_connections: int = _opt(
        4096, "client connections open at once; a connection beyond it gets a 503 and is closed at once"
    )
    max_header_size: int = _opt(8190, "longest request line or header field, in bytes (431 above)")
    max_headers: int = _opt(128, "most header fields a request may carry (431 above)")
    load_interval: float = _opt(1.0, "seconds between scrapes of each worker's /metrics (engine load)")
    probe_timeout: float = _opt(2.0, "timeout of one health poll or load scrape, in seconds")
    log_level: str = _opt("info", "logging level", choices=("debug", "info", "warning", "error"))
    access_log: bool = _opt(False, "log every HTTP request (costs throughput)")
    # -- the serving processes (gateway CPU cost) --
    processes: int = _opt(
        1,
        "gateway processes serving the public port together (SO_REUSEPORT; the kernel spreads the "
        "connections): each tokenizes, routes and relays on its own core and consumes every KV event "
        "itself; in-flight load is per process unless nats_url shares it; process i serves the admin "
        "endpoints on admin port + i",
    )
    uvloop: bool = _opt(True, "run the event loop on uvloop when it is installed (--no-uvloop: asyncio's own)")
    loop_probe: bool = _opt(
        False,
        "diagnostic: time every event-loop callback's CPU and export the longest "
        "(kvgate_event_loop_max_callback_seconds); runs on asyncio's loop, not uvloop, and costs ~2 us a callback",
    )
    kv: RouterConfig = field(
        default_factory=RouterConfig,
        metadata={"help": "router settings (router/config.py); mode and block_size come from router_mode / block_size"},
    )

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536 and self.port != 0:
            raise ValueError(f"port must be in 1..65535 (or 0 for any free port), got {self.port}")
        for name in (
            "connect_timeout",
            "read_timeout",
            "health_interval",
            "load_interval",
            "probe_timeout",
            "events_stale_after",
            "replica_timeout",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name, minimum in (
            ("max_attempts", 1),
            ("client_max_size", 1),
            ("keepalive_connections", 0),
            ("block_size", 1),
        ):
            if getattr(self, name) < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {getattr(self, name)}")
        for name in ("events_catch_up_interval", "events_missing_after"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0: off), got {getattr(self, name)}")
        if self.admin_port is not None and not 0 <= self.admin_port < 65536:
            raise ValueError(f"admin_port must be in 1..65535 (or 0 for any free port), got {self.admin_port}")
        if self.admin_port is None and self.port == 65535 and not self.admin_on_public_port:
            raise ValueError("port 65535 leaves no port + 1 for the admin listener: set admin_port")
        if not self.admin_on_public_port and self.admin_port is not None and self.admin_port == self.port != 0:
            raise ValueError(f"admin_port {self.admin_port} is the public port: use admin_on_public_port")
        for name in ("rate_limit_requests", "rate_limit_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0: no limit), got {getattr(self, name)}")
        if not all(isinstance(k, str) and k.strip() == k and k for k in self.api_keys):
            raise ValueError("api_keys must be non-empty strings without surrounding whitespace")
        for name in ("header_timeout", "body_timeout", "keepalive_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.processes < 1:
            raise ValueError(f"processes must be >= 1, got {self.processes}")
        if self.processes > 1 and self.port == 0:
            raise ValueError("processes > 1 share one port: set port (0 would give each process its own)")
        for name in ("max_messages", "max_connections", "max_header_size", "max_headers", "events_max_batch_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.prediction_window < 0:
            raise ValueError(f"prediction_window must be >= 0 (0: never judge), got {self.prediction_window}")
        if self.prediction_window and not 1 <= self.prediction_mismatches <= self.prediction_window:
            raise ValueError(
                f"prediction_mismatches must be in 1..prediction_window ({self.prediction_window}), "
                f"got {self.prediction_mismatches}"
            )
        for name in ("context_length", "tokenizer_offload_chars", "tokenizer_threads", "tokenizer_split_parts"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.route_head_chars is not None and self.route_head_chars < 0:
            raise ValueError(f"route_head_chars must be >= 0 (0: off), got {self.route_head_chars}")
        if self.tokenizer_cache_bytes is not None and self.tokenizer_cache_bytes < 0:
            raise ValueError(f"tokenizer_cache_bytes must be >= 0 (0: off), got {self.tokenizer_cache_bytes}")
        # Defaulted ids and full validation happen here, so a bad list fails at start-up.
        self.workers = [{"id": f"w{i}", **w} if isinstance(w, Mapping) else w for i, w in enumerate(self.workers)]
        StaticDiscovery(self.workers, model=self.model_name, block_size=self.block_size)
        self._check_distributed()
        # One source of truth for the two settings the router shares with the gateway.
        self.kv = replace(self.kv, mode=self.router_mode, block_size=self.block_size)
        if self.kv_events == "off":
            self.kv = replace(self.kv, approximate=True)

    @property
    def admin_listen_port(self) -> int:
        """The admin listener's port: ``admin_port``, else the public port + 1 (0 stays 0: any free port)."""
        if self.admin_port is not None:
            return self.admin_port
        return self.port + 1 if self.port else 0

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model.rstrip("/")).name

    def preprocessor_options(self) -> dict[str, Any]:
        """Keyword arguments of ``tokenization.PreprocessorConfig`` (its defaults where unset)."""
        options: dict[str, Any] = {
            "revision": self.revision,
            "trust_remote_code": self.trust_remote_code,
            "chat_template": self.chat_template,
            "trust_request_chat_template": self.trust_request_chat_template,
            "context_length": self.context_length,
        }
        if self.tokenizer_offload_chars is not None:
            options["offload_threshold_chars"] = self.tokenizer_offload_chars
        if self.tokenizer_threads is not None:
            options["executor_threads"] = self.tokenizer_threads
        if self.tokenizer_cache_bytes is not None:
            options["segment_cache_bytes"] = self.tokenizer_cache_bytes
        if self.tokenizer_split_parts is not None:
            options["split_parts"] = self.tokenizer_split_parts
        if self.route_head_chars is not None:
            options["head_chars"] = self.route_head_chars
        return options

    def static_discovery(self) -> StaticDiscovery:
        return StaticDiscovery(self.workers, model=self.model_name, block_size=self.block_size)

    @property
    def replica_id(self) -> str:
        """``router_id``, or one made of the host name and process id (unique per replica)."""
        if self.router_id is not None:
            return self.router_id
        return re.sub(r"[^A-Za-z0-9_-]+", "-", f"{socket.gethostname()}-{os.getpid()}")

    def _check_distributed(self) -> None:
        check_token("namespace", self.namespace)
        workers_prefix(self.namespace)  # also rejects '/', which would split the etcd key
        if self.router_id is not None:
            check_token("router_id", self.router_id)
        if self.discovery == "etcd":
            if not self.etcd_endpoints:
                raise ValueError("discovery etcd needs etcd_endpoints (host:port[,host:port...])")
            if self.workers:
                raise ValueError("workers is the static list; with discovery etcd the workers come from etcd")
            parse_endpoints(self.etcd_endpoints)
        elif self.etcd_endpoints is not None:
            raise ValueError("etcd_endpoints is only read with discovery etcd")
        if self.nats_url is not None and not any(u.strip() for u in self.nats_url.split(",")):
            raise ValueError(f"nats_url must name at least one server, got {self.nats_url!r}")


def _field_kind(f: Any) -> tuple[type, bool]:
    """(scalar type, optional) for a GatewayConfig field, from its annotation string."""
    annotation = str(f.type).replace(" ", "")
    optional = annotation.endswith("|None")
    base = annotation.removesuffix("|None")
    return {"str": str, "int": int, "float": float, "bool": bool}.get(base, object), optional


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m kvgate.gateway",
        description="kvgate: a KV-cache-aware OpenAI-compatible gateway in front of vLLM workers. "
        f"Precedence: defaults < --config YAML < {ENV_PREFIX}<OPTION> env vars < flags.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="YAML file whose keys are the options below in snake_case")
    defaults = GatewayConfig()
    for f in fields(GatewayConfig):
        if f.name == "kv":
            continue
        flag = "--" + f.name.replace("_", "-")
        meta = f.metadata
        if f.name == "workers":
            parser.add_argument(
                "--worker", dest="workers", action="append", type=_parse_worker_flag, metavar="SPEC", help=meta["help"]
            )
            continue
        if f.name == "api_keys":
            parser.add_argument(
                "--api-key", dest="api_keys", action="append", metavar="KEY", help=meta["help"] + " (repeatable)"
            )
            continue
        if f.name == "lora_adapters":
            parser.add_argument(
                "--lora-adapter",
                dest="lora_adapters",
                action="append",
                metavar="NAME",
                help=meta["help"] + " (repeatable)",
            )
            continue
        kind, _ = _field_kind(f)
        help_text = meta["help"]
        if meta.get("choices"):
            help_text += " (" + " | ".join(meta["choices"]) + ")"
        if "default:" not in help_text:
            help_text += f" (default: {getattr(defaults, f.name)})"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(flag, type=kind, choices=meta.get("choices"), metavar=f.name.upper(), help=help_text)
    group = parser.add_argument_group("router (kv: section of the YAML)")
    for path, leaf, default in _router_leaves(RouterConfig()):
        kind = bool if isinstance(default, bool) else (type(default) if default is not None else None)
        flag = "--kv-" + leaf.replace("_", "-")
        dest = "kv." + ".".join(path)
        help_text = f"router {'.'.join(path)} (default: {default})"
        if kind is bool:
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            group.add_argument(
                flag, dest=dest, type=_number_or_none if kind is None else kind, metavar=leaf.upper(), help=help_text
            )
    return parser


def _router_leaves(obj: Any, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], str, Any]]:
    out = []
    for f in fields(obj):
        if f.name in ("mode", "block_size"):
            continue
        value = getattr(obj, f.name)
        if is_dataclass(value):
            out.extend(_router_leaves(value, prefix + (f.name,)))
        else:
            out.append((prefix + (f.name,), f.name, value))
    return out


def _number_or_none(text: str) -> float | int | None:
    if text.lower() in ("none", "null", "off"):
        return None
    return int(text) if text.lstrip("-").isdigit() else float(text)


def _parse_worker_flag(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep:
            if key.startswith(("http://", "https://")) and "url" not in out:
                out["url"] = key
                continue
            raise argparse.ArgumentTypeError(f"expected key=value in {text!r}")
        out[key.strip()] = int(value) if key.strip() == "dp_size" else value.strip()
    return out


def load_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> GatewayConfig:
    """Defaults < YAML < environment < flags; raises SystemExit (argparse) on a bad flag."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    try:
        merged: dict[str, Any] = {}
        path = args.pop("config", None)
        if path is not None:
            merged = read_yaml(path)
        _merge(merged, _from_env(os.environ if environ is None else environ))
        _merge(merged, _unflatten(args))
        return config_from_dict(merged)
    except ValueError as err:
        parser.error(str(err))
        raise


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except OSError as err:
        raise ValueError(f"cannot read config {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"config {path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config {path} must be a mapping of options, got {type(data).__name__}")
    return data


def config_from_dict(data: Mapping[str, Any]) -> GatewayConfig:
    """Validate a merged option mapping (YAML-shaped) into a GatewayConfig."""
    known = {f.name: f for f in fields(GatewayConfig)}
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        f = known[name]
        if name == "workers":
            if not isinstance(value, list):
                raise ValueError("workers must be a list of {id, url, kv_events_endpoint, ...} mappings")
            kwargs[name] = value
        elif name == "kv":
            if not isinstance(value, Mapping):
                raise ValueError(f"kv must be a mapping of router settings, got {value!r}")
            clash = sorted({"mode", "block_size"} & set(value))
            if clash:
                raise ValueError(f"kv.{clash[0]}: set it with the top-level router_mode / block_size")
            kwargs[name] = RouterConfig.from_dict(value, "kv")
        elif name == "lora_adapters":
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"lora_adapters must be a list of names, got {value!r}")
            kwargs[name] = list(value)
        elif name == "api_keys":
            # The message never quotes a value: it may be a key.
            if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
                raise ValueError("api_keys must be a list of non-empty strings")
            kwargs[name] = [v.strip() for v in value]
        else:
            kwargs[name] = _check_scalar(f, value)
    if "router_mode" in kwargs and kwargs["router_mode"] not in ROUTER_MODES:
        raise ValueError(f"router_mode must be one of {', '.join(ROUTER_MODES)}, got {kwargs['router_mode']!r}")
    return GatewayConfig(**kwargs)


def _check_scalar(f: Any, value: Any) -> Any:
    kind, optional = _field_kind(f)
    if value is None and optional:
        return None
    if kind is float and type(value) is int:
        value = float(value)
    if type(value) is not kind:
        # A secret's value is never quoted back.
        shown = repr(value) if f.repr else type(value).__name__
        raise ValueError(f"{f.name} must be {kind.__name__}, got {shown}")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ValueError(f"{f.name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(GatewayConfig):
        raw = environ.get(ENV_PREFIX + f.name.upper())
        if raw is None or f.name in ("kv", "workers", "lora_adapters"):
            continue
        if f.name == "api_keys":
            out[f.name] = [k.strip() for k in raw.split(",") if k.strip()]
            continue
        kind, _ = _field_kind(f)
        try:
            if kind is bool:
                out[f.name] = raw.strip().lower() in ("1", "true", "yes", "on")
            else:
                out[f.name] = kind(raw)
        except ValueError:
            raise ValueError(f"{ENV_PREFIX}{f.name.upper()}={raw!r} is not a valid {kind.__name__}") from None
    return out


def _unflatten(args: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in args.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> None:
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), Mapping):
            merged = dict(base[key])
            _merge(merged, value)
            base[key] = merged
        else:
            base[key] = value


__all__ = ["GatewayConfig", "build_parser", "config_from_dict", "load_config", "read_yaml", "DEFAULT_MODEL"]
