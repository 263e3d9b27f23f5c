"""Gateway configuration: defaults < YAML < environment < flags, every option documented, bad input named."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from kvgate.gateway.config import GatewayConfig, build_parser, config_from_dict, load_config
from kvgate.router.config import RouterConfig
from tests.helpers import REPO


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_without_any_source() -> None:
    config = load_config([], environ={})
    assert config == GatewayConfig()
    assert config.model_name == "kvgate-tiny"
    assert config.kv.mode == "kv" and config.kv.block_size == 64


def test_precedence_yaml_then_env_then_flags(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "port: 9001\nhost: 0.0.0.0\nread_timeout: 5\nrouter_mode: random\n"
        "kv: {temperature: 0.5, speed: {decode_slowdown: 0.2, overhead_ms: 7}}\n",
    )
    config = load_config(
        [
            *("--config", path, "--port", "9003"),
            *("--kv-decode-slowdown", "0.6", "--kv-prefill-tokens-per-s", "30000", "--no-kv-learn"),
            *("--kv-min-sample-tokens", "128", "--kv-prediction-capacity-blocks", "4096", "--no-kv-predict-sent"),
        ],
        environ={"KVGATE_PORT": "9002", "KVGATE_HOST": "127.0.0.2", "KVGATE_ACCESS_LOG": "true"},
    )
    assert config.port == 9003  # flag beats env beats YAML
    assert config.host == "127.0.0.2"  # env beats YAML
    assert config.read_timeout == 5.0 and isinstance(config.read_timeout, float)
    assert config.access_log is True
    assert config.router_mode == "random" and config.kv.mode == "random"
    assert config.kv.temperature == 0.5  # YAML kept where no flag overrides it
    speed = config.kv.speed
    assert speed.decode_slowdown == 0.6 and speed.overhead_ms == 7  # the flag beats YAML; YAML kept otherwise
    assert speed.prefill_tokens_per_s == 30000.0 and isinstance(speed.prefill_tokens_per_s, float)
    assert speed.learn is False and speed.min_sample_tokens == 128 and speed.learn_decode_slowdown is True
    assert config.kv.prediction_capacity_blocks == 4096 and config.kv.predict_sent is False


def test_every_option_is_a_documented_flag() -> None:
    help_text = build_parser().format_help()
    for f in fields(GatewayConfig):
        if f.name in ("kv", "workers", "lora_adapters", "api_keys"):
            continue
        assert "--" + f.name.replace("_", "-") in help_text, f.name
    assert "--worker " in help_text and "--lora-adapter" in help_text and "--api-key KEY" in help_text
    leaves = [f.name for f in fields(RouterConfig()) if f.name not in ("mode", "block_size", "speed", "busy")]
    leaves += [f.name for f in fields(RouterConfig().speed)] + [f.name for f in fields(RouterConfig().busy)]
    assert "prefill_tokens_per_s" in leaves and "max_waiting" in leaves and "prediction_ttl" in leaves
    for leaf in leaves:
        assert "--kv-" + leaf.replace("_", "-") in help_text, leaf


def test_worker_flags_and_yaml_workers(tmp_path: Path) -> None:
    config = load_config(
        [
            "--worker",
            "url=http://127.0.0.1:8001,kv_events_endpoint=tcp://127.0.0.1:5557",
            "--worker",
            "http://127.0.0.1:8002",
        ],
        environ={},
    )
    assert [w["id"] for w in config.workers] == ["w0", "w1"]
    infos = config.static_discovery().workers
    assert infos[0].kv_events_endpoint == "tcp://127.0.0.1:5557" and infos[1].kv_events_endpoint is None
    assert infos[0].model == "kvgate-tiny" and infos[0].block_size == 64


def test_shipped_demo_config_loads() -> None:
    config = load_config(["--config", str(REPO / "configs" / "demo.yaml")], environ={})
    assert [w["id"] for w in config.workers] == ["w0", "w1"]
    assert config.kv.busy.max_waiting == 64


@pytest.mark.parametrize(
    "text,message",
    [
        ("prot: 1\n", "unknown option(s) prot"),
        ("port: eighty\n", "port must be int"),
        ("router_mode: fastest\n", "router_mode must be one of"),
        ("read_timeout: 0\n", "read_timeout must be > 0"),
        ("kv: {mode: kv}\n", "top-level router_mode"),
        ("kv: {weights: {cpu_load_fraction: 0.3}}\n", "unknown key(s) weights"),
        ("kv: {speed: {smoothing: 3}}\n", "smoothing is the weight of one sample"),
        ("kv: {speed: {prefill_tokens_per_s: 0}}\n", "prefill_tokens_per_s must be > 0.0"),
        ("kv: {prediction_ttl: 0}\n", "prediction_ttl must be > 0.0"),
        ("workers: [{id: a, url: http://h:1}, {id: a, url: http://h:2}]\n", "duplicate worker id"),
        ("workers: [{id: a, url: ftp://h:1}]\n", "base_url must look like http"),
        ("workers: [{id: a, url: 'http://h:1', colour: red}]\n", "unknown key(s) colour"),
        ("- just a list\n", "must be a mapping"),
        ("port: [\n", "not valid YAML"),
    ],
)
def test_bad_yaml_fails_at_start_naming_the_key(tmp_path: Path, capsys, text: str, message: str) -> None:
    with pytest.raises(SystemExit):
        load_config(["--config", write(tmp_path, text)], environ={})
    assert message in capsys.readouterr().err


def test_bad_flag_and_env_fail_clearly(capsys) -> None:
    with pytest.raises(SystemExit):
        load_config(["--router-mode", "fastest"], environ={})
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        load_config([], environ={"KVGATE_PORT": "x"})
    assert "KVGATE_PORT='x' is not a valid int" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        load_config(["--config", "/nonexistent/kvgate.yaml"], environ={})
    assert "cannot read config" in capsys.readouterr().err


def test_config_from_dict_is_the_yaml_shape() -> None:
    config = config_from_dict({"port": 1234, "lora_adapters": ["sql-lora"], "kv": {"busy": {"max_waiting": 3}}})
    assert config.port == 1234 and config.lora_adapters == ["sql-lora"] and config.kv.busy.max_waiting == 3
    assert config.preprocessor_options()["context_length"] is None
    with pytest.raises(ValueError, match="lora_adapters"):
        config_from_dict({"lora_adapters": "sql-lora"})


def test_readme_documents_every_option_and_metric() -> None:
    readme = (REPO / "gateway" / "README.md").read_text()
    for f in fields(GatewayConfig):
        assert f"`{f.name}`" in readme or f"`{f.name}:`" in readme, f.name
    from kvgate.gateway.metrics import GatewayMetrics

    for metric in GatewayMetrics().registry.collect():
        assert metric.name in readme, metric.name
