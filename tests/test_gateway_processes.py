"""The gateway's CPU-cost machinery: the event-loop lag monitor, and ``--processes N`` serving one port."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from kvgate.dev.demo import spawn_workers, stop_workers, wait_healthy
from kvgate.dev.launch import free_port
from kvgate.gateway.__main__ import process_config
from kvgate.gateway.config import GatewayConfig
from kvgate.gateway.metrics import LOOP_BUSY_TICK_SECONDS, LOOP_TICK_SECONDS, GatewayMetrics, LoopLag
from tests.helpers import TINY_MODEL, python_module, wait_http, wait_until
from tests.test_e2e_gateway import get, metric, post


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_loop_lag_monitor_counts_busy_lateness_only_while_the_loop_thread_works() -> None:
    metrics = GatewayMetrics()

    async def scenario() -> str:
        metrics.loop_lag.start()
        try:
            await asyncio.sleep(0.05)
            end = time.thread_time() + 0.06
            while time.thread_time() < end:  # a callback computing for 60 ms of CPU
                pass
            await asyncio.sleep(0.03)
            return metrics.render().decode()
        finally:
            metrics.loop_lag.stop()

    text = asyncio.run(scenario())
    assert 0.045 <= _sample(text, "kvgate_event_loop_max_busy_gap_seconds") < 1.0
    assert _sample(text, "kvgate_event_loop_max_busy_gap_ever_seconds") >= 0.045


def _busy_loop_with_blocks(monitor: LoopLag, seconds: float = 0.4) -> None:
    """Drive ``monitor`` through a synthetic loop timeline, its clocks read exactly: the loop
    computes 0.5 ms callbacks with 0.125 ms idle between them (80 % busy), and every 27 ms one
    is blocked 8 ms without computing (descheduled, say). The monitor's timer fires at the
    first callback boundary at or after it is due, as asyncio's would."""
    now = cpu = 0.0
    monitor.reset(now, cpu)
    due = now + monitor.tick
    next_block = 0.02
    while now < seconds:
        now += 0.0005
        cpu += 0.0005
        if now > next_block:
            next_block += 0.027
            now += 0.008
        now += 0.000125
        if now >= due:
            due = now + monitor.observe(now, cpu)


def test_loop_lag_monitor_busy_with_other_work_does_not_count_it_in_a_gap() -> None:
    monitor = LoopLag()
    _busy_loop_with_blocks(monitor)
    # The 8 ms blocks are seen: a tick due inside one fires at its end, 8 ms less a busy tick late or more.
    assert monitor.max_gap >= 0.008 - LOOP_BUSY_TICK_SECONDS
    # The busy gap is the CPU spent inside a lateness: about a busy tick (2 ms) plus a callback, not the
    # 8 ms the thread was not running.
    assert monitor.max_busy_gap <= LOOP_BUSY_TICK_SECONDS + 0.001
    assert monitor.stalls >= 10  # every block (~14 in 0.4 s) is a stall over 5 ms


def test_loop_lag_monitor_ticks_fast_while_busy_so_earlier_work_is_not_counted() -> None:
    # Ticking every 10 ms whatever the load, the CPU used before a tick was due (up to a whole tick of
    # it) falls inside the bound: the same timeline reads a busy gap of several milliseconds.
    slow = LoopLag(busy_tick=LOOP_TICK_SECONDS)
    _busy_loop_with_blocks(slow)
    fast = LoopLag()
    _busy_loop_with_blocks(fast)
    assert slow.max_busy_gap >= 0.004
    assert fast.max_busy_gap < slow.max_busy_gap / 2


def test_loop_lag_monitor_ticks_slowly_when_the_loop_is_idle() -> None:
    monitor = LoopLag()
    monitor.reset(0.0, 0.0)
    # 10 ms on with 0.1 ms of CPU: idle, so the next tick is a whole tick away, and nothing was late.
    assert monitor.observe(LOOP_TICK_SECONDS, 0.0001) == LOOP_TICK_SECONDS
    assert monitor.max_gap == 0.0
    # The next 10 ms with 5 ms of CPU (over a quarter busy): the monitor ticks every busy tick.
    assert monitor.observe(2 * LOOP_TICK_SECONDS, 0.0051) == LOOP_BUSY_TICK_SECONDS


def test_loop_lag_monitor_sees_a_blocked_loop_and_resets_at_each_scrape() -> None:
    metrics = GatewayMetrics()

    async def scenario() -> tuple[str, str]:
        metrics.loop_lag.start()
        try:
            await asyncio.sleep(0.05)
            time.sleep(0.06)  # the loop blocked for 60 ms: a tick (every 10 ms) comes >= 50 ms late
            await asyncio.sleep(0.03)
            first = metrics.render().decode()
            await asyncio.sleep(0.05)
            return first, metrics.render().decode()
        finally:
            metrics.loop_lag.stop()

    first, second = asyncio.run(scenario())
    assert 0.045 <= _sample(first, "kvgate_event_loop_max_gap_seconds") < 1.0
    # time.sleep blocks without using CPU: the thread was not running, so no busy lateness.
    assert _sample(first, "kvgate_event_loop_max_busy_gap_seconds") < 0.045
    assert _sample(first, "kvgate_event_loop_stalls_total") >= 1
    # The max is since the previous scrape: the quiet 50 ms that followed saw no such stall.
    assert _sample(second, "kvgate_event_loop_max_gap_seconds") < 0.045
    assert _sample(second, "kvgate_event_loop_max_gap_ever_seconds") >= 0.045


_PROBE_SCENARIO = """
import asyncio, time
from kvgate.gateway.metrics import CallbackProbe, GatewayMetrics

def compute(seconds):
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass

async def main():
    loop = asyncio.get_running_loop()
    for _ in range(200):  # a burst of short callbacks, run back to back in one loop pass
        loop.call_soon(compute, 0.0002)
    await asyncio.sleep(0.01)
    burst = CallbackProbe.take_max()
    loop.call_soon(compute, 0.02)  # one callback holding the loop for 20 ms of CPU
    await asyncio.sleep(0.01)
    text = GatewayMetrics().render().decode()
    print(burst, CallbackProbe.slow_callbacks, text)

CallbackProbe.install()
asyncio.run(main())
"""


def test_the_loop_probe_times_one_long_callback_not_a_burst_of_short_ones() -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _PROBE_SCENARIO], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    burst, slow, text = out.split(" ", 2)
    assert float(burst) < 0.004  # 200 callbacks of 0.2 ms: none held the loop long
    assert int(slow) == 1
    assert 0.019 <= _sample(text, "kvgate_event_loop_max_callback_seconds") < 0.5
    assert _sample(text, "kvgate_event_loop_max_callback_ever_seconds") >= 0.019
    assert _sample(text, "kvgate_event_loop_slow_callbacks_total") == 1


def test_each_process_of_a_group_gets_its_own_admin_port_and_bus_id() -> None:
    config = GatewayConfig(port=9000, processes=2, router_id="gw-a")
    one, two = process_config(config, 0), process_config(config, 1)
    assert (one.admin_listen_port, two.admin_listen_port) == (9001, 9002)
    assert (one.router_id, two.router_id) == ("gw-a-0", "gw-a-1")
    assert one.processes == two.processes == 1 and one.port == two.port == 9000
    assert process_config(GatewayConfig(port=9000, processes=2, admin_on_public_port=True), 1).admin_port is None
    with pytest.raises(ValueError, match="processes"):
        GatewayConfig(port=0, processes=2)


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.slow
def test_two_processes_share_the_port_and_stop_together(tmp_path: Path) -> None:
    workers = spawn_workers(1, str(TINY_MODEL), 64, 4096, tmp_path, ["--speedup-ratio", "1000"])
    gateway = None
    try:
        wait_healthy(workers)
        w = workers[0]
        port, admin = free_port(), free_port()
        while admin + 1 == port or not _free(admin + 1):
            admin = free_port()
        gateway = python_module(
            "kvgate.gateway",
            "--port",
            port,
            "--admin-port",
            admin,
            "--processes",
            2,
            "--loop-probe",
            f"--worker=url={w.url},id=w0,kv_events_endpoint=tcp://127.0.0.1:{w.events_port},"
            f"kv_events_replay_endpoint=tcp://127.0.0.1:{w.replay_port}",
            log_path=tmp_path / "gateway.log",
        )
        for p in (port, admin, admin + 1):
            wait_http(f"http://127.0.0.1:{p}/health", timeout=90, proc=gateway)
        children = _children(gateway.popen.pid)
        assert len(children) == 2
        body = {"model": "kvgate-tiny", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 4}
        for _ in range(20):
            status, headers, _ = post(f"http://127.0.0.1:{port}/v1/chat/completions", body)
            assert status == 200 and headers["x-kvgate-worker"] == "w0"
        # Each process counts its own requests, on its own admin port: together, all of them.
        pages = [get(f"http://127.0.0.1:{p}/metrics")[2].decode() for p in (admin, admin + 1)]
        served = [metric(page, "kvgate_requests_total", status="200") for page in pages]
        assert sum(served) == 20 and all(served), served  # the kernel spread the connections over both
        # --loop-probe reached each process: every callback it ran was timed.
        assert all(0 < _sample(page, "kvgate_event_loop_max_callback_ever_seconds") < 5 for page in pages)
        gateway.popen.send_signal(signal.SIGTERM)
        gateway.popen.wait(timeout=30)
        assert gateway.popen.returncode == 0, gateway.log()
        wait_until(lambda: not any(_alive(c) for c in children), what="processes stopped", timeout=10)
    finally:
        if gateway is not None:
            gateway.stop()
        stop_workers(workers)


def _free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
