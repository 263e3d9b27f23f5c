"""Deployment files checked offline: Kubernetes schemas, the compose file's wiring, vLLM's launch line.

``kubernetes-validate`` carries the Kubernetes OpenAPI schemas, so every manifest is
validated strictly (unknown fields are errors) with no cluster and no network. The
compose file is parsed and its references checked. ``serve.sh``'s KV-events config is
read by ``serve_sh_kv_events`` — the same function the real-vLLM interop tests use to
start their engines, so the launch line users copy is the one the tests prove.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "configs" / "k8s"
SERVE_SH = REPO / "configs" / "vllm" / "serve.sh"


def serve_sh_kv_events(events_port: int, replay_port: int) -> dict[str, Any]:
    """``--kv-events-config`` exactly as ``configs/vllm/serve.sh`` builds it, for these ports."""
    text = SERVE_SH.read_text()
    match = re.search(r'^KV_EVENTS="(.*?)"$', text, re.S | re.M)
    assert match is not None, "serve.sh no longer sets KV_EVENTS"
    raw = match.group(1).replace('\\"', '"')
    raw = raw.replace("${EVENTS_PORT}", str(events_port)).replace("${REPLAY_PORT}", str(replay_port))
    config: dict[str, Any] = json.loads(raw)
    return config


def serve_sh_engine_flags() -> list[str]:
    """The engine flags ``serve.sh`` always passes (the ``set -- vllm serve ...`` line)."""
    text = SERVE_SH.read_text()
    match = re.search(r'^set -- vllm serve "\$MODEL" (.*?)\n(?!\s)', text, re.S | re.M)
    assert match is not None, "serve.sh no longer starts the engine with `set -- vllm serve`"
    return shlex.split(match.group(1).replace("\\\n", " "))


def manifests() -> list[tuple[str, dict[str, Any]]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = []
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            if doc:
                docs.append((f"{name}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return docs


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == on_disk
    assert kustomization["namespace"] == "kvgate"


@pytest.mark.parametrize(("where", "doc"), manifests(), ids=[w for w, _ in manifests()])
def test_manifests_are_valid_kubernetes(where: str, doc: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    except kubernetes_validate.ValidationError as err:
        pytest.fail(f"{where}: {err.message} at {list(err.path)}")


def test_a_broken_manifest_is_caught() -> None:
    # The check above can fail: an unknown field and a wrong type are both rejected.
    _, deployment = next((w, d) for w, d in manifests() if d["kind"] == "Deployment")
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["replicaz"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)


def test_containers_run_modules_that_exist() -> None:
    for where, doc in manifests():
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        for container in spec.get("containers", []):
            command = container.get("command", [])
            if command[:2] == ["python", "-m"]:
                assert importlib.util.find_spec(command[2]) is not None, f"{where}: no module {command[2]}"


def test_compose_file_is_wired() -> None:
    compose = yaml.safe_load((REPO / "configs" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"etcd", "nats", "gateway-a", "gateway-b", "w0", "w1", "w2", "vllm-0"} <= set(services)
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown service {dependency}"
        command = service.get("command", [])
        text = " ".join(command) if isinstance(command, list) else str(command)
        for module in re.findall(r"python -m ([\w.]+)", text):
            assert importlib.util.find_spec(module) is not None, f"{name}: no module {module}"
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    assert "healthcheck" in services["etcd"] and "healthcheck" in services["nats"]


def test_serve_sh_binds_the_event_sockets_the_way_vllm_binds() -> None:
    config = serve_sh_kv_events(5557, 5558)
    assert config["enable_kv_cache_events"] is True and config["publisher"] == "zmq"
    # vLLM binds its PUB / ROUTER sockets only for tcp://*:P (or ipc://, inproc://); for
    # tcp://host:P it connects instead and no subscriber ever hears an event.
    assert config["endpoint"] == "tcp://*:5557"
    assert config["replay_endpoint"] == "tcp://*:5558"
    flags = serve_sh_engine_flags()
    for flag in ("--enable-prefix-caching", "--enable-prompt-tokens-details"):
        assert flag in flags
    assert flags[flags.index("--block-size") + 1] == "64"
