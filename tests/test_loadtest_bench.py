"""``python -m kvgate.loadtest.bench`` end to end: real workers, real gateway, real report (a few seconds each)."""

from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path

import pytest
import yaml

from kvgate.loadtest.corpus import Vocabulary, load_tokenizer
from kvgate.loadtest.stack import repo_relative
from kvgate.loadtest.trace import ReplayConfig, TracePrompts, load_trace
from tests.helpers import TINY_MODEL, python_module

pytestmark = pytest.mark.e2e

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def stack_ports(out: Path) -> list[int]:
    """Every port of every stack the bench started, from the gateway configs it wrote."""
    ports = []
    for cfg_path in out.glob("logs/*/gateway.yaml"):  # one directory per mode, or per run in a sweep
        cfg = yaml.safe_load(cfg_path.read_text())
        ports.append(cfg["port"])
        ports += [int(w["url"].rsplit(":", 1)[1]) for w in cfg["workers"]]
    return ports


def refused(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def run_bench(tmp_path: Path, *args: str | int, timeout: float = 120) -> tuple[int, str]:
    proc = python_module("kvgate.loadtest.bench", *args, "--out", tmp_path / "report", log_path=tmp_path / "bench.log")
    try:
        code = proc.popen.wait(timeout=timeout)
    finally:
        proc.stop()
    return code, proc.log_path.read_text()


@pytest.mark.slow
def test_bench_compares_modes_and_writes_the_report(tmp_path):
    code, log = run_bench(
        tmp_path,
        "--workload",
        "multi-turn",
        "--workers",
        2,
        "--modes",
        "kv,round-robin",
        "--duration",
        3,
        "--users",
        3,
        "--turns",
        4,
        "--first-turn-tokens",
        256,
        "--turn-tokens",
        32,
        "--max-tokens",
        8,
        "--think-time",
        0.05,
        "--seed",
        5,
    )
    assert code == 0, log
    out = tmp_path / "report"
    assert "[kv]" in log and "sent" in log and "req/s" in log  # progress while it ran
    for name in ("report.md", "results.json", "ttft_cdf.png", "throughput_hit_rate.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "ttft_cdf.png").read_bytes().startswith(PNG_MAGIC)

    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["seed"] == 5 and "--workload multi-turn" in results["meta"]["command"]
    # The shipped tokenizer is named relative to the repository: committed reports name no machine's paths.
    assert results["meta"]["stack"]["model"] == "models/kvgate-tiny"
    modes = {m["mode"]: m for m in results["modes"]}
    assert list(modes) == ["kv", "round-robin"]
    for m in modes.values():
        s = m["summary"]
        assert s["ok"] > 0 and s["errors"] == 0
        assert s["ttft_ms"]["p50"] > 0 and s["e2e_ms"]["p50"] >= s["ttft_ms"]["p50"]
        assert set(s["requests_per_worker"]) <= {"w0", "w1"}
        assert sum(s["requests_per_worker"].values()) == s["requests"]
        # The hit rate comes from the workers' vllm:prefix_cache_* deltas.
        assert s["prefix_hit_rate"] is not None
        assert all(len(r["itl_s"]) == 7 for r in m["records"])
    rr = modes["round-robin"]["summary"]["requests_per_worker"]
    assert abs(rr.get("w0", 0) - rr.get("w1", 0)) <= 1
    # Later turns of a conversation reuse its prefix: kv routing shows hits.
    assert modes["kv"]["summary"]["prefix_hit_rate"] > 0

    md = (out / "report.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith(("| kv ", "| round-robin ")) and "w0:" in line]
    assert len(rows) == 2
    for m in modes.values():  # no cache beats an infinite one on the same requests
        o = m["oracle"]
        assert o["requests"] == m["summary"]["ok"]
        assert 0 < o["measured_fraction"] <= o["infinite_fraction"] and o["pooled_lru_fraction"] <= 1
    assert all(refused(p) for p in stack_ports(out))  # every process it started is gone


@pytest.mark.slow
def test_bench_replays_the_trace_with_honoured_lengths(tmp_path):
    code, log = run_bench(
        tmp_path,
        "--workload",
        "trace",
        "--workers",
        2,
        "--modes",
        "kv",
        "--duration",
        30,
        "--max-requests",
        12,
        "--time-scale",
        0.02,
        "--length-scale",
        0.125,
        "--output-scale",
        0.1,
    )
    assert code == 0, log
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    assert results["meta"]["trace"] == "loadtest/traces/mooncake_synthetic_trace.jsonl"
    (mode,) = results["modes"]
    recs = mode["records"]
    assert len(recs) == 12 and all(r["status"] == 200 and r["error"] is None for r in recs)

    prompts = TracePrompts(
        Vocabulary.from_tokenizer(load_tokenizer(str(TINY_MODEL))), ReplayConfig(length_scale=0.125, output_scale=0.1)
    )
    by_index = {r["user"]: r for r in recs}
    for i, req in enumerate(load_trace()[:12]):
        # The served prompt is as long as the replay meant (the trace's length, scaled), and so is the output.
        assert by_index[i]["prompt_tokens"] == prompts.prompt_tokens(req)
        assert abs(prompts.prompt_tokens(req) - req.input_length * 0.125) <= len(req.hash_ids)
        assert by_index[i]["completion_tokens"] == prompts.max_tokens(req)
    assert all(refused(p) for p in stack_ports(tmp_path / "report"))


@pytest.mark.slow
def test_interrupted_bench_stops_everything_it_started(tmp_path):
    proc = python_module(
        "kvgate.loadtest.bench",
        "--workload",
        "no-sharing",
        "--workers",
        2,
        "--modes",
        "kv",
        "--duration",
        120,
        "--users",
        2,
        "--prompt-tokens",
        128,
        "--max-tokens",
        4,
        "--out",
        tmp_path / "report",
        log_path=tmp_path / "bench.log",
    )
    try:
        deadline = time.monotonic() + 90
        while "[kv]   " not in proc.log() and time.monotonic() < deadline:
            assert proc.alive(), proc.log()
            time.sleep(0.2)
        ports = stack_ports(tmp_path / "report")
        assert len(ports) == 3 and not any(refused(p) for p in ports)
        proc.popen.send_signal(signal.SIGINT)
        assert proc.popen.wait(timeout=60) == 130
    finally:
        proc.stop()
    assert "interrupted" in proc.log_path.read_text()
    assert all(refused(p) for p in ports)


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["--workload", "multi-turn", "--modes", "kv,fastest"], "unknown mode"),
        (["--workload", "trace", "--trace", "/nonexistent/trace.jsonl"], "No such file"),
        (["--workload", "trace", "--time-scale", "0"], "time_scale"),
        (["--workload", "multi-turn", "--gateway-url", "http://127.0.0.1:1"], "given 1 times for 2 modes"),
    ],
)
def test_bad_arguments_are_clear_errors(tmp_path, args, message):
    code, log = run_bench(tmp_path, *args, timeout=60)
    assert code in (1, 2) and message in log and "Traceback" not in log
    assert not (tmp_path / "report" / "logs").exists()  # nothing was started


@pytest.mark.slow
def test_unreachable_gateway_is_a_clear_error(tmp_path):
    from kvgate.dev.launch import free_port

    code, log = run_bench(
        tmp_path,
        "--workload",
        "no-sharing",
        "--modes",
        "kv",
        "--duration",
        1,
        "--gateway-url",
        f"http://127.0.0.1:{free_port()}",
        timeout=60,
    )
    assert code == 1 and "error: Cannot connect" in log and "Traceback" not in log


def test_kv_gpu_only_is_the_kv_router_with_tiers_ignored():
    from kvgate.loadtest.bench import gateway_mode

    assert gateway_mode("kv-gpu-only") == ("kv", ("--kv-gpu-only",))
    assert gateway_mode("kv") == ("kv", ()) and gateway_mode("round-robin") == ("round-robin", ())


def test_every_bench_mode_is_a_gateway_the_gateway_accepts():
    from kvgate.gateway.config import load_config
    from kvgate.loadtest.bench import ROUTER_MODES, gateway_mode

    for mode in ROUTER_MODES:
        router_mode, flags = gateway_mode(mode)
        config = load_config(["--router-mode", router_mode, *flags], environ={})
        assert config.router_mode == router_mode
    config = load_config(["--router-mode", "kv", *gateway_mode("kv-no-memory-wait")[1]], environ={})
    assert config.kv.memory_wait is False and load_config([], environ={}).kv.memory_wait is True


@pytest.mark.slow
def test_rate_sweep_reports_goodput_the_oracle_and_cpu(tmp_path):
    code, log = run_bench(
        tmp_path,
        "--workload",
        "burst",
        "--modes",
        "kv,round-robin",
        "--rates",
        "3,6",
        "--duration",
        2,
        "--burst-doc-tokens",
        512,
        "--burst-size",
        3,
        "--question-tokens",
        16,
        "--max-tokens",
        4,
        "--slo-ttft",
        5,
        timeout=180,
    )
    assert code == 0, log
    out = tmp_path / "report"
    results = json.loads((out / "results.json").read_text())
    runs = results["modes"]
    assert [(m["mode"], m["rate"], m["repeat"]) for m in runs] == [
        ("kv", 3.0, 0),
        ("round-robin", 3.0, 0),
        ("kv", 6.0, 0),
        ("round-robin", 6.0, 0),
    ]
    for m in runs:
        # bursts of 3 every second (rate 3) or half second (rate 6), for 2 s
        assert len(m["records"]) == (6 if m["rate"] == 3.0 else 12)
        o = m["oracle"]
        assert o["requests"] == len(m["records"]) and o["pooled_blocks"] == 2 * 16384
        # Within a burst the 2nd and 3rd requests find the 8-block document: 2 of 3 requests
        # reuse 512 of 528 prompt tokens (plus the chat template's own tokens).
        assert 0.5 < o["pooled_lru_fraction"] == o["infinite_fraction"] < 0.67
        assert o["measured_fraction"] is not None and 0 < o["measured_fraction"] <= o["infinite_fraction"]
        cpu = m["cpu"]
        assert set(cpu["process_cores"]) == {"client", "gateway", "w0", "w1"} and cpu["cpus"] >= 1
        assert 0 <= cpu["machine_busy"] <= 1
    md = (out / "report.md").read_text()
    assert "## Sweep" in md and "goodput" in md and "pooled-LRU oracle" in md
    assert "- kv: 6 req/s" in md and "- round-robin: 6 req/s" in md  # both meet a 5 s SLO at both rates
    assert (out / "sweep.png").read_bytes().startswith(PNG_MAGIC)
    assert all(refused(p) for p in stack_ports(out))


def test_paths_outside_the_repository_are_kept_as_given(tmp_path):
    assert repo_relative(tmp_path / "model") == str(tmp_path / "model")
    assert repo_relative(TINY_MODEL) == "models/kvgate-tiny"
