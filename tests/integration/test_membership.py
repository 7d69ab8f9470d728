"""A replica's registry entry against a real store: written once SERVING, kept alive by refreshes,
deleted at once on NOT_SERVING, and expiring by itself when the replica stops refreshing it (it
died, or its host lost the network)."""

import asyncio
import json

import redis.asyncio as aioredis

from tiermesh.kit.membership import Membership, replica_key

ENTRY = {"tier": "retriever", "arm": "control", "grpc": "10.0.0.11:50061"}
KEY = replica_key("retriever", "control", "10.0.0.11:50061")


async def test_an_entry_lives_while_serving_and_refreshed_and_goes_on_not_serving(store_url):
    store = aioredis.Redis.from_url(store_url)
    member = Membership(store_url, dict(ENTRY), ttl_s=0.6)
    member.start()
    try:
        assert await store.get(KEY) is None  # not SERVING yet
        await member.set_serving(True)
        assert json.loads(await store.get(KEY)) == ENTRY
        await asyncio.sleep(1.5)  # well past the TTL: the refreshes keep it
        assert await store.exists(KEY)
        await member.set_serving(False)
        assert not await store.exists(KEY)
        await asyncio.sleep(0.5)  # and no refresh brings it back
        assert not await store.exists(KEY)
    finally:
        await member.close()
        await store.aclose()


async def test_an_entry_no_longer_refreshed_expires_by_itself(store_url):
    store = aioredis.Redis.from_url(store_url)
    member = Membership(store_url, dict(ENTRY), ttl_s=0.6)
    member.start()
    await member.set_serving(True)
    member._task.cancel()  # the replica froze or was cut off: no refresh, no goodbye
    try:
        assert await store.exists(KEY)
        await asyncio.sleep(1.0)
        assert not await store.exists(KEY)
    finally:
        await member.client.aclose()
        await store.aclose()


async def test_an_unreachable_store_is_logged_not_raised():
    member = Membership("redis://127.0.0.1:1/0", dict(ENTRY), ttl_s=0.6)
    member.start()
    await member.set_serving(True)  # no store: logged, no exception
    await member.close()


async def test_closing_stops_the_refreshes_even_when_cancelled_inside_a_store_call(store_url):
    """redis-py can swallow a cancellation that lands inside one of its calls: close() must
    still end the refresh task, or a draining replica never exits."""
    for _ in range(40):
        member = Membership(store_url, dict(ENTRY), ttl_s=0.003)  # a refresh every millisecond
        member.start()
        await member.set_serving(True)
        await asyncio.sleep(0.01)
        closing = asyncio.create_task(member.close())
        done, _ = await asyncio.wait({closing}, timeout=3)
        assert done == {closing} and member._task.cancelled(), "close() did not end the refreshes"
