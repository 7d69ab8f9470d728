"""The store's memory as gauges, and a warning before it fills.

The mesh's store refuses writes once it reaches `maxmemory` (`noeviction`: nothing is silently
dropped). New keys, feedback and rate-limit counters then fail, so an operator needs to see it
coming: the gateway reads `INFO memory` every `every_s` seconds into two gauges and logs a warning
when the store passes `WARN_AT` of its cap (once per crossing).
"""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis
from prometheus_client import Gauge

from tiermesh.kit.cancellation import raise_if_cancelled

logger = logging.getLogger(__name__)

STORE_USED = Gauge("tiermesh_store_used_memory_bytes", "memory the store uses (its INFO used_memory)")
STORE_MAX = Gauge(
    "tiermesh_store_maxmemory_bytes", "the store's memory cap (0: none); writes fail beyond it (noeviction)"
)
WARN_AT = 0.9


async def watch_store_memory(store: aioredis.Redis, every_s: float = 15.0) -> None:
    """Keep the gauges current until cancelled; a store outage only skips readings."""
    warned = False
    while True:
        try:
            memory = await store.info("memory")
        except (aioredis.RedisError, OSError):
            memory = None
        raise_if_cancelled()  # redis-py may have swallowed a cancellation: stop when asked
        if memory is not None:
            used, cap = int(memory["used_memory"]), int(memory.get("maxmemory", 0))
            STORE_USED.set(used)
            STORE_MAX.set(cap)
            full = cap > 0 and used >= WARN_AT * cap
            if full and not warned:
                logger.warning(
                    "the store uses %.0f MiB of its %.0f MiB cap: writes (new keys, feedback, rate "
                    "limits) fail when it is full; raise STORE_MAXMEMORY or lower retention",
                    used / 2**20,
                    cap / 2**20,
                )
            warned = full
        await asyncio.sleep(every_s)
