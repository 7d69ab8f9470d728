"""Cancellation that a library call swallowed, brought back."""

from __future__ import annotations

import asyncio


def raise_if_cancelled() -> None:
    """Re-raise a cancellation of this task that a library call swallowed.

    redis-py can absorb the CancelledError of a task cancelled inside one of its calls (returning
    normally or raising a connection error); a loop around such calls would then never stop, and
    whoever awaits the cancelled task waits forever. Call this after each such call:
    `Task.cancelling()` still counts the request.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
