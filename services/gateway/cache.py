"""The optional response cache: answers kept for a TTL under the normalised question, the
request's options and the version of every model that contributed.

The gateway knows the versions that are live from two sources: the versions reported in the
answers it produced, and the hot-swap announcements on the store (`tiermesh:latest:*`), which
win. A lookup builds its key from those versions, while an answer is stored under the versions
that really produced it; so once a new model or index version is announced, lookups move to a new
key and an answer from the old version is never served again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re

import redis.asyncio as aioredis
from prometheus_client import Counter

from services.gateway.flow import Question
from tiermesh.gateway.v1 import gateway_pb2
from tiermesh.kit.cancellation import raise_if_cancelled
from tiermesh.kit.hotswap import CHANNEL_PREFIX

logger = logging.getLogger(__name__)

LOOKUPS = Counter("tiermesh_gateway_cache_lookups_total", "Response cache lookups", ["result"])


def normalise(question: str) -> str:
    """Case, spacing and trailing punctuation do not change a question."""
    return re.sub(r"\s+", " ", question).strip().rstrip("?!. ").casefold()


class VersionBook:
    """The live version of every model the flow uses, by registry name."""

    def __init__(self) -> None:
        self._seen: dict[str, str] = {}
        self._announced: dict[str, str] = {}

    def saw(self, advice: gateway_pb2.Advice) -> None:
        for used in advice.versions:
            self._seen[used.model.name] = used.model.version

    def announced(self, name: str, version: str) -> None:
        self._announced[name] = version

    def current(self) -> dict[str, str]:
        """Versions of the models seen in answers, announcements first; empty before any answer."""
        return {name: self._announced.get(name, version) for name, version in self._seen.items()}


def key(question: Question, versions: dict[str, str], prefix: str) -> str:
    material = json.dumps(
        {
            "q": normalise(question.text),
            "top_k": question.top_k,
            "max_tokens": question.max_tokens,
            "temperature": question.temperature,
            "seed": question.seed,
            "filter": sorted(question.metadata_filter.items()),
            "versions": sorted(versions.items()),
        },
        sort_keys=True,
    )
    return prefix + hashlib.sha256(material.encode()).hexdigest()


class ResponseCache:
    """Full answers (never degraded or out-of-scope ones) in the store for `ttl_s` seconds."""

    def __init__(self, client: aioredis.Redis, ttl_s: float, *, prefix: str = "tiermesh:answers:") -> None:
        self.client = client
        self.ttl_ms = int(ttl_s * 1000)
        self.prefix = prefix
        self.book = VersionBook()
        self._listener: asyncio.Task[None] | None = None

    def saw(self, advice: gateway_pb2.Advice) -> None:
        self.book.saw(advice)

    async def get(self, question: Question) -> gateway_pb2.Advice | None:
        versions = self.book.current()
        if not versions:
            return None
        try:
            raw = await self.client.get(key(question, versions, self.prefix))
        except (OSError, aioredis.RedisError) as error:
            logger.warning("response cache unavailable, answering without it: %s", error)
            return None
        LOOKUPS.labels("hit" if raw else "miss").inc()
        return gateway_pb2.Advice.FromString(raw) if raw else None

    async def put(self, question: Question, advice: gateway_pb2.Advice) -> None:
        versions = {used.model.name: used.model.version for used in advice.versions}
        try:
            await self.client.set(
                key(question, versions, self.prefix), advice.SerializeToString(), px=self.ttl_ms
            )
        except (OSError, aioredis.RedisError) as error:
            logger.warning("response cache unavailable, answer not cached: %s", error)

    async def start(self) -> None:
        """Follow the hot-swap announcements of every model."""
        self._listener = asyncio.create_task(self._listen())

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener

    async def _listen(self) -> None:
        while True:
            try:
                async with self.client.pubsub() as pubsub:
                    await pubsub.psubscribe(CHANNEL_PREFIX + "*")
                    async for message in pubsub.listen():
                        raise_if_cancelled()
                        if message.get("type") != "pmessage":
                            continue
                        with contextlib.suppress(ValueError, KeyError, TypeError):
                            event = json.loads(message["data"])
                            self.book.announced(event["name"], event["version"])
                            logger.info(
                                "response cache: %s %s announced; older answers are no longer served",
                                event["name"],
                                event["version"],
                            )
            except (OSError, aioredis.RedisError) as error:
                logger.warning("response cache: announcements unavailable (%s); retrying", error)
                await asyncio.sleep(1.0)
                raise_if_cancelled()
