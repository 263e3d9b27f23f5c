"""Stopping background tasks for good.

One ``Task.cancel()`` does not always stop a task on Python 3.11. ``asyncio.wait_for``
returns the inner result, and drops the cancellation, when both land in the same step
of the loop (aetcd waits for a watch to be created that way); aetcd's watcher shutdown
catches ``CancelledError`` while it waits for its stream task. A task whose
cancellation was dropped runs on (a stopped etcd discovery watching again), and a stop
that awaits it waits forever. ``cancel_and_wait`` cancels again while a task runs on.
"""

from __future__ import annotations

import asyncio
from typing import Any

#: How long a cancelled task has to end before it is cancelled again. Long enough for
#: the cleanup in its ``finally`` (closing a client) in all but a stuck case.
RECANCEL_SECONDS = 1.0


async def cancel_and_wait(*tasks: asyncio.Task[Any] | None, recancel: float = RECANCEL_SECONDS) -> None:
    """Cancel ``tasks`` (``None`` skipped) and return once every one has ended.

    What the tasks ended with (cancelled, an error, a result) is theirs: they were being
    stopped, so errors are retrieved, not raised.
    """
    pending = {task for task in tasks if task is not None and not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=recancel)
    for ended in tasks:
        if ended is not None and not ended.cancelled():
            ended.exception()
