"""vLLM's /kv_event_sources answer -> the endpoints a subscriber on another host connects to."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvgate.protocol.kv_event_sources import (
    EventSources,
    KvEventSourcesError,
    RankSource,
    parse_kv_event_sources,
)

GOLDEN = Path(__file__).parent / "fixtures" / "vllm-0.32" / "http" / "kv_event_sources.json"


def entry(endpoint: str, replay: str | None = None, **extra: object) -> dict[str, object]:
    return {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": endpoint,
        "replay_endpoint": replay,
        **extra,
    }


def test_vllm_032s_answer_resolves_to_the_workers_host() -> None:
    answer = json.loads(GOLDEN.read_text())["response"]
    assert parse_kv_event_sources("http://10.0.0.5:8000", answer) == EventSources(
        (RankSource("tcp://10.0.0.5:15557", "tcp://10.0.0.5:15567", "kv-events"),)
    )


@pytest.mark.parametrize("wildcard", ["*", "0.0.0.0", "::", "[::]"])
def test_every_wildcard_host_becomes_the_url_host(wildcard: str) -> None:
    found = parse_kv_event_sources("http://gpu-3.internal:8000/", {"0": entry(f"tcp://{wildcard}:5557")})
    assert found is not None and found.ranks == (RankSource("tcp://gpu-3.internal:5557", None, ""),)


def test_an_ipv6_worker_url_gives_a_bracketed_endpoint() -> None:
    found = parse_kv_event_sources("http://[fd00::5]:8000", {"0": entry("tcp://*:5557", "tcp://*:5558")})
    assert found is not None and found.ranks[0] == RankSource("tcp://[fd00::5]:5557", "tcp://[fd00::5]:5558", "")


def test_ranks_come_in_order_and_a_connecting_endpoint_is_reported() -> None:
    answer = {"1": entry("tcp://10.0.0.9:5558"), "0": entry("tcp://10.0.0.9:5557", "ipc:///tmp/replay")}
    found = parse_kv_event_sources("http://10.0.0.9:8000", answer)
    assert found is not None
    assert [r.endpoint for r in found.ranks] == ["tcp://10.0.0.9:5557", "tcp://10.0.0.9:5558"]
    assert found.ranks[0].replay_endpoint == "ipc:///tmp/replay"
    # vLLM connects (does not bind) for a named host: nobody can subscribe there.
    assert sorted(found.connecting) == ["tcp://10.0.0.9:5557", "tcp://10.0.0.9:5558"]
    # 0.0.0.0 is a wildcard to us, but vLLM connects for it too.
    assert parse_kv_event_sources("http://h:1", {"0": entry("tcp://0.0.0.0:5557")}).connecting == (  # type: ignore[union-attr]
        "tcp://0.0.0.0:5557",
    )


@pytest.mark.parametrize(
    "answer",
    [
        {},
        {"0": {"enable_kv_cache_events": False, "endpoint": "tcp://*:1"}},
        {"0": entry("tcp://*:1", publisher="null")},
    ],
)
def test_no_reachable_publisher_is_none(answer: dict[str, object]) -> None:
    assert parse_kv_event_sources("http://h:1", answer) is None


@pytest.mark.parametrize(
    "answer,message",
    [
        ([], "JSON object"),
        ({"zero": entry("tcp://*:1")}, "not an integer"),
        ({"0": "tcp://*:1"}, "expected an object"),
        ({"0": entry("")}, "no endpoint"),
        ({"0": entry("tcp://*:1", 5)}, "replay_endpoint"),
        ({"0": entry("tcp://*:1", topic=3)}, "topic"),
        ({"1": entry("tcp://*:1")}, "not 0..0"),
    ],
)
def test_a_malformed_answer_is_an_error(answer: object, message: str) -> None:
    with pytest.raises(KvEventSourcesError, match=message):
        parse_kv_event_sources("http://h:1", answer)
