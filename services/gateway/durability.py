"""Writes the gateway acknowledges only once they are on disk: API keys, revocations, feedback.

The mesh's store appends every write to its append-only file and fsyncs it once a second; a crash
can lose that last second. For writes that must never be lost once acknowledged, the gateway sends
`WAITAOF 1 0` on the connection that wrote them, in the same pipeline: the store answers once the
write is fsynced. A store without an append-only file (a `REDIS_URL` of your own) cannot promise
that; the write still happens and a warning says once what is at risk.
"""

from __future__ import annotations

import logging
from typing import Any

import redis.asyncio as aioredis

logger = logging.getLogger(__name__)

WAITAOF_TIMEOUT_MS = 2_000
_warned = False


class NotDurable(RuntimeError):
    """The store took the write but could not fsync it in time: it is not acknowledged."""


def wait_for_disk(pipe: aioredis.client.Pipeline) -> None:
    """Queue `WAITAOF 1 0` behind the writes already queued on `pipe`."""
    pipe.execute_command("WAITAOF", 1, 0, WAITAOF_TIMEOUT_MS)


async def execute_durably(pipe: aioredis.client.Pipeline, what: str) -> list[Any]:
    """Run `pipe` (whose last command is `wait_for_disk`'s) and check the fsync; returns the
    results of the commands before it."""
    global _warned
    results = await pipe.execute(raise_on_error=False)
    *written, synced = results
    for result in written:
        if isinstance(result, Exception):
            raise result
    if isinstance(synced, aioredis.ResponseError) and "appendonly is disabled" in str(synced):
        if not _warned:
            logger.warning("the store has no append-only file: %s can be lost to a store crash", what)
            _warned = True
        return written
    if isinstance(synced, Exception):
        raise synced
    if int(synced[0]) < 1:
        raise NotDurable(f"store: {what} was not written to disk within {WAITAOF_TIMEOUT_MS} ms")
    return written
