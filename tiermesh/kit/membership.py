"""A replica's entry in the mesh's registry of live replicas, which the xDS control plane serves
to Envoy as endpoints.

While the replica is SERVING it keeps one key in the store alive,
`tiermesh:replica:<tier>:<arm>:<address>`, whose value says where it answers (its gRPC address
and, for the gateway, its REST address), refreshing it every third of `TIERMESH_REGISTRY_TTL_S`.
The store expires the key that long after the last refresh, so a replica that dies, hangs or loses
its host's network leaves the list by itself, whatever host it runs on; NOT_SERVING (draining on
SIGTERM, an engine failure) deletes it at once. While the store is unreachable the replica keeps
serving and logs it once; its key comes back with the store.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from tiermesh.kit.cancellation import raise_if_cancelled
from tiermesh.kit.config import setting

logger = logging.getLogger(__name__)

REPLICA_KEY_PREFIX = "tiermesh:replica:"


@dataclass(frozen=True)
class MembershipConfig:
    """Where a replica registers (read with the `TIERMESH_` prefix; the runner sets them)."""

    registry_url: str = setting(
        "REGISTRY_URL", "", help="redis:// URL of the store replicas register in while SERVING (empty: none)"
    )
    registry_ttl_s: float = setting(
        "REGISTRY_TTL_S",
        3.0,
        help="seconds a replica stays registered after its last refresh",
        min=0.5,
        max=600,
    )
    advertise_host: str = setting(
        "ADVERTISE_HOST", "", help="the address other hosts reach this replica at (empty: the tier's HOST)"
    )


def replica_key(tier: str, arm: str, address: str) -> str:
    return f"{REPLICA_KEY_PREFIX}{tier}:{arm}:{address}"


class Membership:
    """Keeps one replica's registry key alive while it is SERVING (see the module's docstring)."""

    def __init__(self, url: str, entry: dict[str, Any], *, ttl_s: float) -> None:
        self.client = aioredis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        self.entry = entry
        self.key = replica_key(entry["tier"], entry["arm"], entry["grpc"])
        self.ttl_ms = int(ttl_s * 1000)
        self.serving = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._failing = False
        # a refresh in flight must not write the key back after NOT_SERVING deleted it
        self._lock = asyncio.Lock()

    def start(self) -> None:
        self._task = asyncio.create_task(self._refresh())

    async def set_serving(self, serving: bool) -> None:
        """Registered from now on (refreshed), or taken out of the registry at once."""
        if serving:
            self.serving.set()
            await self._write()
            return
        self.serving.clear()
        await self._delete()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})  # its end, not its CancelledError
        await self._delete()
        await self.client.aclose()

    async def _refresh(self) -> None:
        while True:
            await self.serving.wait()
            await self._write()
            await asyncio.sleep(self.ttl_ms / 3000)

    async def _write(self) -> None:
        async with self._lock:
            if self.serving.is_set():
                await self._call(self.client.set(self.key, json.dumps(self.entry), px=self.ttl_ms))

    async def _delete(self) -> None:
        async with self._lock:
            await self._call(self.client.delete(self.key))

    async def _call(self, command: Any) -> None:
        try:
            await command
        except (aioredis.RedisError, OSError) as error:
            raise_if_cancelled()
            if not self._failing:
                logger.warning("registry: cannot reach the store (%s); still serving, retrying", error)
            self._failing = True
            return
        raise_if_cancelled()  # redis-py may have swallowed a cancellation: stop when asked
        if self._failing:
            logger.info("registry: %s registered again", self.key)
        self._failing = False
