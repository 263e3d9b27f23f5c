"""Who may call the gateway, and how often: API keys, the admin key, per-client rate limits.

Owns the keys (read once at start-up from the options, a key file or ``KVGATE_*``
variables), their check against an ``Authorization: Bearer <key>`` header in constant
time, the OpenAI-style 401 and 429 answers, and the token buckets that cap requests and
prompt tokens per minute per key (per client address when no keys are configured), in
bounded memory. A key is never logged, stored in clear past start-up or shown in a
``repr``: a matched key is known by its position in the configured list (``key#2``).

It never decides which path needs which key (``app.py`` does) and never reads a body.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kvgate.gateway.config import GatewayConfig
from kvgate.gateway.errors import ApiError
from kvgate.secret import read_secret

log = logging.getLogger(__name__)

# Token buckets refill over this window: the limits are per minute.
WINDOW_SECONDS = 60.0
# Most clients with a bucket at once; past it the least recently seen one is forgotten
# (it starts again with a full budget), so a flood of addresses cannot grow memory.
MAX_CLIENTS = 100_000

Budget = Literal["requests", "tokens"]
"""What a rate limit counts; also the 429's ``type`` and the metric's ``reason``."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class KeyRing:
    """Keys known only by their SHA-256: every check compares fixed-length digests, so the
    time it takes says nothing about a key's length or which key came close."""

    __slots__ = ("_digests",)

    def __init__(self, keys: Sequence[str]) -> None:
        self._digests = [_digest(k) for k in keys]

    def __len__(self) -> int:
        return len(self._digests)

    def __repr__(self) -> str:
        return f"KeyRing({len(self._digests)} keys)"

    def match(self, authorization: str | None) -> int | None:
        """The position of the key ``Authorization: Bearer <key>`` carries, None when it is none of them."""
        presented = bearer_token(authorization)
        if presented is None:
            return None
        digest = _digest(presented)
        found = -1
        # Every key is compared, whichever matches: no early exit.
        for i, known in enumerate(self._digests):
            if hmac.compare_digest(digest, known):
                found = i
        return found if found >= 0 else None


def bearer_token(authorization: str | None) -> str | None:
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def read_key_file(path: str) -> list[str]:
    """One key per line; blank lines and ``#`` comments are skipped. Errors never quote a line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ValueError(f"cannot read API key file {path}: {err.strerror}") from None
    keys = [line.strip() for line in text.splitlines()]
    keys = [k for k in keys if k and not k.startswith("#")]
    if not keys:
        raise ValueError(f"API key file {path} holds no key")
    return keys


def invalid_api_key(what: str) -> ApiError:
    return ApiError(
        401,
        f"Incorrect or missing {what}. Send it as 'Authorization: Bearer <key>'.",
        code="invalid_api_key",
    )


def rate_limited(budget: Budget, limit: int, wait: float) -> ApiError:
    seconds = max(1, math.ceil(wait))
    unit = "requests" if budget == "requests" else "prompt tokens"
    error = ApiError(
        429,
        f"Rate limit reached for {unit} per minute (limit: {limit}). Please try again in {seconds}s.",
        type=budget,
        code="rate_limit_exceeded",
    )
    error.headers["Retry-After"] = str(seconds)
    return error


class Buckets:
    """One token bucket per client: ``per_minute`` deep, refilled at ``per_minute`` a minute.

    A cost larger than the whole bucket passes when the bucket is full and leaves it in
    debt, so a single large prompt is possible but not a second one right after.
    """

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = per_minute
        self._capacity = float(per_minute)
        self._rate = per_minute / WINDOW_SECONDS
        self._clock = clock
        # client -> (level, when it was measured, when it is full again); least recent first.
        self._levels: OrderedDict[str, tuple[float, float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._levels)

    def take(self, client: str, cost: int) -> float:
        """Take ``cost`` from ``client``'s bucket: 0.0 when taken, else the seconds until it could be."""
        now = self._clock()
        self._forget_full(now)
        level, measured, _ = self._levels.pop(client, (self._capacity, now, now))
        level = min(self._capacity, level + (now - measured) * self._rate)
        needed = min(float(cost), self._capacity)
        if level < needed:
            self._keep(client, level, now)
            return (needed - level) / self._rate
        self._keep(client, level - cost, now)
        return 0.0

    def _keep(self, client: str, level: float, now: float) -> None:
        self._levels[client] = (level, now, now + (self._capacity - level) / self._rate)
        if len(self._levels) > MAX_CLIENTS:
            self._levels.popitem(last=False)

    def _forget_full(self, now: float) -> None:
        # A bucket that has refilled is the same as no bucket.
        while self._levels:
            client, (_, _, full_at) = next(iter(self._levels.items()))
            if full_at > now:
                return
            del self._levels[client]


@dataclass(slots=True)
class Access:
    """The gateway's keys and rate limits, as ``app.py`` asks about one request at a time."""

    api_keys: KeyRing
    admin_keys: KeyRing
    requests: Buckets | None = None
    tokens: Buckets | None = None

    @classmethod
    def from_config(cls, config: GatewayConfig) -> Access:
        keys = list(config.api_keys)
        if config.api_key_file is not None:
            keys += read_key_file(config.api_key_file)
        admin = read_secret("admin key", value=config.admin_key, file=config.admin_key_file)
        return cls(
            KeyRing(keys),
            KeyRing([admin.reveal()] if admin is not None else []),
            Buckets(config.rate_limit_requests) if config.rate_limit_requests else None,
            Buckets(config.rate_limit_tokens) if config.rate_limit_tokens else None,
        )

    def client(self, authorization: str | None, remote: str | None) -> str:
        """Who is asking, for the rate limits: the API key's position, or the address when no
        keys are configured. Raises the 401 when keys are configured and none matches."""
        if not len(self.api_keys):
            return f"address {remote or '?'}"
        index = self.api_keys.match(authorization)
        if index is None:
            raise invalid_api_key("API key")
        return f"key#{index}"

    def admin_allowed(self, authorization: str | None) -> bool:
        return not len(self.admin_keys) or self.admin_keys.match(authorization) is not None

    def check_admin(self, authorization: str | None) -> None:
        if not self.admin_allowed(authorization):
            raise invalid_api_key("admin key")

    def take(self, budget: Budget, client: str, cost: int) -> None:
        """Count ``cost`` requests or prompt tokens against ``client``'s budget; the 429 when it is spent."""
        buckets = self.requests if budget == "requests" else self.tokens
        if buckets is not None:
            wait = buckets.take(client, cost)
            if wait:
                raise rate_limited(budget, buckets.limit, wait)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_exposure(config: GatewayConfig, access: Access) -> None:
    """Say at start-up what an address beyond this machine can reach without a key."""
    if not len(access.api_keys) and not is_loopback(config.host):
        log.warning(
            "listening on %s without API keys: anyone who reaches it can use the OpenAI routes "
            "(set api_keys or api_key_file)",
            config.host,
        )
    admin_host = config.host if config.admin_on_public_port else config.admin_host
    if not len(access.admin_keys) and not is_loopback(admin_host):
        log.warning(
            "/debug/route and /metrics are served on %s without an admin key: anyone who reaches "
            "them can ask which prompts are cached (set admin_key or admin_key_file)",
            admin_host,
        )
