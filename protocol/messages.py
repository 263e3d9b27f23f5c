"""The NATS event bus: subjects, message codec, and the consumer that feeds an index.

Subjects of a namespace (``kvgate.<ns>.`` — see ARCHITECTURE.md):

* ``events.<worker_id>``  ``EventsMessage``: router-native events of one worker, already
  translated by its sidecar (block hashes are router sequence hashes);
* ``load.<worker_id>``    ``LoadMessage``: running / waiting requests and KV usage;
* ``active.<router_id>``  ``ActiveMessage``: a gateway replica's in-flight requests;
* ``resync.<worker_id>``  ``ResyncRequest``: a consumer that lost track of a worker's
  stream asks its sidecar to restate everything (an addition to the three subjects of
  ARCHITECTURE.md: core NATS delivers at most once, so a late-joining or gapped
  consumer needs a way back).

Ordering contract of ``events.<worker_id>`` (one publisher, the worker's sidecar): each
sidecar process picks a random ``epoch`` and numbers its messages ``seq`` 0, 1, 2, …
across all dp ranks. A message with ``reset=True`` starts a full restatement: every
rank of the worker is void before it, and it plus the messages after it describe the
worker's whole cache. Every sidecar session starts with one, sends one again after a
NATS reconnect and when asked on ``resync``, and sends an empty message as a heartbeat
when idle. ``StreamTracker`` (pure) turns that into apply / skip / resync decisions
and a staleness verdict; ``NatsEventSource`` (asyncio) is the edge that feeds a
``KvIndexer``. Payloads are msgspec msgpack; malformed ones raise ``BusDecodeError``
(``kind`` is a metric label), counted and dropped by the consumers.

Signatures (optional, every subject): with a shared bus secret, publishers ``seal`` each
payload into an envelope ``b"KVS1" | ts (u64 ms, big-endian) | HMAC-SHA256 (32 bytes) |
payload``, the MAC over ``b"KVS1" | subject | 0x00 | ts | payload`` keyed by the
secret. Receivers holding the secret ``unseal``: unsigned, badly signed and out-of-window
envelopes (``ts`` more than ``window`` seconds from the receiver's clock: a replay) raise
``BusDecodeError`` (``unsigned``, ``bad_signature``, ``stale_signature``). The MAC binds
the subject, so a signed message replayed on another worker's subject fails too.
Receivers without a secret strip the envelope unverified, so a fleet can turn signing on
publishers first. msgpack payloads of these messages start with an array or map
marker, never ``K``, so the two are told apart by the first bytes.

Never decides routes and never decodes engine bytes (``kvgate.protocol.wire`` does that).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import struct
from dataclasses import dataclass, field
from typing import Annotated, Literal, TypeVar

import msgspec

from kvgate.protocol.events import RouterCleared, RouterEvent, RouterRemoved, RouterStored, Tier, WorkerKey

log = logging.getLogger(__name__)

SUBJECT_ROOT = "kvgate"
_FORBIDDEN_IN_TOKEN = frozenset(".*> \t\r\n")


class BusDecodeError(ValueError):
    """A bus payload that is not a valid message; ``kind`` labels the cause."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


def check_token(what: str, value: str) -> str:
    """``value`` as one NATS subject token (no dots, wildcards or whitespace)."""
    if not isinstance(value, str) or not value or any(c in _FORBIDDEN_IN_TOKEN for c in value):
        raise ValueError(f"{what} must be a non-empty string without '.', '*', '>' or whitespace, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class Subjects:
    """The subjects of one namespace."""

    namespace: str = "default"

    def __post_init__(self) -> None:
        check_token("namespace", self.namespace)

    @property
    def prefix(self) -> str:
        return f"{SUBJECT_ROOT}.{self.namespace}"

    def events(self, worker_id: str) -> str:
        return f"{self.prefix}.events.{check_token('worker id', worker_id)}"

    def load(self, worker_id: str) -> str:
        return f"{self.prefix}.load.{check_token('worker id', worker_id)}"

    def active(self, router_id: str) -> str:
        return f"{self.prefix}.active.{check_token('router id', router_id)}"

    def resync(self, worker_id: str) -> str:
        return f"{self.prefix}.resync.{check_token('worker id', worker_id)}"

    @property
    def all_events(self) -> str:
        return f"{self.prefix}.events.*"

    @property
    def all_load(self) -> str:
        return f"{self.prefix}.load.*"

    @property
    def all_active(self) -> str:
        return f"{self.prefix}.active.*"


# --- messages -----------------------------------------------------------------------

# msgpack integers stop at 2**64 - 1, so non-negative is the whole u64 check.
_U64 = Annotated[int, msgspec.Meta(ge=0)]
_Count = Annotated[int, msgspec.Meta(ge=0)]
_TierNo = Annotated[int, msgspec.Meta(ge=0, le=len(Tier) - 1)]
_Token = Annotated[str, msgspec.Meta(min_length=1, pattern=r"^[^.*>\s]+$")]


@dataclass(slots=True)
class EventsMessage:
    """Router-native events of one worker rank, numbered within a sidecar session."""

    worker_id: str
    dp_rank: int
    seq: int
    epoch: int
    events: list[RouterEvent] = field(default_factory=list)
    reset: bool = False

    @property
    def key(self) -> WorkerKey:
        return WorkerKey(self.worker_id, self.dp_rank)


class LoadMessage(msgspec.Struct, frozen=True, kw_only=True):
    """A worker rank's engine load, scraped from its ``/metrics``; ``ts`` is wall-clock seconds."""

    worker_id: _Token
    dp_rank: _Count = 0
    running: _Count
    waiting: _Count
    kv_usage: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
    ts: float
    capacity_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    """The engine's GPU KV pool in tokens (``vllm:cache_config_info``), when its page says."""

    @property
    def key(self) -> WorkerKey:
        return WorkerKey(self.worker_id, self.dp_rank)


ActiveOp = Literal["add", "prefill_done", "finish", "leave", "alive", "sync"]


class ActiveMessage(msgspec.Struct, frozen=True, kw_only=True):
    """One change to a gateway replica's in-flight requests.

    ``add``: routed to (worker_id, dp_rank) with ``new_prefill_tokens`` still to prefill
    and ``blocks`` KV blocks to hold; ``prefill_done``: its first token came (sent with
    the same worker and ``blocks`` and ``new_prefill_tokens=0``, so a replica that missed
    the ``add`` still counts it); ``finish``: completed or cancelled; ``leave``: drop all
    of the replica's requests (it shuts down, or restates them: ``leave`` then one
    ``add`` / ``prefill_done`` per request still in flight); ``alive``: a heartbeat, so
    a replica that died without ``leave`` is forgotten after a timeout; ``sync``: ask
    every other replica to restate (the sender just joined or reconnected and may have
    missed messages). Only ``add`` / ``prefill_done`` / ``finish`` use the request fields.
    Receivers skip their own ``router_id``.
    """

    router_id: _Token
    op: ActiveOp
    request_id: str = ""
    worker_id: str = ""
    dp_rank: _Count = 0
    prompt_tokens: _Count = 0
    new_prefill_tokens: _Count = 0
    blocks: _Count = 0
    ts: float = 0.0

    @property
    def key(self) -> WorkerKey:
        return WorkerKey(self.worker_id, self.dp_rank)


class ResyncRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Ask a worker's sidecar for a ``reset`` restatement of its whole cache."""

    worker_id: _Token
    requester: str = ""


class _Stored(msgspec.Struct, tag=0, array_like=True, gc=False):
    hashes: list[_U64]
    tier: _TierNo = 0


class _Removed(msgspec.Struct, tag=1, array_like=True, gc=False):
    hashes: list[_U64]
    tier: _TierNo = 0


class _Cleared(msgspec.Struct, tag=2, array_like=True, gc=False):
    pass


class _EventsWire(msgspec.Struct, array_like=True, gc=False):
    worker_id: _Token
    dp_rank: _Count
    seq: _Count
    epoch: _U64
    events: list[_Stored | _Removed | _Cleared]
    reset: bool = False


_T = TypeVar("_T")

_encoder = msgspec.msgpack.Encoder()
_events_decoder = msgspec.msgpack.Decoder(_EventsWire)
_load_decoder = msgspec.msgpack.Decoder(LoadMessage)
_active_decoder = msgspec.msgpack.Decoder(ActiveMessage)
_resync_decoder = msgspec.msgpack.Decoder(ResyncRequest)


def encode_events(msg: EventsMessage) -> bytes:
    wire: list[_Stored | _Removed | _Cleared] = []
    for event in msg.events:
        if isinstance(event, RouterStored):
            wire.append(_Stored(event.hashes, int(event.tier)))
        elif isinstance(event, RouterRemoved):
            wire.append(_Removed(event.hashes, int(event.tier)))
        elif isinstance(event, RouterCleared):
            wire.append(_Cleared())
        else:
            raise TypeError(f"not a router event: {event!r}")
    return _encoder.encode(_EventsWire(msg.worker_id, msg.dp_rank, msg.seq, msg.epoch, wire, msg.reset))


def decode_events(payload: bytes) -> EventsMessage:
    wire = _decode(_events_decoder, payload)
    events: list[RouterEvent] = []
    for e in wire.events:
        if type(e) is _Stored:
            events.append(RouterStored(e.hashes, Tier(e.tier)))
        elif type(e) is _Removed:
            events.append(RouterRemoved(e.hashes, Tier(e.tier)))
        else:
            events.append(RouterCleared())
    return EventsMessage(wire.worker_id, wire.dp_rank, wire.seq, wire.epoch, events, wire.reset)


def encode_load(msg: LoadMessage) -> bytes:
    return _encoder.encode(msg)


def decode_load(payload: bytes) -> LoadMessage:
    return _decode(_load_decoder, payload)


def encode_active(msg: ActiveMessage) -> bytes:
    return _encoder.encode(msg)


def decode_active(payload: bytes) -> ActiveMessage:
    return _decode(_active_decoder, payload)


def encode_resync(msg: ResyncRequest) -> bytes:
    return _encoder.encode(msg)


def decode_resync(payload: bytes) -> ResyncRequest:
    return _decode(_resync_decoder, payload)


def _decode(decoder: msgspec.msgpack.Decoder[_T], payload: bytes) -> _T:
    if not payload:
        raise BusDecodeError("empty")
    try:
        return decoder.decode(payload)
    except msgspec.ValidationError as exc:
        raise BusDecodeError("bad_shape", str(exc)) from None
    except msgspec.DecodeError as exc:
        raise BusDecodeError("not_msgpack", str(exc)) from None
    except RecursionError:
        raise BusDecodeError("not_msgpack", "nesting too deep") from None


# --- signature envelope ------------------------------------------------------------

SIGNED_MAGIC = b"KVS1"
_TS = struct.Struct(">Q")
_MAC_SIZE = hashlib.sha256().digest_size
_HEADER = len(SIGNED_MAGIC) + _TS.size + _MAC_SIZE
DEFAULT_SIGNATURE_WINDOW = 60.0
"""Seconds a signed message stays acceptable: clock skew plus delivery, and the
longest a captured message can be replayed."""


def _mac(key: bytes, subject: str, ts: bytes, payload: bytes) -> bytes:
    return hmac.new(key, SIGNED_MAGIC + subject.encode() + b"\0" + ts + payload, hashlib.sha256).digest()


def seal(subject: str, payload: bytes, key: bytes, now: float) -> bytes:
    """``payload`` in a signed envelope for ``subject`` at wall-clock ``now``."""
    ts = _TS.pack(max(0, int(now * 1000)))
    return SIGNED_MAGIC + ts + _mac(key, subject, ts, payload) + payload


def is_sealed(data: bytes) -> bool:
    return data[: len(SIGNED_MAGIC)] == SIGNED_MAGIC


def unseal(subject: str, data: bytes, key: bytes | None, now: float, window: float = DEFAULT_SIGNATURE_WINDOW) -> bytes:
    """The payload of ``data`` received on ``subject``.

    ``key`` None: no secret here, an envelope is stripped unverified and a bare payload
    passes. With a key, only an envelope signed with it for this subject within
    ``window`` seconds of ``now`` passes.
    """
    if not is_sealed(data):
        if key is not None:
            raise BusDecodeError("unsigned")
        return data
    if len(data) < _HEADER:
        raise BusDecodeError("bad_signature", "envelope too short")
    ts = data[len(SIGNED_MAGIC) : len(SIGNED_MAGIC) + _TS.size]
    payload = data[_HEADER:]
    if key is None:
        return payload
    if not hmac.compare_digest(data[len(SIGNED_MAGIC) + _TS.size : _HEADER], _mac(key, subject, ts, payload)):
        raise BusDecodeError("bad_signature")
    age = now - _TS.unpack(ts)[0] / 1000
    if abs(age) > window:
        raise BusDecodeError("stale_signature", f"signed {age:.1f}s from now")
    return payload


def new_epoch() -> int:
    """A sidecar session id: random, so a restarted sidecar is never mistaken for the old one."""
    return int.from_bytes(os.urandom(8), "big")
