"""The pure parts of ``python -m kvgate.loadtest.dynamo`` (kvgate beside Dynamo).

Nothing here needs Dynamo installed or starts a process: ``/proc`` stat parsing and
process-tree CPU sums, request generation (same prompts for both front ends, Dynamo's
prefix-ratio shape), summaries, ratios, the markdown table and argument parsing.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
from pathlib import Path

import numpy as np
import pytest

from kvgate.loadtest import dynamo
from kvgate.loadtest.corpus import Vocabulary
from kvgate.loadtest.stream import RequestRecord


def stat_line(pid: int, comm: str, ppid: int, utime: int, stime: int) -> str:
    # Fields 3.. of proc(5): state ppid pgrp session tty_nr tpgid flags minflt cminflt majflt cmajflt utime stime ...
    rest = ["S", ppid, pid, pid, 0, -1, 4194560, 10, 0, 0, 0, utime, stime, 0, 0, 20, 0, 1, 0, 100]
    return f"{pid} ({comm}) " + " ".join(str(x) for x in rest) + "\n"


def test_stat_fields_reads_ppid_utime_stime():
    assert dynamo.stat_fields(stat_line(42, "python", 7, 1234, 56)) == (7, 1234, 56)


def test_stat_fields_survives_spaces_and_parentheses_in_the_command_name():
    assert dynamo.stat_fields(stat_line(42, "tokio ) (worker 1)", 7, 300, 20)) == (7, 300, 20)


def test_stat_fields_of_this_process_match_os_times():
    text = Path("/proc/self/stat").read_text()
    ppid, utime, stime = dynamo.stat_fields(text)
    assert ppid == os.getppid()
    times = os.times()
    tick = os.sysconf("SC_CLK_TCK")
    # The kernel's tick counts and os.times() read the same clock a moment apart.
    assert abs(utime / tick - times.user) < 0.5
    assert abs(stime / tick - times.system) < 0.5


def test_tree_ticks_sums_the_root_and_its_descendants_only():
    stats = {
        10: stat_line(10, "frontend", 1, 100, 10),
        11: stat_line(11, "helper", 10, 5, 5),
        12: stat_line(12, "grandchild", 11, 1, 1),
        20: stat_line(20, "other", 1, 999, 999),
        21: stat_line(21, "other child", 20, 7, 7),
    }
    assert dynamo.tree_ticks(10, stats) == 100 + 10 + 5 + 5 + 1 + 1
    assert dynamo.tree_ticks(11, stats) == 12
    assert dynamo.tree_ticks(99, stats) == 0


def test_cpu_seconds_of_this_process_grows_with_work():
    before = dynamo.cpu_seconds(os.getpid())
    deadline = os.times().user + 0.15
    while os.times().user < deadline:
        sum(i * i for i in range(1000))
    assert dynamo.cpu_seconds(os.getpid()) - before >= 0.05


@pytest.fixture(scope="module")
def vocabulary() -> Vocabulary:
    # Generation only joins words; a tokenizer's calibration (tested in test_loadtest_workloads) is not needed.
    return Vocabulary(tuple(f" w{a}{b}" for a in "abcdefgh" for b in "abcdefgh"))


def small_config(**kw: object) -> dynamo.BenchConfig:
    base: dict[str, object] = dict(
        requests=10, c1_requests=3, workers=2, first_turn_tokens=100, turn_tokens=10, turns=3, max_tokens=5
    )
    base.update(kw)
    return dynamo.BenchConfig(**base)  # type: ignore[arg-type]


def test_multi_turn_streams_are_conversations_with_fixed_assistant_turns(vocabulary):
    config = small_config()
    streams = dynamo.multi_turn_streams(vocabulary, config, "m", users=2, total=7, seed=0)
    assert [len(s) for s in streams] == [4, 3]
    first, second, third, fourth = streams[0]
    # Every turn extends the previous prompt by the assistant turn and a new user turn.
    assert second.body["messages"][:2] == first.body["messages"]
    assert [m["role"] for m in second.body["messages"]] == ["system", "user", "assistant", "user"]
    assert len(second.body["messages"][2]["content"].split()) == config.max_tokens
    assert third.body["messages"][:4] == second.body["messages"]
    # After `turns` requests a new conversation starts.
    assert len(fourth.body["messages"]) == 2 and fourth.body["messages"][1] != first.body["messages"][1]
    again = dynamo.multi_turn_streams(vocabulary, config, "m", users=2, total=7, seed=0)
    assert [[s.body for s in u] for u in again] == [[s.body for s in u] for u in streams]
    assert all(s.body["stream"] and s.body["stream_options"] == {"include_usage": True} for s in streams[0])


def test_the_direct_phase_keeps_conversations_on_a_worker_and_spreads_new_ones(vocabulary):
    config = small_config()  # conversations of `turns` turns
    urls = ["http://w0", "http://w1", "http://w2"]
    place = dynamo.spread(urls)
    (stream,) = dynamo.multi_turn_streams(vocabulary, config, "m", users=1, total=3 * config.turns, seed=0)
    placed = [place(spec) for spec in stream]
    # One worker per conversation, the next one for each new conversation.
    assert placed == [url for url in urls for _ in range(config.turns)]
    # Single prompts are each a new conversation: the next worker every time.
    place = dynamo.spread(urls)
    (prompts,) = dynamo.long_prompt_streams(vocabulary, config, "m", users=1, total=4, seed=0)
    assert [place(spec) for spec in prompts] == [*urls, urls[0]]


def test_long_prompt_streams_are_fresh_single_messages_of_the_given_length(vocabulary):
    config = small_config(long_prompt_tokens=300)
    streams = dynamo.long_prompt_streams(vocabulary, config, "m", users=3, total=7, seed=0)
    assert [len(s) for s in streams] == [3, 2, 2]
    specs = [s for stream in streams for s in stream]
    texts = [s.body["messages"][0]["content"] for s in specs]
    assert all(len(s.body["messages"]) == 1 and s.body["messages"][0]["role"] == "user" for s in specs)
    assert all(len(t.split()) == 300 for t in texts)
    assert len(set(texts)) == 7


def test_prefix_ratio_streams_have_dynamos_shape(vocabulary):
    config = small_config(isl=400, prefix_ratio=0.5, num_prefix_prompts=4, osl=40)
    streams = dynamo.prefix_ratio_streams(vocabulary, config, "m", users=5, total=200, seed=3)
    specs = [s for stream in streams for s in stream]
    assert len(specs) == 200 and [len(s) for s in streams] == [40] * 5
    words = [s.body["messages"][0]["content"].split(" ")[1:] for s in specs]
    prefixes = {tuple(w[:200]) for w in words}
    assert len(prefixes) == 4  # every prompt starts with one of the shared prefixes, all of them used
    suffix_lengths = [len(w) - 200 for w in words]
    assert 170 < statistics.mean(suffix_lengths) < 230  # mean isl * (1 - ratio) = 200
    assert 30 < statistics.stdev(suffix_lengths) < 70  # standard deviation a quarter of it
    outputs = [s.body["max_tokens"] for s in specs]
    assert 34 < statistics.mean(outputs) < 46 and min(outputs) >= 1
    assert len({tuple(w[200:]) for w in words}) == 200  # suffixes are fresh


def test_build_phases_uses_separate_prompts_per_phase_and_the_load_concurrency(vocabulary):
    phases = dynamo.build_phases(vocabulary, small_config(long_prompt_tokens=50), "long-prompt", "m")
    assert len(phases.c1) == 1 and len(phases.direct) == 1 and len(phases.load) == 2
    texts = [[s.body["messages"][0]["content"] for s in p[0]] for p in (phases.c1, phases.direct, phases.load)]
    assert not set(texts[0]) & set(texts[1]) and not set(texts[0]) & set(texts[2])
    prefix = dynamo.build_phases(vocabulary, small_config(isl=100), "prefix-ratio", "m")
    assert len(prefix.load) == 10  # Dynamo's concurrency 20, capped at the 10 requests: 10 streams of 1
    assert small_config().load_concurrency("prefix-ratio") == 20
    assert small_config(concurrency=3).load_concurrency("prefix-ratio") == 3
    assert small_config().load_concurrency("multi-turn") == 2


def test_percentile_matches_numpy():
    rng = random.Random(1)
    values = [rng.uniform(0, 100) for _ in range(37)]
    for q in (0, 50, 90, 99, 100):
        assert dynamo.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert dynamo.percentile([], 50) is None


def record(ttft: float | None, prompt: int = 100, cached: int | None = 50, error: str | None = None) -> RequestRecord:
    return RequestRecord(
        "w", 0, 0, 0.0, status=200, error=error, ttft_s=ttft, e2e_s=(ttft or 0) * 2, prompt_tokens=prompt,
        completion_tokens=4, cached_tokens=cached,
    )  # fmt: skip


def test_summarize_records_counts_errors_and_cached_fraction_over_successes():
    records = [record(0.010, 100, 50), record(0.030, 300, 300), record(None, error="boom"), record(0.020, 100, None)]
    s = dynamo.summarize_records(records)
    assert s["requests"] == 4 and s["errors"] == 1 and s["first_error"] == "boom"
    assert s["ttft_p50_ms"] == pytest.approx(20.0)
    assert s["e2e_p50_ms"] == pytest.approx(40.0)
    assert s["cached_fraction"] == pytest.approx(350 / 400)  # the request without usage details is left out
    assert s["prompt_tokens_mean"] == pytest.approx(500 / 3)


def test_ratio_and_run_figures():
    assert dynamo.ratio(3.0, 2.0) == 1.5
    assert dynamo.ratio(None, 2.0) is None and dynamo.ratio(1.0, 0.0) is None
    run = dynamo.RunResult("multi-turn", 1.0, "kvgate", "kv", cpu_s=0.6, requests_through_front_end=300)
    run.c1 = {"ttft_p50_ms": 25.0}
    run.direct = {"ttft_p50_ms": 20.0}
    assert run.cpu_ms_per_request == pytest.approx(2.0)
    assert run.added_ttft_ms == pytest.approx(5.0)
    assert dynamo.RunResult("x", 1.0, "dynamo", "kv").cpu_ms_per_request is None
    assert dynamo.RunResult("x", 1.0, "dynamo", "kv").added_ttft_ms is None


def pair(workload: str = "multi-turn") -> list[dynamo.RunResult]:
    runs = []
    for front_end, cpu, ttft, cached in (("dynamo", 0.3, 40.0, 0.5), ("kvgate", 0.6, 20.0, 0.75)):
        run = dynamo.RunResult(workload, 1000.0, front_end, "kv", cpu_s=cpu, requests_through_front_end=100)
        summary = {"requests": 90, "errors": 0, "ttft_p50_ms": ttft, "ttft_p99_ms": ttft * 2, "cached_fraction": cached}
        run.c1 = {**summary, "requests": 10}
        run.load = summary
        runs.append(run)
    runs[1].direct = {"ttft_p50_ms": 15.0}
    runs[1].loop_metrics = {"kvgate_event_loop_max_gap_seconds": 0.012, "kvgate_event_loop_stalls_total": 3.0}
    return runs


def test_comparisons_divide_kvgate_by_dynamo_per_cell():
    runs = pair() + [dynamo.RunResult("long-prompt", 1000.0, "kvgate", "kv")]  # no Dynamo run: no comparison
    (c,) = dynamo.comparisons(runs)
    r = c["kvgate_over_dynamo"]
    assert (c["workload"], c["speedup_ratio"], c["mode"]) == ("multi-turn", 1000.0, "kv")
    assert r["cpu_ms_per_request"] == pytest.approx(2.0)
    assert r["load.ttft_p50_ms"] == pytest.approx(0.5)
    assert r["load.cached_fraction"] == pytest.approx(1.5)
    assert r["load.e2e_p50_ms"] is None


def test_markdown_has_a_row_per_front_end_the_ratios_and_the_loop_metric():
    text = dynamo.markdown(pair(), ["a note"])
    assert "- a note" in text and "## multi-turn, speedup ratio 1000" in text
    rows = [line for line in text.splitlines() if line.startswith("| dynamo") or line.startswith("| kvgate")]
    assert len(rows) == 2
    kv_row = rows[1].split(" | ")
    assert kv_row[2] == "100" and kv_row[4] == "6.00" and kv_row[11] == "75.0%" and kv_row[12].startswith("5.00")
    assert "kvgate / Dynamo (kv): CPU ms/req 2.00, TTFT p50 c=1 0.50" in text
    assert "kvgate kv event loop and heads: max_gap_seconds 12.0 ms, stalls_total 3" in text


def test_loop_samples_picks_metric_names_containing_loop():
    text = (
        "# HELP kvgate_event_loop_lag_seconds worst gap\n"
        "kvgate_event_loop_lag_seconds_max 0.25\n"
        'kvgate_requests_total{path="/loop"} 3\n'
        "process_cpu_seconds_total 1.5\n"
    )
    assert dynamo.loop_samples(text) == {"kvgate_event_loop_lag_seconds_max": 0.25}


def test_stage_means_are_sum_over_count_per_stage_in_ms():
    text = (
        'kvgate_routing_overhead_seconds_bucket{le="0.001",stage="forward"} 3.0\n'
        'kvgate_routing_overhead_seconds_count{stage="forward"} 4.0\n'
        'kvgate_routing_overhead_seconds_sum{stage="forward"} 0.01\n'
        'kvgate_routing_overhead_seconds_count{stage="hash"} 4.0\n'
        'kvgate_routing_overhead_seconds_sum{stage="hash"} 0.0002\n'
        'kvgate_routing_overhead_seconds_count{stage="match"} 0.0\n'
        'kvgate_routing_overhead_seconds_sum{stage="match"} 0.0\n'
    )
    assert dynamo.stage_means(text) == pytest.approx({"forward": 2.5, "hash": 0.05})


def test_parse_config_defaults_and_lists():
    c = dynamo.parse_config([])
    assert c.workloads == ("multi-turn",) and c.requests == 300 and c.workers == 4
    assert c.speedup_ratios == (1000.0, 1.0) and c.modes == ("kv",) and c.front_ends == ("dynamo", "kvgate")
    assert (c.num_gpu_blocks, c.max_num_batched_tokens, c.block_size) == (16384, 8192, 64)
    assert c.loop_probe is False
    c = dynamo.parse_config(
        ["--workload", "multi-turn,prefix-ratio", "--requests", "60", "--modes", "kv,round-robin",
         "--speedup-ratios", "0.5", "--front-ends", "kvgate", "--no-direct", "--out", "x", "--loop-probe"]
    )  # fmt: skip
    assert c.loop_probe is True and any("--loop-probe" in note for note in dynamo.notes(c))
    assert c.workloads == ("multi-turn", "prefix-ratio") and c.requests == 60
    assert c.modes == ("kv", "round-robin") and c.speedup_ratios == (0.5,) and c.front_ends == ("kvgate",)
    assert c.direct is False and c.out == Path("x")


@pytest.mark.parametrize(
    "argv",
    [
        ["--workload", "trace"],
        ["--modes", "random"],
        ["--requests", "0"],
        ["--prefix-ratio", "1.5"],
        ["--speedup-ratios", "0"],
    ],
)
def test_parse_config_refuses_bad_values(argv, capsys):
    with pytest.raises(SystemExit):
        dynamo.parse_config(argv)


def test_write_model_files_adds_a_chat_template_beside_the_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError):
        dynamo.write_model_files(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    dynamo.write_model_files(tmp_path)
    import json

    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["chat_template"] == dynamo.CHAT_TEMPLATE and config["bos_token"] == "<｜begin▁of▁sentence｜>"
    assert json.loads((tmp_path / "config.json").read_text())["max_position_embeddings"] == 32768


def test_the_chat_template_renders_deepseek_v3_turns():
    jinja2 = pytest.importorskip("jinja2")
    text = (
        jinja2.Environment()
        .from_string(dynamo.CHAT_TEMPLATE)
        .render(
            bos_token="<B>",
            add_generation_prompt=True,
            messages=[
                {"role": "system", "content": "S"},
                {"role": "user", "content": "U1"},
                {"role": "assistant", "content": "A1"},
                {"role": "user", "content": "U2"},
            ],
        )
    )
    assert text == "<B>S<｜User｜>U1<｜Assistant｜>A1<｜end▁of▁sentence｜><｜User｜>U2<｜Assistant｜>"


def test_the_added_ttft_is_the_median_of_paired_differences():
    run = dynamo.RunResult("long-prompt", 1.0, "kvgate", "kv")
    run.c1, run.direct = {"ttft_p50_ms": 40.0}, {"ttft_p50_ms": 20.0}
    assert run.added_ttft_ms == pytest.approx(20.0)  # no pairs: the two phases' p50s
    run.paired_ttft_diffs_ms = [3.0, -1.0, 2.0, 50.0, 1.5]
    assert run.added_ttft_ms == pytest.approx(2.0)
    assert run.to_json()["added_ttft_ms"] == pytest.approx(2.0)


async def test_pairs_alternate_their_first_request_and_give_the_ttft_differences():
    """Two real SSE servers over loopback, one answering 30 ms slower: each pair's difference is about 30 ms,
    and the side sent first alternates from pair to pair."""
    from aiohttp import web

    from kvgate.dev.launch import free_port
    from kvgate.loadtest.workloads import RequestSpec

    arrivals: list[str] = []

    def app(name: str, delay: float) -> web.Application:
        async def chat(request: web.Request) -> web.StreamResponse:
            arrivals.append(name)
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await resp.prepare(request)
            await asyncio.sleep(delay)
            chunk = {"choices": [{"index": 0, "delta": {"content": "hi"}}]}
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n")
            return resp

        a = web.Application()
        a.router.add_post("/v1/chat/completions", chat)
        return a

    runners, urls = [], {}
    for name, delay in (("worker", 0.01), ("gateway", 0.04)):
        runner = web.AppRunner(app(name, delay))
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        urls[name] = f"http://127.0.0.1:{port}"
    try:
        spec = RequestSpec("long-prompt", "/v1/chat/completions", {"messages": [], "stream": True})
        direct, through, diffs = await dynamo.drive_pairs(
            lambda s: urls["worker"], urls["gateway"], [spec] * 4, [spec] * 4
        )
    finally:
        for runner in runners:
            await runner.cleanup()
    assert arrivals == ["worker", "gateway", "gateway", "worker"] * 2
    assert len(direct) == len(through) == len(diffs) == 4
    assert all(r.ok for r in direct + through)
    assert all(20 < d < 60 for d in diffs), diffs
