"""kvgate.protocol.wire: every fixture, both encodings, the frame layer, and fuzzing for DecodeError-only failures."""

from __future__ import annotations

import base64
import dataclasses
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvgate.protocol import wire
from kvgate.protocol.events import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch, Tier
from kvgate.protocol.wire import (
    REPLAY_END_SEQ,
    DecodeError,
    decode_batch,
    decode_frames,
    decode_replay_reply,
    decode_replay_request,
    encode_batch,
    encode_frames,
    encode_replay_reply,
    encode_replay_request,
)

FIXTURES = Path(__file__).parent / "fixtures" / "kv_events"
MANIFEST = json.loads((FIXTURES / "MANIFEST.json").read_text())
VALID = MANIFEST["valid"]
INVALID = MANIFEST["invalid"]
EXPECTED_KIND = {
    "truncated": "truncated",
    "not_msgpack": "not_msgpack",
    "unknown_event_tag": "unknown_event",
    "hashes_not_a_list": "bad_field",
    "token_count_mismatch": "token_count_mismatch",
    "negative_block_size": "bad_block_size",
    "empty": "empty",
}
raw_msgpack = msgspec.msgpack.decode
pack = msgspec.msgpack.encode


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def reference_decode(payload: bytes) -> EventBatch:
    """The generic (builtin objects + Python checks) path alone: the definition of valid."""
    if not payload:
        raise DecodeError("empty")
    try:
        raw = wire._any_decoder.decode(payload)
    except msgspec.DecodeError as exc:
        raise DecodeError("truncated" if "truncated" in str(exc) else "not_msgpack") from None
    except (UnicodeDecodeError, RecursionError):
        raise DecodeError("not_msgpack") from None
    return wire._batch(raw)


def outcome(fn, payload: bytes) -> tuple[str, Any]:
    try:
        return "ok", fn(payload)
    except DecodeError as err:
        return "error", err.kind


def expected_hash(h: int | str) -> int | bytes:
    return bytes.fromhex(h) if isinstance(h, str) else h


# --- fixtures -------------------------------------------------------------------------


def test_manifest_covers_every_fixture_file():
    listed = {v["file"] for v in VALID.values()} | {v["file"] for v in INVALID.values()}
    assert listed == {p.name for p in FIXTURES.glob("*.msgpack")}
    assert set(INVALID) == set(EXPECTED_KIND)


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_fixture_decodes_as_manifest_says(name):
    spec = VALID[name]
    batch = decode_batch(fixture(spec["file"]))
    assert batch.data_parallel_rank == spec["data_parallel_rank"]
    assert isinstance(batch.ts, float)
    assert len(batch.events) == len(spec["events"])
    for event, want in zip(batch.events, spec["events"]):
        assert type(event).__name__ == want["type"]
        if want["type"] == "AllBlocksCleared":
            continue
        assert event.block_hashes == [expected_hash(h) for h in want["block_hashes"]]
        assert event.medium is Tier[want["medium"]]
        if want["type"] == "BlockStored":
            parent = want["parent_block_hash"]
            assert event.parent_block_hash == (None if parent is None else expected_hash(parent))
            assert event.block_size == want["block_size"]
            assert len(event.token_ids) == want["num_tokens"]
            assert (event.token_ids[0] if event.token_ids else None) == want["first_token"]


def test_bytes_hashes_stay_bytes_and_int_hashes_stay_ints():
    stored = decode_batch(fixture("vllm_bytes_hashes.msgpack")).events[0]
    assert all(type(h) is bytes and len(h) == 32 for h in stored.block_hashes)
    stored = decode_batch(fixture("vllm_legacy_array.msgpack")).events[0]
    assert all(type(h) is int for h in stored.block_hashes)


def test_token_less_cpu_store_is_a_tier_update():
    stored = decode_batch(fixture("offload_cpu_tier.msgpack")).events[0]
    assert stored == BlockStored([7774064181650846793, 728034927264493662], None, [], 64, None, Tier.CPU)


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_fixture_is_rejected_with_its_kind(name):
    with pytest.raises(DecodeError) as info:
        decode_batch(fixture(INVALID[name]["file"]))
    assert info.value.kind == EXPECTED_KIND[name]


@pytest.mark.parametrize("name", sorted(VALID) + sorted(INVALID))
def test_fast_path_agrees_with_reference_on_fixtures(name):
    spec = VALID.get(name) or INVALID[name]
    payload = fixture(spec["file"])
    assert outcome(decode_batch, payload) == outcome(reference_decode, payload)


# --- encoding -------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["map", "array"])
@pytest.mark.parametrize("name", sorted(VALID))
def test_fixture_round_trips_through_both_encodings(name, encoding):
    batch = decode_batch(fixture(VALID[name]["file"]))
    assert decode_batch(encode_batch(batch, encoding)) == batch


@pytest.mark.parametrize("name", ["vllm_legacy_array", "all_blocks_cleared_legacy"])
def test_array_encoding_reproduces_legacy_fixture_bytes(name):
    payload = fixture(VALID[name]["file"])
    assert encode_batch(decode_batch(payload), "array") == payload


@pytest.mark.parametrize("name", ["vllm_tagged_map", "vllm_bytes_hashes", "offload_cpu_tier", "all_blocks_cleared"])
def test_map_encoding_matches_golden_fixture(name):
    payload = fixture(VALID[name]["file"])
    golden = raw_msgpack(payload)
    ours = raw_msgpack(encode_batch(decode_batch(payload), "map"))
    assert ours[0] == golden[0] and ours[2] == golden[2]
    assert len(ours[1]) == len(golden[1])
    for mine, theirs in zip(ours[1], golden[1]):
        # Every field we write is vLLM's, with vLLM's value (the current writer spells out
        # "GPU" where an older one left None); the golden extras (extra_keys, group_idx,
        # ...) are the optional fields a reader ignores.
        if theirs.get("medium", "") is None:
            theirs["medium"] = "GPU"
        # Fixtures from writers older than 0.32 lack its extras; what they have, we match.
        assert set(mine) - set(theirs) <= VLLM_032_EXTRAS
        assert {k: mine[k] for k in mine if k in theirs} == {k: theirs[k] for k in mine if k in theirs}
        assert mine["type"] == theirs["type"]


VLLM_032_EXTRAS = {"extra_keys", "group_idx", "kv_cache_spec_kind"}
VLLM_032 = Path(__file__).parent / "fixtures" / "vllm-0.32"


def vllm_032_payloads() -> list[tuple[str, bytes]]:
    """Every batch payload recorded from the real vLLM 0.32 engine, live and replayed,
    salted stores (04) included."""
    out = []
    for path in sorted(VLLM_032.glob("*.json")):
        data = json.loads(path.read_text())
        for message in data.get("messages", []) + data.get("replies", []):
            payload = base64.b64decode(message["frames_b64"][-1])
            if payload:
                out.append((f"{path.stem}/{message['seq']}", payload))
    return out


@pytest.mark.parametrize(("name", "payload"), vllm_032_payloads(), ids=[n for n, _ in vllm_032_payloads()])
def test_map_encoding_reproduces_vllm_032_bytes(name, payload):
    assert encode_batch(decode_batch(payload), "map") == payload


def test_map_encoding_writes_vllm_field_names():
    batch = EventBatch(
        1.5,
        [
            # vLLM 0.32 (and the simulator) give every store its per-block extra_keys.
            BlockStored([1], 9, list(range(4)), 4, 3, Tier.DISK, "ad", [None]),
            BlockRemoved([b"\x01"], Tier.CPU),
            AllBlocksCleared(),
        ],
        2,
    )
    assert raw_msgpack(encode_batch(batch, "map")) == [
        1.5,
        [
            {
                "type": "BlockStored",
                "block_hashes": [1],
                "parent_block_hash": 9,
                "token_ids": [0, 1, 2, 3],
                "block_size": 4,
                "lora_id": 3,
                "medium": "DISK",
                "lora_name": "ad",
                "extra_keys": [None],
                "group_idx": 0,
                "kv_cache_spec_kind": "full_attention",
            },
            {"type": "BlockRemoved", "block_hashes": [b"\x01"], "medium": "CPU", "group_idx": 0},
            {"type": "AllBlocksCleared"},
        ],
        2,
    ]
    # The legacy arrays, as older engines wrote them, carry no extra_keys.
    batch.events[0] = dataclasses.replace(batch.events[0], extra_keys=None)
    assert raw_msgpack(encode_batch(batch, "array")) == [
        1.5,
        [
            ["BlockStored", [1], 9, [0, 1, 2, 3], 4, 3, "DISK", "ad"],
            ["BlockRemoved", [b"\x01"], "CPU"],
            ["AllBlocksCleared"],
        ],
        2,
    ]


def test_unknown_encoding_is_refused():
    with pytest.raises(ValueError):
        encode_batch(EventBatch(0.0, []), "json")  # type: ignore[arg-type]


hashes = st.one_of(st.integers(0, 2**64 - 1), st.binary(min_size=1, max_size=32))


@st.composite
def stored_events(draw) -> BlockStored:
    block_size = draw(st.integers(1, 8))
    block_hashes = draw(st.lists(hashes, max_size=4))
    token_less = draw(st.booleans())
    tokens = (
        []
        if token_less
        else draw(
            st.lists(
                st.integers(0, 2**32 - 1),
                min_size=len(block_hashes) * block_size,
                max_size=len(block_hashes) * block_size,
            )
        )
    )
    return BlockStored(
        block_hashes,
        draw(st.none() | hashes),
        tokens,
        block_size,
        draw(st.none() | st.integers(0, 2**31)),
        draw(st.sampled_from(Tier)),
        draw(st.none() | st.text(max_size=8)),
    )


events = st.one_of(
    stored_events(),
    st.builds(BlockRemoved, st.lists(hashes, max_size=4), st.sampled_from(Tier)),
    st.just(AllBlocksCleared()),
)
batches = st.builds(
    EventBatch,
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(events, max_size=5),
    st.none() | st.integers(0, 64),
)


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(batch=batches, encoding=st.sampled_from(["map", "array"]))
def test_random_batches_round_trip(batch, encoding):
    payload = encode_batch(batch, encoding)
    assert decode_batch(payload) == batch
    assert reference_decode(payload) == batch


# --- accepted variants ----------------------------------------------------------------

TOKENS_2x4 = list(range(8))


@pytest.mark.parametrize(
    "medium,tier",
    [
        (None, Tier.GPU),
        ("GPU", Tier.GPU),
        ("gpu", Tier.GPU),
        ("cpu", Tier.CPU),
        ("Cpu", Tier.CPU),
        ("DISK", Tier.DISK),
        ("disk", Tier.DISK),
        ("STORAGE", Tier.DISK),
        ("storage", Tier.DISK),
    ],
)
def test_medium_in_any_case(medium, tier):
    array_form = [1.0, [["BlockStored", [1, 2], None, TOKENS_2x4, 4, None, medium], ["BlockRemoved", [1], medium]]]
    map_form = [1.0, [{"type": "BlockRemoved", "block_hashes": [1], "medium": medium}]]
    assert [e.medium for e in decode_batch(pack(array_form)).events] == [tier, tier]
    assert decode_batch(pack(map_form)).events[0].medium is tier


def test_short_positional_forms_and_missing_rank():
    batch = decode_batch(
        pack([2.0, [["BlockStored", [1, 2], None, TOKENS_2x4, 4], ["BlockRemoved", [2]], ["AllBlocksCleared"]]])
    )
    assert batch == EventBatch(
        2.0, [BlockStored([1, 2], None, TOKENS_2x4, 4), BlockRemoved([2]), AllBlocksCleared()], None
    )


def test_sglang_array_with_trailing_fields_and_newer_map_fields_are_read():
    sglang = [3, [["BlockStored", [5], 4, [1, 2], 2, None, "GPU", "lora-a", [["mm"]], 0, "full"]], 0]
    # extra_keys (the ninth element) is read, every entry as a tuple; the rest is ignored.
    assert decode_batch(pack(sglang)).events == [BlockStored([5], 4, [1, 2], 2, None, Tier.GPU, "lora-a", [("mm",)])]
    newer = [
        3.0,
        [
            {
                "type": "BlockStored",
                "block_hashes": [5],
                "parent_block_hash": None,
                "token_ids": [1, 2],
                "block_size": 2,
                "lora_id": 7,
                "medium": "CPU",
                "lora_name": None,
                "extra_keys": [["x", 1]],
                "group_idx": 1,
                "kv_cache_spec_kind": "sliding_window",
                "kv_cache_spec_sliding_window": 64,
                "locality": "REMOTE",
                "something_new": {"nested": [1]},
            }
        ],
        None,
    ]
    assert decode_batch(pack(newer)).events == [BlockStored([5], None, [1, 2], 2, 7, Tier.CPU, None, [("x", 1)])]


@pytest.mark.parametrize("encoding", ["map", "array"])
def test_extra_keys_round_trip_and_are_written_only_when_present(encoding):
    keys: list[tuple[object, ...] | None] = [("tenant-A",), None]
    batch = EventBatch(2.0, [BlockStored([1, 2], None, [0, 1, 2, 3], 2, extra_keys=keys)], 0)
    assert decode_batch(encode_batch(batch, encoding)) == batch
    (event,) = raw_msgpack(encode_batch(batch, encoding))[1]
    if encoding == "map":
        assert event["extra_keys"] == [["tenant-A"], None]
    else:
        # lora_name (None) is written to put extra_keys in its place, the ninth.
        assert event[7:] == [None, [["tenant-A"], None]]
    # Like vLLM's omit_defaults, no extra keys means no field.
    plain = EventBatch(2.0, [BlockStored([1], None, [0, 1], 2)], 0)
    (event,) = raw_msgpack(encode_batch(plain, encoding))[1]
    assert "extra_keys" not in event if encoding == "map" else len(event) == 7


def test_map_batch_and_mixed_encodings_use_the_generic_path():
    map_batch = {"ts": 4.0, "events": [{"type": "AllBlocksCleared"}], "data_parallel_rank": 3}
    assert decode_batch(pack(map_batch)) == EventBatch(4.0, [AllBlocksCleared()], 3)
    mixed = [4.0, [["BlockRemoved", [1]], {"type": "BlockRemoved", "block_hashes": [b"\x02"], "medium": "CPU"}], 1]
    assert decode_batch(pack(mixed)).events == [BlockRemoved([1]), BlockRemoved([b"\x02"], Tier.CPU)]


# --- rejected variants ----------------------------------------------------------------


@pytest.mark.parametrize(
    "obj,kind",
    [
        ({"ts": 1.0}, "bad_shape"),
        ([1.0], "bad_shape"),
        ("hello", "bad_shape"),
        ([1.0, {"not": "a list"}], "bad_shape"),
        ([1.0, [42]], "bad_shape"),
        ([1.0, [[]]], "bad_shape"),
        ([1.0, [[7, [1]]]], "bad_shape"),
        ([1.0, [{"block_hashes": [1]}]], "bad_shape"),
        ([1.0, [["BlockStored", [1], None, [0, 1]]]], "bad_shape"),
        ([1.0, [{"type": "BlockStored", "block_hashes": [1], "block_size": 2}]], "bad_shape"),
        ([1.0, [["BlockRemoved"]]], "bad_shape"),
        ([1.0, [{"type": "BlockRemoved"}]], "bad_shape"),
        ([1.0, [["Stored", [1]]]], "unknown_event"),
        (["yesterday", []], "bad_field"),
        ([True, []], "bad_field"),
        ([float("nan"), []], "bad_field"),
        ([float("inf"), []], "bad_field"),
        ([1.0, [], -1], "bad_field"),
        ([1.0, [], "0"], "bad_field"),
        ([1.0, [["BlockRemoved", [1, "2"]]]], "bad_field"),
        ([1.0, [["BlockRemoved", [1.5]]]], "bad_field"),
        ([1.0, [["BlockRemoved", [True]]]], "bad_field"),
        ([1.0, [["BlockRemoved", [1], "TAPE"]]], "bad_field"),
        ([1.0, [["BlockRemoved", [1], 0]]], "bad_field"),
        ([1.0, [["BlockStored", [1], "p", [0, 1], 2]]], "bad_field"),
        ([1.0, [["BlockStored", [1], None, "01", 2]]], "bad_field"),
        ([1.0, [["BlockStored", [1], None, [0, -1], 2]]], "bad_field"),
        ([1.0, [["BlockStored", [1], None, [0, 2**32], 2]]], "bad_field"),
        ([1.0, [["BlockStored", [1], None, [0, 1.0], 2]]], "bad_field"),
        ([1.0, [["BlockStored", [1], None, [0, 1], "2"]]], "bad_field"),
        ([1.0, [["BlockStored", [1], None, [0, 1], 2, "lora"]]], "bad_field"),
        ([1.0, [["BlockStored", [1], None, [0, 1], 2, None, None, 5]]], "bad_field"),
        ([1.0, [["BlockStored", [1], None, [0, 1], 2, None, None, None, "salt"]]], "bad_field"),
        (
            [
                1.0,
                [{"type": "BlockStored", "block_hashes": [1], "token_ids": [0, 1], "block_size": 2, "extra_keys": [5]}],
            ],
            "bad_field",
        ),
        ([1.0, [["BlockStored", [1], None, [0, 1], 0]]], "bad_block_size"),
        ([1.0, [["BlockStored", [], None, [], -2]]], "bad_block_size"),
        ([1.0, [["BlockStored", [1, 2], None, [0, 1, 2], 2]]], "token_count_mismatch"),
        (
            [1.0, [{"type": "BlockStored", "block_hashes": [1], "token_ids": [0], "block_size": 2}]],
            "token_count_mismatch",
        ),
    ],
)
def test_malformed_batches_are_rejected_with_a_kind(obj, kind):
    payload = pack(obj)
    with pytest.raises(DecodeError) as info:
        decode_batch(payload)
    assert info.value.kind == kind
    assert outcome(reference_decode, payload) == ("error", kind)


def test_one_bad_event_rejects_the_whole_batch():
    good = ["BlockStored", [1], None, [0, 1], 2]
    with pytest.raises(DecodeError) as info:
        decode_batch(pack([1.0, [good, good, ["BlockRemoved", "oops"]]]))
    assert info.value.kind == "bad_field"


@pytest.mark.parametrize(
    "payload,kind",
    [
        (fixture("vllm_tagged_map.msgpack") + b"\x00", "not_msgpack"),
        (b"\x92\xcb", "truncated"),
        (b"\xdd\xff\xff\xff\xff", "truncated"),
        (b"\x91" * 100_000 + b"\xc0", "not_msgpack"),
        (b"\xc7\x01\x05\x00", "bad_shape"),
        (b"\x92\x01\x91\xd6\xff\x00\x00\x00\x01", "bad_shape"),
        (b"\x92\x01\x91\x92\xa1\xff\x90", "not_msgpack"),
    ],
)
def test_hostile_bytes_are_rejected(payload, kind):
    with pytest.raises(DecodeError) as info:
        decode_batch(payload)
    assert info.value.kind == kind


# --- fuzzing --------------------------------------------------------------------------

VALID_PAYLOADS = [fixture(spec["file"]) for spec in VALID.values()]
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _only_decode_errors(payload: bytes) -> None:
    got = outcome(decode_batch, payload)
    reference = outcome(reference_decode, payload)
    # The reference rejects a non-UTF-8 string anywhere; the typed path skips map keys it
    # does not know without reading them. That leniency is the only difference allowed.
    if reference != ("error", "not_msgpack"):
        assert got == reference
    if got[0] == "ok":
        assert isinstance(got[1], EventBatch)
        assert decode_batch(encode_batch(got[1])) == got[1]


@pytest.mark.slow
@FUZZ
@given(payload=st.binary(max_size=512))
def test_random_bytes_only_raise_decode_error(payload):
    _only_decode_errors(payload)


@st.composite
def mutated_fixtures(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID_PAYLOADS)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=9))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 9))]
    return bytes(data)


@pytest.mark.slow
@FUZZ
@given(payload=mutated_fixtures())
def test_mutated_fixtures_only_raise_decode_error(payload):
    _only_decode_errors(payload)


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=6),
    st.binary(max_size=6),
    st.sampled_from(["BlockStored", "BlockRemoved", "AllBlocksCleared", "GPU", "cpu", "type"]),
)
objects = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=8),
        st.dictionaries(
            st.sampled_from(
                [
                    "type",
                    "block_hashes",
                    "parent_block_hash",
                    "token_ids",
                    "block_size",
                    "medium",
                    "lora_id",
                    "lora_name",
                    "ts",
                    "events",
                    "x",
                ]
            ),
            inner,
            max_size=8,
        ),
    ),
    max_leaves=20,
)


@st.composite
def plausible_batches(draw) -> bytes:
    """Well-formed msgpack shaped roughly like a batch, with random contents in every slot."""

    def event() -> Any:
        tag = draw(st.sampled_from(["BlockStored", "BlockRemoved", "AllBlocksCleared", "Nope"]))
        fields = draw(st.lists(objects, max_size=8))
        if draw(st.booleans()):
            return [tag, *fields]
        keys = ["block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium", "lora_name"]
        return {"type": tag, **dict(zip(keys, fields))}

    return pack(
        [draw(objects), [event() for _ in range(draw(st.integers(0, 3)))], *draw(st.lists(objects, max_size=2))]
    )


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])  # generation is costly
@given(payload=plausible_batches())
def test_structured_garbage_only_raises_decode_error(payload):
    _only_decode_errors(payload)


# --- frames and replay ----------------------------------------------------------------


def test_frames_round_trip_with_big_endian_seq():
    frames = encode_frames(b"kv", 258, b"payload")
    assert frames == [b"kv", b"\x00\x00\x00\x00\x00\x00\x01\x02", b"payload"]
    assert decode_frames(frames) == (b"kv", 258, b"payload")
    assert decode_frames(encode_frames(b"", 2**64 - 1, b"")) == (b"", 2**64 - 1, b"")


@pytest.mark.parametrize(
    "frames", [[], [b"t", b"\x00" * 8], [b"t", b"\x00" * 7, b"p"], [b"t", b"\x00" * 8, b"p", b"x"]]
)
def test_bad_frames_are_rejected(frames):
    with pytest.raises(DecodeError) as info:
        decode_frames(frames)
    assert info.value.kind == "bad_frames"


@pytest.mark.parametrize("seq", [-1, 2**64])
def test_seq_outside_u64_cannot_be_encoded(seq):
    with pytest.raises(ValueError):
        encode_frames(b"", seq, b"")


def test_replay_protocol_messages_follow_vllm():
    assert encode_replay_request(5) == (5).to_bytes(8, "big")
    assert decode_replay_request([b"id", b"", encode_replay_request(5)]) == (b"id", 5)
    assert encode_replay_reply(7, b"p") == [b"", (7).to_bytes(8, "big"), b"p"]
    assert decode_replay_reply(encode_replay_reply(7, b"p")) == (7, b"p")
    end = encode_replay_reply(REPLAY_END_SEQ)
    assert end == [b"", b"\xff" * 8, b""]
    assert decode_replay_reply(end) == (REPLAY_END_SEQ, b"")


def test_replay_replies_in_vllm_0_32_framing_carry_the_topic():
    # vLLM 0.32's ROUTER sends [identity, b"", topic, seq, payload]; the DEALER sees the rest.
    assert encode_replay_reply(7, b"p", topic=b"kv-events") == [b"", b"kv-events", (7).to_bytes(8, "big"), b"p"]
    assert decode_replay_reply([b"", b"kv-events", (7).to_bytes(8, "big"), b"p"]) == (7, b"p")
    assert decode_replay_reply([b"", b"", (7).to_bytes(8, "big"), b"p"]) == (7, b"p")  # empty topic
    end = encode_replay_reply(REPLAY_END_SEQ, topic=b"kv-events")
    assert end == [b"", b"", (-1).to_bytes(8, "big", signed=True), b""]
    assert decode_replay_reply(end) == (REPLAY_END_SEQ, b"")


@pytest.mark.parametrize(
    "frames", [[b"id", encode_replay_request(1)], [b"id", b"x", encode_replay_request(1)], [b"id", b"", b"\x01"]]
)
def test_bad_replay_requests_are_rejected(frames):
    with pytest.raises(DecodeError):
        decode_replay_request(frames)


@pytest.mark.parametrize(
    "frames",
    [
        [b"", b"\x00" * 8],
        [b"x", b"\x00" * 8, b""],
        [b"", b"\x00", b""],
        [b"", b"t", b"\x00", b""],
        [b"x", b"t", b"\x00" * 8, b""],
        [b"", b"t", b"\x00" * 8, b"", b""],
    ],
)
def test_bad_replay_replies_are_rejected(frames):
    with pytest.raises(DecodeError) as info:
        decode_replay_reply(frames)
    assert info.value.kind == "bad_frames"
