"""The NATS connection and a typed publish / subscribe over ``kvgate.protocol.messages``.

``connect_nats`` opens a client that waits for the server and reconnects forever,
authenticated as ``NatsCredentials`` say (user / password, token, NKey seed or creds
file; TLS with a CA and a client certificate). ``Bus`` publishes and subscribes the
namespace's messages, decoding on the way in and counting (never raising on) what it
drops, by ``kind``: malformed payloads (``BusDecodeError``), a message whose id is not
its subject's (``subject_mismatch``: worker ``a``'s load on ``load.b``), and with a bus
secret, unsigned, badly signed or replayed envelopes (``kvgate.protocol.messages.seal``).
Shared by the gateway (events, load, replica sync) and the sidecar (events, load,
resync). Carries bytes; decides nothing; never logs a secret.
"""

from __future__ import annotations

import importlib.util
import logging
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from kvgate.protocol.messages import (
    DEFAULT_SIGNATURE_WINDOW,
    ActiveMessage,
    BusDecodeError,
    EventsMessage,
    LoadMessage,
    ResyncRequest,
    Subjects,
    decode_active,
    decode_events,
    decode_load,
    decode_resync,
    encode_active,
    encode_events,
    encode_load,
    encode_resync,
    seal,
    unseal,
)
from kvgate.secret import Secret, read_secret

log = logging.getLogger(__name__)

_M = TypeVar("_M")


@dataclass(frozen=True, slots=True)
class NatsCredentials:
    """How a client authenticates to NATS: at most one of user / password, token, NKey
    seed file or creds file (JWT + seed), plus TLS.

    TLS is on with ``ca_file`` (server verified against it), ``cert_file`` + ``key_file``
    (client certificate, for a server with ``verify``), or a ``tls://`` URL (system CAs).
    NKeys and creds files need the ``nkeys`` package (nats-py signs the server's nonce
    with it); that is checked here so a missing one fails at start-up.
    """

    user: str | None = None
    password: Secret | None = None
    token: Secret | None = None
    nkey_seed_file: str | None = None
    creds_file: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def __post_init__(self) -> None:
        if (self.user is None) != (self.password is None):
            raise ValueError("NATS user and password go together: give both or neither")
        methods = [self.user, self.token, self.nkey_seed_file, self.creds_file]
        if sum(m is not None for m in methods) > 1:
            raise ValueError("pick one NATS authentication: user/password, token, NKey seed or creds file")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("NATS TLS client certificate and key go together: give both or neither")
        if (self.nkey_seed_file or self.creds_file) and importlib.util.find_spec("nkeys") is None:
            raise ValueError("NATS NKey / creds authentication needs the nkeys package: pip install nkeys")
        for what, path in (("NKey seed", self.nkey_seed_file), ("creds", self.creds_file)):
            if path is not None:
                _check_readable(what, path)
        self.tls_context()  # reads the certificate files now

    @classmethod
    def from_options(
        cls,
        *,
        user: str | None = None,
        password: str | None = None,
        password_file: str | None = None,
        token: str | None = None,
        token_file: str | None = None,
        nkey_seed_file: str | None = None,
        creds_file: str | None = None,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
    ) -> NatsCredentials:
        """From option values: each secret inline (an environment variable) or from a file."""
        return cls(
            user=user,
            password=read_secret("NATS password", value=password, file=password_file),
            token=read_secret("NATS token", value=token, file=token_file),
            nkey_seed_file=nkey_seed_file,
            creds_file=creds_file,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
        )

    def tls_context(self) -> ssl.SSLContext | None:
        if self.ca_file is None and self.cert_file is None:
            return None
        try:
            context = ssl.create_default_context(cafile=self.ca_file)
            if self.cert_file is not None:
                context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as err:
            raise ValueError(f"NATS TLS files: {err}") from None
        return context

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments of ``nats.connect``."""
        options: dict[str, Any] = {}
        if self.user is not None and self.password is not None:
            options.update(user=self.user, password=self.password.reveal())
        if self.token is not None:
            options["token"] = self.token.reveal()
        if self.nkey_seed_file is not None:
            options["nkeys_seed"] = self.nkey_seed_file
        if self.creds_file is not None:
            options["user_credentials"] = self.creds_file
        tls = self.tls_context()
        if tls is not None:
            options["tls"] = tls
        return options


def _check_readable(what: str, path: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        raise ValueError(f"cannot read NATS {what} file {path}: {err.strerror}") from None


async def connect_nats(
    url: str | Sequence[str],
    *,
    name: str,
    credentials: NatsCredentials | None = None,
    on_reconnected: Callable[[], Awaitable[None]] | None = None,
    on_disconnected: Callable[[], Awaitable[None]] | None = None,
    reconnect_time_wait: float = 0.5,
) -> Client:
    """A nats-py client that never gives up: waits for the server at start, reconnects forever.

    ``url``: one server, a comma-separated list, or a sequence of URLs.

    Publishes made while disconnected are buffered (up to nats-py's pending size) and
    flushed on reconnect; subscriptions are restored by nats-py itself. A server that
    refuses ``credentials`` is retried like an unreachable one (and logged at warning).
    """
    servers = [u.strip() for u in url.split(",") if u.strip()] if isinstance(url, str) else list(url)

    async def error_cb(exc: Exception) -> None:
        # nats-py's errors name the server and the cause ("Authorization Violation"), never a secret.
        if "authorization" in str(exc).lower() or isinstance(exc, ssl.SSLError):
            log.warning("nats %s: %s", name, exc)
        else:
            log.debug("nats %s: %s", name, exc)

    async def reconnected_cb() -> None:
        log.info("nats %s: reconnected", name)
        if on_reconnected is not None:
            await on_reconnected()

    async def disconnected_cb() -> None:
        log.info("nats %s: disconnected", name)
        if on_disconnected is not None:
            await on_disconnected()

    return await nats.connect(
        servers,
        name=name,
        allow_reconnect=True,
        max_reconnect_attempts=-1,
        reconnect_time_wait=reconnect_time_wait,
        connect_timeout=2,
        ping_interval=5,
        max_outstanding_pings=2,
        error_cb=error_cb,
        reconnected_cb=reconnected_cb,
        disconnected_cb=disconnected_cb,
        **(credentials.connect_options() if credentials is not None else {}),
    )


class Bus:
    """Typed publish / subscribe over one NATS connection for one namespace.

    With ``secret`` every message is signed on the way out and only messages signed with
    it (within ``signature_window`` seconds of ``clock``, wall time) are delivered.
    Without one, signed messages are read unverified and unsigned ones too.
    """

    def __init__(
        self,
        nc: Client,
        namespace: str = "default",
        *,
        secret: Secret | None = None,
        signature_window: float = DEFAULT_SIGNATURE_WINDOW,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if signature_window <= 0:
            raise ValueError(f"signature_window must be > 0, got {signature_window}")
        self.nc = nc
        self.subjects = Subjects(namespace)
        self.rejected: Counter[str] = Counter()
        self.signature_window = signature_window
        self.clock = clock
        self._key = secret.reveal().encode() if secret is not None else None
        self._subs: list[Subscription] = []

    @property
    def signing(self) -> bool:
        return self._key is not None

    async def publish_events(self, msg: EventsMessage) -> None:
        await self._publish(self.subjects.events(msg.worker_id), encode_events(msg))

    async def publish_load(self, msg: LoadMessage) -> None:
        await self._publish(self.subjects.load(msg.worker_id), encode_load(msg))

    async def publish_active(self, msg: ActiveMessage) -> None:
        await self._publish(self.subjects.active(msg.router_id), encode_active(msg))

    async def request_resync(self, worker_id: str, requester: str = "") -> None:
        msg = ResyncRequest(worker_id=worker_id, requester=requester)
        await self._publish(self.subjects.resync(worker_id), encode_resync(msg))

    # Each ``on_*`` returns the nats-py subscription; ``unsubscribe`` ends it, ``close`` ends all.
    # The last subject token names the sender; a message naming another one is dropped.

    async def on_events(self, callback: Callable[[EventsMessage], None]) -> Subscription:
        return await self._subscribe(self.subjects.all_events, decode_events, _worker_of, callback)

    async def on_load(self, callback: Callable[[LoadMessage], None]) -> Subscription:
        return await self._subscribe(self.subjects.all_load, decode_load, _worker_of, callback)

    async def on_active(self, callback: Callable[[ActiveMessage], None]) -> Subscription:
        return await self._subscribe(self.subjects.all_active, decode_active, _router_of, callback)

    async def on_resync(self, worker_id: str, callback: Callable[[ResyncRequest], None]) -> Subscription:
        return await self._subscribe(self.subjects.resync(worker_id), decode_resync, _worker_of, callback)

    async def unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subs:
            self._subs.remove(sub)
        try:
            await sub.unsubscribe()
        except Exception as exc:  # a closed connection has nothing left to unsubscribe
            log.debug("unsubscribe: %s", exc)

    async def close(self) -> None:
        """Unsubscribe everything this Bus subscribed; the connection stays the caller's."""
        for sub in list(self._subs):
            await self.unsubscribe(sub)

    async def _publish(self, subject: str, payload: bytes) -> None:
        if self._key is not None:
            payload = seal(subject, payload, self._key, self.clock())
        await self.nc.publish(subject, payload)

    def accept(
        self, subject: str, data: bytes, decode: Callable[[bytes], _M], origin: Callable[[_M], str]
    ) -> _M | None:
        """``data`` received on ``subject`` decoded, or None (counted in ``rejected``) when
        it is malformed, not signed as required, or names another sender than its subject."""
        try:
            decoded = decode(unseal(subject, data, self._key, self.clock(), self.signature_window))
        except BusDecodeError as err:
            self.rejected[err.kind] += 1
            log.warning("dropped a bad message on %s: %s", subject, err)
            return None
        sender = subject.rpartition(".")[2]
        if origin(decoded) != sender:
            self.rejected["subject_mismatch"] += 1
            log.warning("dropped a message on %s sent in the name of %r", subject, origin(decoded))
            return None
        return decoded

    async def _subscribe(
        self,
        subject: str,
        decode: Callable[[bytes], _M],
        origin: Callable[[_M], str],
        callback: Callable[[_M], None],
    ) -> Subscription:
        async def handler(msg: Msg) -> None:
            decoded = self.accept(msg.subject, msg.data, decode, origin)
            if decoded is None:
                return
            try:
                callback(decoded)
            except Exception:
                log.exception("bus callback for %s failed", msg.subject)

        sub = await self.nc.subscribe(subject, cb=handler)
        self._subs.append(sub)
        return sub


def _worker_of(msg: EventsMessage | LoadMessage | ResyncRequest) -> str:
    return msg.worker_id


def _router_of(msg: ActiveMessage) -> str:
    return msg.router_id
