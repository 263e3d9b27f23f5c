"""router.config: defaults in one place, YAML mappings validated with clear errors."""

import pytest

from kvgate.router.config import BusyThresholds, RouterConfig, SpeedConfig


def test_defaults():
    config = RouterConfig()
    assert config.mode == "kv" and config.block_size == 64 and config.temperature == 0.0
    assert not config.gpu_only and not config.busy.enabled
    assert config.predict_sent and not config.approximate
    assert config.prediction_ttl < config.approximate_prediction_ttl
    s = config.speed
    assert s == SpeedConfig() and s.learn and s.learn_decode_slowdown
    # The exact seeds are derived in SpeedConfig's docstring (tests/test_tier_cost.py
    # recomputes the tier ones); the model needs their order: a GPU hit is free < loading a
    # block from the CPU < from disk < computing it at the seed rate.
    block_compute_ms = config.block_size / s.prefill_tokens_per_s * 1e3
    assert 0.0 < s.cpu_block_ms < s.disk_block_ms < block_compute_ms
    assert 0.0 <= s.decode_slowdown <= s.max_decode_slowdown
    assert 0.0 < s.smoothing <= 1.0 and s.bound >= 1.0


def test_from_dict_nested():
    config = RouterConfig.from_dict(
        {
            "mode": "round-robin",
            "block_size": 16,
            "temperature": 0.005,
            "gpu_only": True,
            "added_work_weight": 0.25,
            "seed": 7,
            "speed": {"prefill_tokens_per_s": 40_000, "cpu_block_ms": 0.2, "learn": False},
            "busy": {"max_kv_usage": 0.9, "max_waiting": 4},
            "predict_sent": False,
            "prediction_ttl": 5,
            "approximate": True,
            "approximate_prediction_ttl": 120.0,
            "prediction_capacity_blocks": 1000,
        }
    )
    assert config.mode == "round-robin" and config.block_size == 16 and config.seed == 7 and config.gpu_only
    assert config.added_work_weight == 0.25
    assert config.speed == SpeedConfig(prefill_tokens_per_s=40_000, cpu_block_ms=0.2, learn=False)
    assert config.busy == BusyThresholds(max_kv_usage=0.9, max_waiting=4)
    assert config.busy.enabled
    assert (config.predict_sent, config.prediction_ttl, config.approximate) == (False, 5, True)
    assert (config.approximate_prediction_ttl, config.prediction_capacity_blocks) == (120.0, 1000)
    assert RouterConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "data, message",
    [
        ({"modee": "kv"}, "router: unknown key(s) modee; allowed: "),
        ({"weights": {"prefill_weight": 1}}, "router: unknown key(s) weights"),
        ({"speed": {"prefill_tokens_per_sec": 1}}, "router.speed: unknown key(s) prefill_tokens_per_sec"),
        ({"busy": {"max_kv": 0.9}}, "router.busy: unknown key(s) max_kv"),
        ({"mode": "fastest"}, "mode must be one of kv, round-robin, random"),
        ({"block_size": 0}, "block_size must be >= 1"),
        ({"block_size": 64.0}, "block_size must be an integer"),
        ({"temperature": -1}, "temperature must be >= 0.0"),
        ({"temperature": "hot"}, "temperature must be a finite number"),
        ({"gpu_only": "yes"}, "gpu_only must be true or false"),
        ({"speed": {"prefill_tokens_per_s": True}}, "router.speed: prefill_tokens_per_s must be a finite number"),
        ({"speed": {"prefill_tokens_per_s": 0}}, "prefill_tokens_per_s must be > 0.0"),
        ({"speed": {"overhead_ms": -1}}, "overhead_ms must be >= 0.0"),
        ({"speed": {"cpu_block_ms": float("nan")}}, "cpu_block_ms must be a finite number"),
        ({"speed": {"disk_block_ms": "slow"}}, "disk_block_ms must be a finite number"),
        ({"speed": {"decode_slowdown": -0.1}}, "decode_slowdown must be >= 0.0"),
        ({"speed": {"max_decode_slowdown": float("inf")}}, "max_decode_slowdown must be a finite number"),
        ({"speed": {"smoothing": 0}}, "smoothing must be > 0.0"),
        ({"speed": {"smoothing": 1.5}}, "smoothing is the weight of one sample, in (0, 1]"),
        ({"speed": {"bound": 0.5}}, "bound must be >= 1"),
        ({"speed": {"learn": "yes"}}, "learn must be true or false"),
        ({"speed": {"learn_decode_slowdown": 1}}, "learn_decode_slowdown must be true or false"),
        ({"speed": {"min_sample_tokens": 1.5}}, "min_sample_tokens must be an integer"),
        ({"speed": {"min_sample_tokens": -1}}, "min_sample_tokens must be >= 0"),
        ({"speed": []}, "router.speed must be a mapping"),
        ({"busy": {"max_kv_usage": 1.5}}, "max_kv_usage is a fraction in [0, 1]"),
        ({"busy": {"max_waiting": -1}}, "max_waiting must be >= 0"),
        ({"added_work_weight": -1}, "added_work_weight must be >= 0.0"),
        ({"predict_sent": "on"}, "predict_sent must be true or false"),
        ({"approximate": 1}, "approximate must be true or false"),
        ({"prediction_ttl": 0}, "prediction_ttl must be > 0.0"),
        ({"approximate_prediction_ttl": -5}, "approximate_prediction_ttl must be > 0.0"),
        ({"prediction_capacity_blocks": 0}, "prediction_capacity_blocks must be >= 1"),
        ({"prediction_capacity_blocks": 10.5}, "prediction_capacity_blocks must be an integer"),
        ({"active_request_ttl": 0}, "active_request_ttl must be > 0.0"),
        ({"seed": "x"}, "seed must be an integer"),
    ],
)
def test_from_dict_rejects_with_the_key_named(data, message):
    with pytest.raises(ValueError) as err:
        RouterConfig.from_dict(data)
    assert message in str(err.value)


def test_from_dict_rejects_non_mapping():
    with pytest.raises(ValueError, match="router must be a mapping"):
        RouterConfig.from_dict(["kv"])
