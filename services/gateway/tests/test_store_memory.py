"""The store's memory gauges and the warning before it fills, against a real valkey-server."""

import asyncio
import contextlib
import logging

import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from services.gateway.store_memory import watch_store_memory


async def readings(client: aioredis.Redis) -> None:
    watcher = asyncio.create_task(watch_store_memory(client, every_s=0.01))
    await asyncio.sleep(0.2)
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher


async def test_gauges_follow_the_store_and_a_nearly_full_store_is_reported_once(store_url, caplog):
    client = aioredis.Redis.from_url(store_url)
    cap_before = (await client.config_get("maxmemory"))["maxmemory"]
    try:
        used = int((await client.info("memory"))["used_memory"])
        await client.config_set("maxmemory", str(int(used / 0.95)))  # 95% full
        with caplog.at_level(logging.WARNING, logger="services.gateway.store_memory"):
            await readings(client)
        assert REGISTRY.get_sample_value("tiermesh_store_maxmemory_bytes") == int(used / 0.95)
        assert 0.5 * used < REGISTRY.get_sample_value("tiermesh_store_used_memory_bytes") < 2 * used
        warnings = [r.getMessage() for r in caplog.records if "STORE_MAXMEMORY" in r.getMessage()]
        assert len(warnings) == 1, warnings  # many readings, one warning per crossing

        caplog.clear()
        await client.config_set("maxmemory", str(used * 4))
        with caplog.at_level(logging.WARNING, logger="services.gateway.store_memory"):
            await readings(client)
        assert not caplog.records
    finally:
        await client.config_set("maxmemory", cap_before)
        await client.aclose()


async def test_a_store_outage_only_skips_readings():
    client = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    await readings(client)  # no exception escapes the watcher while the store is away
    await client.aclose()


async def test_the_watcher_stops_when_cancelled_inside_a_store_call(store_url):
    """redis-py can swallow a cancellation that lands inside one of its calls; the watcher must
    stop anyway, or whoever awaits it (a test, a shutdown) waits forever."""
    client = aioredis.Redis.from_url(store_url)
    try:
        for _ in range(150):
            watcher = asyncio.create_task(watch_store_memory(client, every_s=0.0005))
            await asyncio.sleep(0.004)
            watcher.cancel()
            done, _ = await asyncio.wait({watcher}, timeout=2)
            assert done == {watcher} and watcher.cancelled()
    finally:
        await client.aclose()
