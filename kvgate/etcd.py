"""etcd connections shared by discovery (the gateway) and registration (the sidecar).

``parse_endpoints`` reads ``host:port`` lists; ``Endpoints`` hands out a fresh client
per connection attempt, rotating through the endpoints, with gRPC keepalives that
detect a silently dead etcd. ``EtcdCredentials`` is how a client proves who it is:
etcd's user / password (aetcd authenticates and sends the token with every call) and
TLS (server CA, client certificate and key; aetcd only opens plaintext channels, so
``_TlsClient`` opens a secure one). Knows nothing of what is stored; never logs a
password.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aetcd
import aetcd.client
import aetcd.rpc
import grpc  # type: ignore[import-untyped]

from kvgate.secret import Secret, read_secret

log = logging.getLogger(__name__)

# Keepalive pings detect a silently dead etcd (partition, SIGSTOP) on a watch stream that
# would otherwise wait forever; etcd refuses pings more often than every 5 s by default.
_GRPC_OPTIONS = {
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.keepalive_permit_without_calls": 1,
    "grpc.initial_reconnect_backoff_ms": 200,
    "grpc.max_reconnect_backoff_ms": 2_000,
}


def parse_endpoints(endpoints: str | Sequence[str]) -> list[tuple[str, int]]:
    """``"host:port,host:port"`` (or a list; ``http://`` prefixes allowed) -> [(host, port)]."""
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    parsed: list[tuple[str, int]] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        parts = urlsplit(item if "://" in item else f"http://{item}")
        try:
            port = parts.port or 2379
        except ValueError:
            raise ValueError(f"bad etcd endpoint {item!r}") from None
        if not parts.hostname:
            raise ValueError(f"bad etcd endpoint {item!r}")
        parsed.append((parts.hostname, port))
    if not parsed:
        raise ValueError("at least one etcd endpoint is required")
    return parsed


@dataclass(frozen=True, slots=True)
class EtcdCredentials:
    """How a client authenticates to etcd: user / password, TLS, or both.

    ``ca_file`` alone: TLS, server verified against that CA; with ``cert_file`` +
    ``key_file`` the client also presents a certificate (etcd ``--client-cert-auth``).
    The files are read once, here, so a missing one fails at start-up.
    """

    username: str | None = None
    password: Secret | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def __post_init__(self) -> None:
        if (self.username is None) != (self.password is None):
            raise ValueError("etcd user and password go together: give both or neither")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("etcd TLS client certificate and key go together: give both or neither")
        if self.cert_file is not None and self.ca_file is None:
            raise ValueError("an etcd TLS client certificate needs the CA that signed the server's (etcd TLS CA)")
        self.channel_credentials()  # reads the files now

    @classmethod
    def from_options(
        cls,
        *,
        user: str | None = None,
        password: str | None = None,
        password_file: str | None = None,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
    ) -> EtcdCredentials:
        """From option values: the password inline (an environment variable) or from a file."""
        return cls(
            username=user,
            password=read_secret("etcd password", value=password, file=password_file),
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
        )

    @property
    def tls(self) -> bool:
        return self.ca_file is not None

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if self.ca_file is None:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file, "etcd TLS CA"),
            private_key=_read(self.key_file, "etcd TLS key") if self.key_file else None,
            certificate_chain=_read(self.cert_file, "etcd TLS certificate") if self.cert_file else None,
        )


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read {what} {path}: {err.strerror}") from None


class _TlsClient(aetcd.Client):  # type: ignore[misc]  # aetcd is untyped
    """An aetcd client over a TLS channel (aetcd itself opens plaintext ones only).

    Mirrors ``aetcd.Client.connect`` with ``secure_channel``; the user / password
    handshake is aetcd's own and runs over the secure channel.
    """

    _is_connecting: bool

    def __init__(self, credentials: grpc.ChannelCredentials, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._channel_credentials = credentials

    @aetcd.client._handle_errors  # type: ignore[untyped-decorator]
    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        try:
            self._is_connecting = True
            target = f"{self._host}:{self._port}"
            self.channel = aetcd.rpc.secure_channel(
                target, self._channel_credentials, options=list(self._options.items())
            )
            if self._username is not None and self._password is not None:
                self.auth_stub = aetcd.rpc.AuthStub(self.channel)
                request = aetcd.rpc.AuthenticateRequest(name=self._username, password=self._password)
                reply = await self.auth_stub.Authenticate(request, timeout=self._timeout)
                self.metadata = (("token", reply.token),)
            self.kvstub = aetcd.rpc.KVStub(self.channel)
            self.clusterstub = aetcd.rpc.ClusterStub(self.channel)
            self.leasestub = aetcd.rpc.LeaseStub(self.channel)
            self.maintenancestub = aetcd.rpc.MaintenanceStub(self.channel)
            self._watcher = aetcd.client.watcher.Watcher(
                aetcd.rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
            )
            self._connected.set()
        finally:
            self._is_connecting = False


class Endpoints:
    """Round-robin over etcd endpoints; a fresh client per connection attempt."""

    def __init__(
        self, endpoints: str | Sequence[str], timeout: float, credentials: EtcdCredentials | None = None
    ) -> None:
        self.endpoints = parse_endpoints(endpoints)
        self.timeout = timeout
        self.credentials = credentials or EtcdCredentials()
        self._channel_credentials = self.credentials.channel_credentials()
        self._next = random.randrange(len(self.endpoints))

    def client(self) -> aetcd.Client:
        host, port = self.endpoints[self._next % len(self.endpoints)]
        self._next += 1
        creds = self.credentials
        kwargs: dict[str, Any] = {
            "host": host,
            "port": port,
            "timeout": self.timeout,
            "options": dict(_GRPC_OPTIONS),
            "username": creds.username,
            "password": creds.password.reveal() if creds.password is not None else None,
        }
        if self._channel_credentials is not None:
            return _TlsClient(self._channel_credentials, **kwargs)
        return aetcd.Client(**kwargs)


CLOSE_TIMEOUT = 5.0


async def close_client(client: aetcd.Client | None, timeout: float = CLOSE_TIMEOUT) -> None:
    """Close ``client``, giving up after ``timeout`` seconds: a stop must not hang on a stuck channel.

    aetcd's watcher shutdown catches ``CancelledError`` while it waits for its stream task,
    so a cancellation that arrives during the close is swallowed there and the caller's
    loop would run on (a stopped discovery watching again, its ``stop()`` waiting
    forever). A cancellation that arrived meanwhile is raised here again.
    """
    if client is None:
        return
    task = asyncio.current_task()
    cancels = task.cancelling() if task is not None else 0
    try:
        async with asyncio.timeout(timeout):
            await client.close()
    except TimeoutError:
        log.warning("etcd client close: no answer in %.1fs; abandoning the channel", timeout)
    except Exception as exc:  # closing a broken channel can itself fail; nothing to keep
        log.debug("etcd client close: %s", exc)
    if task is not None and task.cancelling() > cancels:
        raise asyncio.CancelledError
