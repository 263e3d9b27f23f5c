"""router.config: defaults in one place, YAML mappings validated with clear errors."""

import pytest

from kvgate.protocol.events import Tier
from kvgate.router.config import BusyThresholds, CostWeights, RouterConfig


def test_defaults():
    config = RouterConfig()
    assert config.mode == "kv" and config.block_size == 64 and config.temperature == 0.0
    assert not config.gpu_only and not config.busy.enabled
    w = config.weights
    assert (w.prefill_weight, w.decode_weight, w.compute_cost) == (1.0, 1.0, 1.0)
    assert w.tier_load_cost(Tier.GPU) == 0.0
    # The exact fractions are derived from the simulator's costs (tests/test_tier_cost.py);
    # the model needs their order: GPU free < CPU load < disk load < recompute.
    assert 0.0 < w.tier_load_cost(Tier.CPU) < w.tier_load_cost(Tier.DISK) < w.compute_cost


def test_tier_load_cost_is_a_fraction_of_compute_cost():
    w = CostWeights(compute_cost=4.0, cpu_load_fraction=0.1, disk_load_fraction=0.3)
    assert w.tier_load_cost(Tier.CPU) == pytest.approx(0.4)
    assert w.tier_load_cost(Tier.DISK) == pytest.approx(1.2)


def test_from_dict_nested():
    config = RouterConfig.from_dict(
        {
            "mode": "round-robin",
            "block_size": 16,
            "temperature": 0.5,
            "gpu_only": True,
            "seed": 7,
            "weights": {"prefill_weight": 2, "cpu_load_fraction": 0.2},
            "busy": {"max_kv_usage": 0.9, "max_waiting": 4},
        }
    )
    assert config.mode == "round-robin" and config.block_size == 16 and config.seed == 7 and config.gpu_only
    assert config.weights == CostWeights(prefill_weight=2, cpu_load_fraction=0.2)
    assert config.busy == BusyThresholds(max_kv_usage=0.9, max_waiting=4)
    assert config.busy.enabled
    assert RouterConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "data, message",
    [
        ({"modee": "kv"}, "router: unknown key(s) modee; allowed: "),
        ({"weights": {"prefil_weight": 1}}, "router.weights: unknown key(s) prefil_weight"),
        ({"busy": {"max_kv": 0.9}}, "router.busy: unknown key(s) max_kv"),
        ({"mode": "fastest"}, "mode must be one of kv, round-robin, random"),
        ({"block_size": 0}, "block_size must be >= 1"),
        ({"block_size": 64.0}, "block_size must be an integer"),
        ({"temperature": -1}, "temperature must be >= 0.0"),
        ({"temperature": "hot"}, "temperature must be a finite number"),
        ({"gpu_only": "yes"}, "gpu_only must be true or false"),
        ({"weights": {"prefill_weight": True}}, "prefill_weight must be a finite number"),
        ({"weights": {"decode_weight": float("nan")}}, "decode_weight must be a finite number"),
        ({"weights": {"cpu_load_fraction": 2.0}}, "cpu_load_fraction must be <= 1"),
        ({"weights": []}, "router.weights must be a mapping"),
        ({"busy": {"max_kv_usage": 1.5}}, "max_kv_usage is a fraction in [0, 1]"),
        ({"busy": {"max_waiting": -1}}, "max_waiting must be >= 0"),
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
