"""router.registry: validated worker descriptions, add / put / remove, listeners, static discovery."""

import pytest

from kvgate.protocol.events import WorkerKey
from kvgate.protocol.worker_record import WorkerConfigError, WorkerInfo
from kvgate.router.registry import RegistryChange, StaticDiscovery, WorkerRegistry


def info(worker_id="w1", **kw):
    return WorkerInfo(worker_id, kw.pop("base_url", "http://127.0.0.1:9001"), kw.pop("model", "tiny"), **kw)


def test_worker_info_normalises():
    w = info(
        base_url="http://127.0.0.1:9001/",
        tiers=["gpu", "cpu", "storage"],
        dp_size=2,
        kv_events_endpoint="tcp://127.0.0.1:5557",
        kv_events_replay_endpoint="tcp://127.0.0.1:5558",
    )
    assert w.base_url == "http://127.0.0.1:9001"
    assert w.tiers == ("GPU", "CPU", "DISK")
    assert w.keys == [WorkerKey("w1", 0), WorkerKey("w1", 1)]
    assert w.to_dict()["tiers"] == ["GPU", "CPU", "DISK"]


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"worker_id": ""}, "worker id must be a non-empty string"),
        ({"worker_id": "a#1"}, "without spaces, '#' or '/'"),
        ({"worker_id": 3}, "worker id must be a non-empty string"),
        ({"base_url": "ftp://h:1"}, "base_url must look like http://host:port"),
        ({"base_url": "127.0.0.1:9001"}, "base_url must look like http://host:port"),
        ({"base_url": "http://h:70000"}, "base_url 'http://h:70000' is not a valid URL"),
        ({"dp_size": 0}, "dp_size must be an integer >= 1"),
        ({"dp_size": True}, "dp_size must be an integer >= 1"),
        ({"block_size": "64"}, "block_size must be an integer >= 1"),
        ({"kv_events_endpoint": "http://h:1"}, "kv_events_endpoint must look like tcp://host:port"),
        ({"kv_events_endpoint": "tcp://h"}, "kv_events_endpoint must look like tcp://host:port"),
        ({"kv_events_replay_endpoint": "tcp://h:2"}, "kv_events_replay_endpoint given without kv_events_endpoint"),
        ({"tiers": ["GPU", "TPU"]}, "unknown tier 'TPU'"),
        ({"tiers": ["CPU"]}, "tiers must include GPU"),
        ({"tiers": "GPU"}, "tiers must be a list"),
        ({"metadata": [1]}, "metadata must be a mapping"),
    ],
)
def test_worker_info_rejects(kw, message):
    with pytest.raises(WorkerConfigError) as err:
        info(**kw)
    assert message in str(err.value)


def test_ipc_endpoint_accepted():
    assert info(kv_events_endpoint="ipc:///tmp/kv.sock").kv_events_endpoint == "ipc:///tmp/kv.sock"


def test_registry_add_remove_and_listeners():
    registry = WorkerRegistry()
    changes: list[RegistryChange] = []
    unsubscribe = registry.subscribe(changes.append)
    registry.add(info("w2", dp_size=2))
    registry.add(info("w1"))
    assert registry.keys() == [WorkerKey("w1"), WorkerKey("w2", 0), WorkerKey("w2", 1)]
    assert [w.worker_id for w in registry.all()] == ["w1", "w2"]
    assert "w1" in registry and len(registry) == 2 and registry.get("w3") is None
    with pytest.raises(WorkerConfigError, match="duplicate worker id 'w1'"):
        registry.add(info("w1", base_url="http://other:1"))
    assert registry.get("w1").base_url == "http://127.0.0.1:9001"

    removed = registry.remove("w2")
    assert removed is not None and removed.worker_id == "w2"
    assert registry.remove("w2") is None  # a late DELETE is not an error
    assert registry.keys() == [WorkerKey("w1")]
    assert [(c.kind, c.worker.worker_id) for c in changes] == [("added", "w2"), ("added", "w1"), ("removed", "w2")]

    unsubscribe()
    registry.remove("w1")
    assert len(changes) == 3


def test_put_is_idempotent_and_replaces_changed_workers():
    registry = WorkerRegistry()
    changes = []
    registry.subscribe(lambda c: changes.append((c.kind, c.worker.base_url)))
    registry.put(info("w1"))
    registry.put(info("w1"))  # lease refresh: same description, nothing to announce
    registry.put(info("w1", base_url="http://127.0.0.1:9002"))
    assert changes == [
        ("added", "http://127.0.0.1:9001"),
        ("removed", "http://127.0.0.1:9001"),
        ("added", "http://127.0.0.1:9002"),
    ]
    assert registry.get("w1").base_url == "http://127.0.0.1:9002"


def test_failing_listener_does_not_stop_the_others_or_the_change():
    registry = WorkerRegistry()
    heard = []

    def broken(change):
        raise RuntimeError("listener bug")

    registry.subscribe(broken)
    registry.subscribe(heard.append)
    registry.add(info("w1"))
    assert "w1" in registry and [c.kind for c in heard] == ["added"]


def test_static_discovery_builds_a_registry():
    discovery = StaticDiscovery(
        [
            {"id": "a", "url": "http://127.0.0.1:9001", "kv_events_endpoint": "tcp://127.0.0.1:5557"},
            {"id": "b", "url": "http://127.0.0.1:9002", "dp_size": 2, "model": "other", "tiers": ["GPU", "CPU"]},
        ],
        model="tiny",
        block_size=32,
    )
    registry = discovery.registry()
    assert registry.keys() == [WorkerKey("a"), WorkerKey("b", 0), WorkerKey("b", 1)]
    a, b = registry.get("a"), registry.get("b")
    assert (a.model, a.block_size, a.kv_events_endpoint) == ("tiny", 32, "tcp://127.0.0.1:5557")
    assert (b.model, b.tiers) == ("other", ("GPU", "CPU"))


@pytest.mark.parametrize(
    "entries, message",
    [
        ({"id": "a"}, "workers must be a list of mappings"),
        (["a"], "workers[0] must be a mapping"),
        ([{"url": "http://h:1"}], "workers[0]: missing required key 'id'"),
        ([{"id": "a"}], "workers[0]: missing required key 'url'"),
        ([{"id": "a", "url": "http://h:1", "port": 3}], "workers[0]: unknown key(s) port"),
        ([{"id": "a", "url": "http://h:1"}, {"id": "a", "url": "http://h:2"}], "workers[1]: duplicate worker id 'a'"),
        (
            [{"id": "a", "url": "http://h:1"}, {"id": "b", "url": "h:2"}],
            "workers[1]: worker 'b': base_url must look like",
        ),
        ([{"id": "a", "url": "http://h:1", "dp_size": 0}], "workers[0]: worker 'a': dp_size must be an integer >= 1"),
    ],
)
def test_static_discovery_rejects_before_touching_a_registry(entries, message):
    with pytest.raises(WorkerConfigError) as err:
        StaticDiscovery(entries)
    assert message in str(err.value)
