"""Engine load from a vLLM /metrics page: what the gateway's scrape and the sidecar's both read."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvgate.protocol.engine_metrics import EngineMetricsError, parse_engine_load

VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 1.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 2.0
vllm:num_requests_waiting{engine="1",model_name="m"} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.5
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="m"} 1234.0
"""


def test_engine_load_per_dp_rank() -> None:
    assert parse_engine_load(VLLM_METRICS, dp_size=2) == {0: (3, 2, 0.25, None), 1: (1, 0, 0.5, None)}
    # Ranks the worker does not have are ignored.
    assert parse_engine_load(VLLM_METRICS, dp_size=1) == {0: (3, 2, 0.25, None)}
    load = parse_engine_load(VLLM_METRICS, dp_size=2)[1]
    assert (load.running, load.waiting, load.kv_usage) == (1, 0, 0.5)


def test_engine_load_sums_model_names_and_takes_the_highest_usage() -> None:
    page = (
        'vllm:num_requests_running{engine="0",model_name="a"} 3.0\n'
        'vllm:num_requests_running{engine="0",model_name="b"} 2.0\n'
        'vllm:num_requests_waiting{engine="0",model_name="a"} 1.0\n'
        'vllm:kv_cache_usage_perc{engine="0",model_name="a"} 0.25\n'
        'vllm:kv_cache_usage_perc{engine="0",model_name="b"} 0.75\n'
    )
    assert parse_engine_load(page, 1) == {0: (5, 1, 0.75, None)}


def test_engine_load_older_vllm_names_and_gaps() -> None:
    older = "vllm:num_requests_running 1\nvllm:num_requests_waiting 4\nvllm:gpu_cache_usage_perc 0.75\n"
    assert parse_engine_load(older, 1) == {0: (1, 4, 0.75, None)}
    assert parse_engine_load(older, 1)[0].kv_usage == 0.75
    # Both names on one page (vLLM's deprecation window): the current one is read.
    both = older + "vllm:kv_cache_usage_perc 0.5\n"
    assert parse_engine_load(both, 1)[0].kv_usage == 0.5
    # No KV gauge at all: usage unknown, read as empty.
    assert parse_engine_load("vllm:num_requests_running 1\nvllm:num_requests_waiting 0\n", 1) == {0: (1, 0, 0.0, None)}


def test_engine_load_needs_both_request_gauges() -> None:
    # A missing count is unknown, not zero: such a rank is not reported.
    with pytest.raises(EngineMetricsError):
        parse_engine_load("vllm:num_requests_running 1\n", 1)
    with pytest.raises(EngineMetricsError):
        parse_engine_load("vllm:num_requests_running 4\nvllm:gpu_cache_usage_perc 0.75\n", 1)
    partial = VLLM_METRICS.replace('vllm:num_requests_waiting{engine="1",model_name="m"} 0.0\n', "")
    assert parse_engine_load(partial, 2) == {0: (3, 2, 0.25, None)}


def test_engine_load_rejects_pages_without_load() -> None:
    with pytest.raises(EngineMetricsError):
        parse_engine_load("", 1)
    with pytest.raises(EngineMetricsError):
        parse_engine_load("process_cpu_seconds_total 1\n", 1)
    with pytest.raises(EngineMetricsError):
        parse_engine_load("{{{ not prometheus", 1)
    # Only ranks the worker does not have.
    with pytest.raises(EngineMetricsError):
        parse_engine_load('vllm:num_requests_running{engine="3"} 1\nvllm:num_requests_waiting{engine="3"} 1\n', 2)


def test_engine_load_rejects_impossible_values() -> None:
    for running in ("-1", "NaN", "+Inf"):
        with pytest.raises(EngineMetricsError):
            parse_engine_load(f"vllm:num_requests_running {running}\nvllm:num_requests_waiting 0\n", 1)
    with pytest.raises(EngineMetricsError):
        parse_engine_load("vllm:num_requests_running 1\nvllm:num_requests_waiting 0\nvllm:kv_cache_usage_perc NaN\n", 1)
    # Usage past the ends is clamped, not rejected (rounding in the engine).
    page = "vllm:num_requests_running 1\nvllm:num_requests_waiting 0\nvllm:kv_cache_usage_perc 1.0000001\n"
    assert parse_engine_load(page, 1)[0].kv_usage == 1.0


def test_engine_load_rank_labels() -> None:
    # A negative rank is no rank of this worker; a label that is not a number is the only engine.
    negative = 'vllm:num_requests_running{engine="-1"} 1\nvllm:num_requests_waiting{engine="-1"} 1\n'
    with pytest.raises(EngineMetricsError):
        parse_engine_load(negative, 2)
    named = 'vllm:num_requests_running{engine="core"} 2\nvllm:num_requests_waiting{engine="core"} 1\n'
    assert parse_engine_load(named, 1) == {0: (2, 1, 0.0, None)}


def test_engine_load_from_a_real_vllm_page() -> None:
    # vLLM 0.32's own page (~750 lines, mostly histograms): only the load gauges' lines are read,
    # not gauges whose names begin with theirs (vllm:num_requests_waiting_by_reason).
    page = (Path(__file__).parent / "fixtures" / "vllm-0.32" / "http" / "metrics.txt").read_text()
    assert parse_engine_load(page, 1) == {0: (0, 0, 0.0, 4160)}
    busy = (
        page.replace(
            'vllm:num_requests_running{engine="0",model_name="kvgate-tiny"} 0.0',
            'vllm:num_requests_running{engine="0",model_name="kvgate-tiny"} 7.0',
        )
        .replace(
            'vllm:num_requests_waiting{engine="0",model_name="kvgate-tiny"} 0.0',
            'vllm:num_requests_waiting{engine="0",model_name="kvgate-tiny"} 3.0',
        )
        .replace('reason="capacity"} 0.0', 'reason="capacity"} 5.0')
        .replace(
            'vllm:kv_cache_usage_perc{engine="0",model_name="kvgate-tiny"} 0.0',
            'vllm:kv_cache_usage_perc{engine="0",model_name="kvgate-tiny"} 0.125',
        )
    )
    assert parse_engine_load(busy, 1) == {0: (7, 3, 0.125, 4160)}
    # The same gauges anywhere on the page, first line and last line without a newline included.
    lines = [line for line in busy.splitlines() if not line.startswith("vllm:num_requests_running{")]
    moved = 'vllm:num_requests_running{engine="0",model_name="kvgate-tiny"} 7.0\n' + "\n".join(lines)
    assert parse_engine_load(moved, 1) == {0: (7, 3, 0.125, 4160)}
    last = "\n".join(line for line in busy.splitlines() if not line.startswith("vllm:num_requests_waiting{"))
    assert parse_engine_load(last + '\nvllm:num_requests_waiting{engine="0"} 4', 1) == {0: (7, 4, 0.125, 4160)}
    # A load line that is not Prometheus is still an error.
    with pytest.raises(EngineMetricsError):
        parse_engine_load(busy.replace("} 7.0", "} seven"), 1)


def test_engine_load_reads_the_kv_pool_size_per_rank() -> None:
    # vllm:cache_config_info's labels give the GPU pool: num_gpu_blocks x block_size tokens.
    info = 'vllm:cache_config_info{{block_size="{bs}",engine="{rank}",num_gpu_blocks="{n}"}} 1.0\n'
    page = VLLM_METRICS + info.format(bs=16, rank=0, n=1000) + info.format(bs=16, rank=1, n=2000)
    loads = parse_engine_load(page, dp_size=2)
    assert (loads[0].capacity_tokens, loads[1].capacity_tokens) == (16_000, 32_000)
    # Labels that are not positive integers ("None" before the profile run) say nothing.
    for bad in ("None", "0", "-5"):
        page = VLLM_METRICS + info.format(bs=16, rank=0, n=bad)
        assert parse_engine_load(page, dp_size=1)[0].capacity_tokens is None
    # A rank the worker does not have is ignored like its gauges.
    assert parse_engine_load(VLLM_METRICS + info.format(bs=16, rank=1, n=10), dp_size=1)[0].capacity_tokens is None


def test_sample_lines_are_read_as_prometheus_reads_them() -> None:
    # The load lines are read by a small reader of the text format (Prometheus' parser took ~0.7 ms
    # over them, on the event loop); it must read what Prometheus' own parser reads.
    from prometheus_client.parser import text_string_to_metric_families

    from kvgate.protocol.engine_metrics import _load_lines, _samples

    page = (Path(__file__).parent / "fixtures" / "vllm-0.32" / "http" / "metrics.txt").read_text()
    tricky = (
        'vllm:num_requests_running{engine="0",model_name="a \\"quoted\\" } , name",} 2.5 1712345678000\n'
        'vllm:num_requests_waiting{ engine = "0" , path="C:\\\\dir\\nnext" } +Inf\n'
        "vllm:kv_cache_usage_perc -0.5e-1\n"
        "vllm:kv_cache_usage_perc{} NaN\n"
    )
    for lines in (_load_lines(page), tricky):
        ours = _samples(lines)
        theirs = [
            (s.name, s.labels, s.value) for family in text_string_to_metric_families(lines) for s in family.samples
        ]
        assert len(ours) == len(theirs) > 0
        for (name, labels, value), (name2, labels2, value2) in zip(ours, theirs, strict=True):
            assert (name, labels) == (name2, labels2)
            assert value == value2 or (value != value and value2 != value2)  # NaN


@pytest.mark.parametrize(
    "line",
    [
        "vllm:num_requests_running{engine=0} 1",
        'vllm:num_requests_running{engine="0" model="m"} 1',
        'vllm:num_requests_running{engine="0} 1',
        'vllm:num_requests_running{="0"} 1',
        "vllm:num_requests_running ",
        "vllm:num_requests_running one",
        'vllm:num_requests_running{engine="0"}1',
    ],
)
def test_malformed_sample_lines_are_errors(line: str) -> None:
    with pytest.raises(EngineMetricsError, match="not Prometheus text"):
        parse_engine_load(line + "\nvllm:num_requests_waiting 0\n", 1)
