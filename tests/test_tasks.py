"""cancel_and_wait: a stop ends its tasks even when one drops its first cancellation."""

from __future__ import annotations

import asyncio

import pytest

from kvgate.tasks import cancel_and_wait


async def _drops_one_cancel(started: asyncio.Event, dropped: list[bool]) -> None:
    started.set()
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        dropped.append(True)  # as asyncio.wait_for on 3.11 or aetcd's watcher shutdown can
    await asyncio.sleep(3600)


async def test_a_task_that_drops_a_cancellation_is_cancelled_again():
    started, dropped = asyncio.Event(), []
    task = asyncio.get_running_loop().create_task(_drops_one_cancel(started, dropped))
    await started.wait()
    await asyncio.wait_for(cancel_and_wait(task, recancel=0.05), 5)
    assert dropped == [True] and task.cancelled()
    # A single cancel, the old way, leaves such a task running.
    started, dropped = asyncio.Event(), []
    task = asyncio.get_running_loop().create_task(_drops_one_cancel(started, dropped))
    await started.wait()
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=0.2)
    assert not done and dropped == [True]
    await cancel_and_wait(task)
    assert task.cancelled()


async def test_ended_tasks_and_errors_are_quiet_and_none_is_skipped():
    async def fails() -> None:
        raise ValueError("boom")

    loop = asyncio.get_running_loop()
    failed = loop.create_task(fails())
    finished = loop.create_task(asyncio.sleep(0))
    await asyncio.sleep(0.01)
    sleeper = loop.create_task(asyncio.sleep(3600))
    await cancel_and_wait(failed, None, finished, sleeper)
    assert failed.done() and not failed.cancelled() and finished.done() and sleeper.cancelled()
    with pytest.raises(ValueError):
        failed.result()
    await cancel_and_wait()
