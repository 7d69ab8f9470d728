"""Zero-downtime version changes: announce a new `latest` on Redis pub/sub, follow it in every replica.

Publishing moves the registry's `latest` pointer (atomic) and then `announce`s it on the channel
`tiermesh:latest:<name>`. A tier keeps a `Follower` that, on every announcement and on a periodic
check, compares the registry's `latest` with what it serves and, if they differ, calls the tier's
`load` in the background. The tier builds and checks the new version beside the old one and swaps
one reference; in-flight requests finish on the old version. A failed load is logged and counted,
the old version keeps serving, and the same version is not retried until `latest` moves again or
the retry interval passes. The registry is the truth and the message only a wake-up, so a replica
that started late or missed a message (store down) converges on its next check.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar

import redis
import redis.asyncio as aioredis

from tiermesh.kit import metrics
from tiermesh.kit.cancellation import raise_if_cancelled
from tiermesh.kit.errors import InvalidArgument, Unavailable
from tiermesh.kit.registry import ModelVersion, Registry, RegistryError

logger = logging.getLogger(__name__)

CHANNEL_PREFIX = "tiermesh:latest:"


def channel(name: str) -> str:
    return CHANNEL_PREFIX + name


def announce(store_url: str, version: ModelVersion) -> int:
    """Tell every follower of `version.name` that `latest` moved; returns how many listened."""
    message = json.dumps({"name": version.name, "version": version.version, "digest": version.digest})
    client = redis.Redis.from_url(store_url, socket_timeout=2, socket_connect_timeout=2)
    try:
        return int(client.publish(channel(version.name), message))
    finally:
        client.close()


def announce_latest(store_url: str | None, version: ModelVersion, progress: Callable[[str], None]) -> None:
    """`announce` for operator commands: a store that is down only delays the switch, so report it."""
    if not store_url:
        progress(
            f"{version.name}: latest -> {version.version}; no store configured: "
            "replicas switch at their next check"
        )
        return
    try:
        listeners = announce(store_url, version)
    except (OSError, redis.RedisError) as error:
        progress(
            f"{version.name}: latest -> {version.version}; announcing on {store_url} failed ({error}): "
            "replicas switch at their next check"
        )
        return
    progress(f"{version.name}: latest -> {version.version}; announced to {listeners} replica(s)")


class Loaded(Protocol):
    """What a `ModelSlot` holds: a model opened from one registry version."""

    version: ModelVersion

    def close(self) -> None: ...


M = TypeVar("M", bound=Loaded)


class ModelSlot(Generic[M]):
    """One hot-swappable model: `current` is the single reference requests read.

    `load` opens and checks a version in a worker thread beside the serving one (`open` raises to
    refuse it), then swaps the reference; a request that already took the old model finishes on it.
    """

    def __init__(self, tier: str, name: str, open_model: Callable[[ModelVersion], M]) -> None:
        self.tier, self.name = tier, name
        self.open_model = open_model
        self.current: M | None = None
        self._loader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"{name}-load")

    def serving_version(self) -> str | None:
        return self.current.version.version if self.current else None

    def serving(self, wanted: str = "", registry: Registry | None = None) -> M:
        """The model a request uses: UNAVAILABLE while none is loaded, INVALID_ARGUMENT when the
        request pins (`model_version`) another version (told apart from an unknown one when the
        `registry` is given)."""
        loaded = self.current
        if loaded is None:
            raise Unavailable(f"{self.tier}: {self.name} is still loading")
        if wanted and wanted != loaded.version.version:
            known = registry.versions(self.name) if registry is not None else []
            published = any(v.version == wanted for v in known)
            reason = "is published but not served here" if published else "is not a published version"
            raise InvalidArgument(
                "model_version",
                f"{wanted[:40]!r} {reason}; this replica serves {self.name} {loaded.version.version}",
            )
        return loaded

    async def load(self, version: ModelVersion) -> M:
        loaded = await asyncio.get_running_loop().run_in_executor(self._loader, self.open_model, version)
        self.current = loaded  # the swap: one reference assignment
        metrics.set_model_info(self.tier, version.name, version.version, version.digest)
        return loaded

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)
        if self.current is not None:
            self.current.close()
            self.current = None


class Follower:
    """Keeps one tier on the registry's `latest` version of one model or index."""

    def __init__(
        self,
        *,
        tier: str,
        name: str,
        registry: Registry,
        store_url: str,
        serving: Callable[[], str | None],
        load: Callable[[ModelVersion], Awaitable[None]],
        check_interval_s: float = 5.0,
        retry_failed_s: float = 60.0,
    ) -> None:
        self.tier, self.name, self.registry, self.store_url = tier, name, registry, store_url
        self.serving, self.load = serving, load
        self.check_interval_s, self.retry_failed_s = check_interval_s, retry_failed_s
        self._lock = asyncio.Lock()
        self._failed: dict[str, float] = {}  # version -> when its load failed
        self._tasks: list[asyncio.Task[None]] = []
        self.subscribed = asyncio.Event()

    def start(self, *, listen: bool = True) -> None:
        """Check periodically and, with `listen`, on every announcement too."""
        self._tasks = [asyncio.create_task(self._poll(), name=f"{self.name}-poll")]
        if listen:
            self._tasks.append(asyncio.create_task(self._listen(), name=f"{self.name}-listen"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def converge(self, reason: str) -> bool:
        """Load `latest` if it is not what is served; True when a swap happened."""
        async with self._lock:
            try:
                latest = self.registry.latest(self.name)
            except RegistryError as error:
                logger.error("%s: cannot read latest %s: %s", self.tier, self.name, error)
                return False
            if latest is None or latest.version == self.serving():
                return False
            failed_at = self._failed.get(latest.version)
            if failed_at is not None and time.monotonic() - failed_at < self.retry_failed_s:
                return False
            previous = self.serving()
            started = time.perf_counter()
            logger.info("%s: loading %s %s (%s)", self.tier, self.name, latest.version, reason)
            try:
                await self.load(latest)
            except Exception as error:
                self._failed[latest.version] = time.monotonic()
                metrics.SWAPS.labels(self.tier, self.name, "failed").inc()
                logger.error(
                    "%s: refused %s %s, still serving %s: %s",
                    self.tier, self.name, latest.version, previous, error,
                )  # fmt: skip
                return False
            self._failed.pop(latest.version, None)
            seconds = time.perf_counter() - started
            metrics.SWAPS.labels(self.tier, self.name, "success").inc()
            metrics.SWAP_SECONDS.labels(self.tier, self.name).observe(seconds)
            logger.info(
                "%s: now serving %s %s (was %s; loaded and checked in %.2fs)",
                self.tier, self.name, latest.version, previous, seconds,
            )  # fmt: skip
            return True

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.check_interval_s)
            await self.converge("periodic check")

    async def _listen(self) -> None:
        backoff = 0.5
        while True:
            client = aioredis.Redis.from_url(self.store_url, socket_connect_timeout=2)
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(channel(self.name))
                    self.subscribed.set()
                    backoff = 0.5
                    logger.info("%s: following %s on %s", self.tier, channel(self.name), self.store_url)
                    await self.converge("subscribed")  # catch up on what was missed meanwhile
                    async for message in pubsub.listen():
                        raise_if_cancelled()
                        if message.get("type") == "message":
                            await self.converge("announcement")
            except (redis.RedisError, OSError) as error:
                raise_if_cancelled()
                self.subscribed.clear()
                logger.warning(
                    "%s: store unreachable (%s); periodic checks continue, reconnecting in %.1fs",
                    self.tier, error, backoff,
                )  # fmt: skip
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
            finally:
                await client.aclose()
