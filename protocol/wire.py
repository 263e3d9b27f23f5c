"""KV-event wire formats: the one place engine bytes become typed events, and back.

Owns the msgpack payloads vLLM and SGLang publish (``[ts, events, dp_rank]`` with
events as tagged arrays — older vLLM, SGLang — or tagged maps with a ``type`` key —
vLLM >= 0.26; a ``{ts, events, data_parallel_rank}`` map batch is read too), the ZMQ
frame layer ``(topic, seq u64 BE, payload)`` and vLLM's replay protocol. Never touches
sockets or the index: it is pure functions over bytes.

Reading is lenient where engines differ (short positional forms, trailing or unknown
fields, ``medium`` in any case) and strict about what the index relies on (hash and
token types, u32 token ids, ``len(token_ids) == len(block_hashes) * block_size`` unless
the store is a token-less tier update, ``block_size > 0``). A store's ``extra_keys`` is
checked for shape only (a list of arrays or nils, each kept as a tuple): what they mean
is the translator's to judge, one event at a time.

Every malformed payload raises ``DecodeError`` with a ``kind`` (a metric label) and
nothing else; a batch is validated completely before any of it is returned, so a bad
event can never leave half a batch applied.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import msgspec

from kvgate.protocol.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EngineEvent,
    EventBatch,
    ExtraKeys,
    Tier,
)

__all__ = [
    "DecodeError",
    "REPLAY_END_SEQ",
    "decode_batch",
    "decode_frames",
    "decode_replay_reply",
    "decode_replay_request",
    "encode_batch",
    "encode_frames",
    "encode_replay_reply",
    "encode_replay_request",
]

REPLAY_END_SEQ = -1
"""Seq of the last reply to a replay request (sent as a signed 8-byte value)."""

_MEDIUM_NAMES = {Tier.GPU: "GPU", Tier.CPU: "CPU", Tier.DISK: "DISK"}
_LEGACY_MEDIUM_NAMES = {**_MEDIUM_NAMES, Tier.GPU: None}
MAX_SEQ = (1 << 64) - 1
"""The last seq a u64 frame can carry: nothing follows it but an engine restart."""


class DecodeError(ValueError):
    """A payload or frame set that cannot be turned into events; ``kind`` labels the cause."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


# --- payloads -----------------------------------------------------------------------

_U32 = Annotated[int, msgspec.Meta(ge=0, le=0xFFFFFFFF)]
_Hash = int | bytes
_ExtraKeys = list[tuple[Any, ...] | None] | None


# Fast path: typed Structs let msgspec check shapes, types and token ranges in C while
# it decodes; validating builtin objects in Python instead costs 15% (few large events)
# to 60% (many small ones) more. Each accepts a subset of what the generic path below
# accepts and converts to exactly what that path would return; anything else falls
# through to it, which also names the error kind.
class _MapStored(msgspec.Struct, tag="BlockStored", tag_field="type", gc=False):
    block_hashes: list[_Hash]
    token_ids: list[_U32]
    block_size: Annotated[int, msgspec.Meta(gt=0)]
    parent_block_hash: _Hash | None = None
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: _ExtraKeys = None


class _MapRemoved(msgspec.Struct, tag="BlockRemoved", tag_field="type", gc=False):
    block_hashes: list[_Hash]
    medium: str | None = None


class _MapCleared(msgspec.Struct, tag="AllBlocksCleared", tag_field="type", gc=False):
    pass


class _ArrayStored(msgspec.Struct, tag="BlockStored", array_like=True, gc=False):
    block_hashes: list[_Hash]
    parent_block_hash: _Hash | None
    token_ids: list[_U32]
    block_size: Annotated[int, msgspec.Meta(gt=0)]
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: _ExtraKeys = None


class _ArrayRemoved(msgspec.Struct, tag="BlockRemoved", array_like=True, gc=False):
    block_hashes: list[_Hash]
    medium: str | None = None


class _ArrayCleared(msgspec.Struct, tag="AllBlocksCleared", array_like=True, gc=False):
    pass


class _MapBatch(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[_MapStored | _MapRemoved | _MapCleared]
    data_parallel_rank: Annotated[int, msgspec.Meta(ge=0)] | None = None


class _ArrayBatch(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[_ArrayStored | _ArrayRemoved | _ArrayCleared]
    data_parallel_rank: Annotated[int, msgspec.Meta(ge=0)] | None = None


_typed_decoders = (msgspec.msgpack.Decoder(_MapBatch), msgspec.msgpack.Decoder(_ArrayBatch))
_any_decoder = msgspec.msgpack.Decoder()
_encoder = msgspec.msgpack.Encoder()


def decode_batch(payload: bytes) -> EventBatch:
    """Decode and validate one published batch; raises ``DecodeError`` on any defect."""
    if not payload:
        raise DecodeError("empty")
    try:
        for decoder in _typed_decoders:
            try:
                typed = decoder.decode(payload)
            except msgspec.ValidationError:
                continue
            return _from_typed(typed)
        # Rarer shapes (a map batch, encodings mixed in one batch) and precise error kinds.
        return _batch(_any_decoder.decode(payload))
    except msgspec.DecodeError as exc:
        kind = "truncated" if "truncated" in str(exc) else "not_msgpack"
        raise DecodeError(kind, str(exc)) from None
    except UnicodeDecodeError:
        raise DecodeError("not_msgpack", "string is not UTF-8") from None
    except RecursionError:
        raise DecodeError("not_msgpack", "nesting too deep") from None


def _from_typed(typed: _MapBatch | _ArrayBatch) -> EventBatch:
    ts = _timestamp(typed.ts)
    events: list[EngineEvent] = []
    append = events.append
    for e in typed.events:
        # ``type(e) is`` (not isinstance): exact and fastest on this per-event path.
        if type(e) is _MapStored or type(e) is _ArrayStored:
            tokens = e.token_ids
            if tokens:
                _check_token_count(len(tokens), len(e.block_hashes), e.block_size)
            append(
                BlockStored(
                    e.block_hashes,
                    e.parent_block_hash,
                    tokens,
                    e.block_size,
                    e.lora_id,
                    _medium(e.medium),
                    e.lora_name,
                    e.extra_keys,
                )
            )
        elif type(e) is _MapRemoved or type(e) is _ArrayRemoved:
            append(BlockRemoved(e.block_hashes, _medium(e.medium)))
        else:
            append(AllBlocksCleared())
    return EventBatch(ts, events, typed.data_parallel_rank)


def _timestamp(ts: float) -> float:
    if not math.isfinite(ts):
        raise DecodeError("bad_field", f"ts is {ts}")
    return ts


def _check_token_count(n_tokens: int, n_hashes: int, block_size: int) -> None:
    if n_tokens != n_hashes * block_size:
        raise DecodeError("token_count_mismatch", f"{n_tokens} tokens for {n_hashes} blocks of {block_size}")


# Generic path: builtin objects validated in Python; the definition of what is valid.
def _batch(raw: Any) -> EventBatch:
    if type(raw) is list:
        # Trailing elements a newer EventBatch may append are ignored, as msgspec does.
        if len(raw) < 2:
            raise DecodeError("bad_shape", f"batch has {len(raw)} elements")
        ts, events = raw[0], raw[1]
        rank = raw[2] if len(raw) > 2 else None
    elif type(raw) is dict:
        # msgspec's non-array-like EventBatch (the newest vLLM) is a map.
        if "ts" not in raw or "events" not in raw:
            raise DecodeError("bad_shape", "batch map lacks ts/events")
        ts, events, rank = raw["ts"], raw["events"], raw.get("data_parallel_rank")
    else:
        raise DecodeError("bad_shape", f"batch is a {type(raw).__name__}")
    if type(ts) is not float and type(ts) is not int:
        raise DecodeError("bad_field", "ts is not a number")
    ts = _timestamp(float(ts))
    if type(events) is not list:
        raise DecodeError("bad_shape", "events is not a list")
    if rank is not None and (type(rank) is not int or rank < 0):
        raise DecodeError("bad_field", f"bad data_parallel_rank {rank!r}")
    return EventBatch(ts, [_event(e) for e in events], rank)


def _event(raw: Any) -> EngineEvent:
    if type(raw) is list:
        if not raw:
            raise DecodeError("bad_shape", "empty event array")
        tag = raw[0]
        if tag == "BlockStored":
            if len(raw) < 5:
                raise DecodeError("bad_shape", "BlockStored array too short")
            n = len(raw)
            return _stored(
                raw[1],
                raw[2],
                raw[3],
                raw[4],
                raw[5] if n > 5 else None,
                raw[6] if n > 6 else None,
                raw[7] if n > 7 else None,
                raw[8] if n > 8 else None,
            )
        if tag == "BlockRemoved":
            if len(raw) < 2:
                raise DecodeError("bad_shape", "BlockRemoved array too short")
            return _removed(raw[1], raw[2] if len(raw) > 2 else None)
        if tag == "AllBlocksCleared":
            return AllBlocksCleared()
    elif type(raw) is dict:
        tag = raw.get("type")
        # Unknown keys (group_idx, kv_cache_spec_*, locality, ...) are deliberately
        # ignored: they do not change which blocks a worker holds.
        if tag == "BlockStored":
            try:
                hashes, tokens, block_size = raw["block_hashes"], raw["token_ids"], raw["block_size"]
            except KeyError as exc:
                raise DecodeError("bad_shape", f"BlockStored lacks {exc.args[0]!r}") from None
            get = raw.get
            return _stored(
                hashes,
                get("parent_block_hash"),
                tokens,
                block_size,
                get("lora_id"),
                get("medium"),
                get("lora_name"),
                get("extra_keys"),
            )
        if tag == "BlockRemoved":
            if "block_hashes" not in raw:
                raise DecodeError("bad_shape", "BlockRemoved lacks 'block_hashes'")
            return _removed(raw["block_hashes"], raw.get("medium"))
        if tag == "AllBlocksCleared":
            return AllBlocksCleared()
    else:
        raise DecodeError("bad_shape", f"event is a {type(raw).__name__}")
    if type(tag) is not str:
        raise DecodeError("bad_shape", "event has no string tag")
    raise DecodeError("unknown_event", tag[:64])


def _hashes(raw: Any) -> list[int | bytes]:
    if type(raw) is not list:
        raise DecodeError("bad_field", "block_hashes is not a list")
    for h in raw:
        if type(h) is not int and type(h) is not bytes:
            raise DecodeError("bad_field", f"block hash of type {type(h).__name__}")
    return raw


def _medium(raw: Any) -> Tier:
    if raw is not None and type(raw) is not str:
        raise DecodeError("bad_field", "medium is not a string")
    try:
        return Tier.from_medium(raw)
    except ValueError as exc:
        raise DecodeError("bad_field", str(exc)) from None


def _stored(
    hashes: Any, parent: Any, tokens: Any, block_size: Any, lora_id: Any, medium: Any, lora_name: Any, extra_keys: Any
) -> BlockStored:
    hashes = _hashes(hashes)
    if parent is not None and type(parent) is not int and type(parent) is not bytes:
        raise DecodeError("bad_field", "parent_block_hash is not a hash")
    if type(tokens) is not list:
        raise DecodeError("bad_field", "token_ids is not a list")
    if type(block_size) is not int:
        raise DecodeError("bad_field", "block_size is not an int")
    if block_size <= 0:
        raise DecodeError("bad_block_size", str(block_size))
    if tokens:
        _check_token_count(len(tokens), len(hashes), block_size)
        try:
            # Token ids are hashed as u32 downstream; array() checks them all in C.
            array("I", tokens)
        except (TypeError, OverflowError):
            raise DecodeError("bad_field", "token_ids are not u32 integers") from None
    if lora_id is not None and type(lora_id) is not int:
        raise DecodeError("bad_field", "lora_id is not an int")
    if lora_name is not None and type(lora_name) is not str:
        raise DecodeError("bad_field", "lora_name is not a string")
    return BlockStored(hashes, parent, tokens, block_size, lora_id, _medium(medium), lora_name, _extra_keys(extra_keys))


def _extra_keys(raw: Any) -> list[ExtraKeys | None] | None:
    if raw is None:
        return None
    if type(raw) is not list:
        raise DecodeError("bad_field", "extra_keys is not a list")
    out: list[ExtraKeys | None] = []
    for keys in raw:
        if keys is not None and type(keys) is not list:
            raise DecodeError("bad_field", "extra_keys entry is neither a list nor nil")
        out.append(None if keys is None else tuple(keys))
    return out


def _removed(hashes: Any, medium: Any) -> BlockRemoved:
    return BlockRemoved(_hashes(hashes), _medium(medium))


def encode_batch(batch: EventBatch, encoding: Literal["map", "array"] = "map") -> bytes:
    """Serialize ``batch`` as vLLM does: tagged maps (as 0.32 writes them) or legacy tagged arrays."""
    events: list[dict[str, Any]] | list[list[Any]]
    if encoding == "map":
        events = [_event_map(e) for e in batch.events]
    elif encoding == "array":
        events = [_event_array(e) for e in batch.events]
    else:
        raise ValueError(f"unknown encoding {encoding!r}")
    return _encoder.encode([batch.ts, events, batch.data_parallel_rank])


def _event_map(event: EngineEvent) -> dict[str, Any]:
    # vLLM 0.32's keys, in its order (msgspec writes struct fields in declaration order and
    # omits the defaults): one full-attention KV-cache group (``group_idx`` 0), and no
    # extra hash keys (LoRA, multimodal, cache salt) on any block.
    if type(event) is BlockStored:
        return {
            "type": "BlockStored",
            "block_hashes": event.block_hashes,
            "parent_block_hash": event.parent_block_hash,
            "token_ids": event.token_ids,
            "block_size": event.block_size,
            "lora_id": event.lora_id,
            "medium": _MEDIUM_NAMES[event.medium],
            "lora_name": event.lora_name,
            # vLLM 0.32 sends one entry per block (null, or [salt] on a salted prompt's first);
            # an event decoded from an older engine has none, and writes none.
            **({} if event.extra_keys is None else {"extra_keys": event.extra_keys}),
            "group_idx": 0,
            "kv_cache_spec_kind": "full_attention",
        }
    if type(event) is BlockRemoved:
        return {
            "type": "BlockRemoved",
            "block_hashes": event.block_hashes,
            "medium": _MEDIUM_NAMES[event.medium],
            "group_idx": 0,
        }
    return {"type": "AllBlocksCleared"}


def _event_array(event: EngineEvent) -> list[Any]:
    # The legacy writers leave ``medium`` None for GPU; only offloaded tiers are named.
    if type(event) is BlockStored:
        out: list[Any] = [
            "BlockStored",
            event.block_hashes,
            event.parent_block_hash,
            event.token_ids,
            event.block_size,
            event.lora_id,
            _LEGACY_MEDIUM_NAMES[event.medium],
        ]
        # msgspec's omit_defaults drops trailing defaults; older readers stop at medium.
        if event.lora_name is not None or event.extra_keys is not None:
            out.append(event.lora_name)
        if event.extra_keys is not None:
            out.append(event.extra_keys)
        return out
    if type(event) is BlockRemoved:
        return ["BlockRemoved", event.block_hashes, _LEGACY_MEDIUM_NAMES[event.medium]]
    return ["AllBlocksCleared"]


# --- frames and replay ----------------------------------------------------------------


def _u64(seq: int) -> bytes:
    if not 0 <= seq <= MAX_SEQ:
        raise ValueError(f"seq {seq} outside u64")
    return seq.to_bytes(8, "big")


def encode_frames(topic: bytes, seq: int, payload: bytes) -> list[bytes]:
    """The PUB multipart message: ``(topic, seq u64 big-endian, payload)``."""
    return [topic, _u64(seq), payload]


def decode_frames(frames: Sequence[bytes]) -> tuple[bytes, int, bytes]:
    """``(topic, seq, payload)`` from a PUB multipart message; ``DecodeError("bad_frames")``."""
    if len(frames) != 3:
        raise DecodeError("bad_frames", f"{len(frames)} frames")
    topic, seq, payload = frames
    if len(seq) != 8:
        raise DecodeError("bad_frames", f"seq frame of {len(seq)} bytes")
    return bytes(topic), int.from_bytes(seq, "big"), bytes(payload)


def encode_replay_request(start_seq: int) -> bytes:
    """Body of a replay request (the DEALER sends ``[b"", body]``)."""
    return _u64(start_seq)


def decode_replay_request(frames: Sequence[bytes]) -> tuple[bytes, int]:
    """``(identity, start_seq)`` from what a ROUTER receives; ``DecodeError("bad_frames")``."""
    if len(frames) != 3 or len(frames[1]) != 0 or len(frames[2]) != 8:
        raise DecodeError("bad_frames", "replay request is not [identity, b'', seq]")
    return bytes(frames[0]), int.from_bytes(frames[2], "big")


def encode_replay_reply(seq: int, payload: bytes = b"", topic: bytes | None = None) -> list[bytes]:
    """One reply as a ROUTER sends it after the identity.

    vLLM 0.32 (``topic`` given): ``[b"", topic, seq, payload]``, ending with
    ``[b"", b"", REPLAY_END_SEQ, b""]``. Older vLLM (``topic`` None): ``[b"", seq, payload]``,
    ending with ``[b"", REPLAY_END_SEQ, b""]``. ``REPLAY_END_SEQ`` is 8 bytes, signed.
    """
    if seq == REPLAY_END_SEQ:
        head = [b""] if topic is None else [b"", b""]
        return [*head, _END_BYTES, b""]
    return [b"", _u64(seq), payload] if topic is None else [b"", topic, _u64(seq), payload]


def decode_replay_reply(frames: Sequence[bytes]) -> tuple[int, bytes]:
    """``(seq, payload)`` from what the DEALER receives; seq is ``REPLAY_END_SEQ`` at the end.

    Accepts both framings (see ``encode_replay_reply``): vLLM 0.32 puts the topic frame
    before the seq, older releases do not.
    """
    if len(frames) == 4 and len(frames[0]) == 0 and len(frames[2]) == 8:
        seq, payload = bytes(frames[2]), frames[3]
    elif len(frames) == 3 and len(frames[0]) == 0 and len(frames[1]) == 8:
        seq, payload = bytes(frames[1]), frames[2]
    else:
        raise DecodeError("bad_frames", "replay reply is neither [b'', topic, seq, payload] nor [b'', seq, payload]")
    if seq == _END_BYTES:
        return REPLAY_END_SEQ, b""
    return int.from_bytes(seq, "big"), bytes(payload)


_END_BYTES = REPLAY_END_SEQ.to_bytes(8, "big", signed=True)
