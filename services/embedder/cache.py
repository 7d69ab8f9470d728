"""An optional Redis cache of embeddings, keyed by model version + digest + the text's sha256.

The cache is an accelerator, never a dependency: if Redis is unreachable, lookups miss and
writes are dropped (with a warning at most once a minute), and requests are still answered.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import time
from collections.abc import Sequence

import numpy as np
import redis.asyncio as redis
from prometheus_client import Counter

from tiermesh.kit.minilm import Embedded

logger = logging.getLogger(__name__)

LOOKUPS = Counter("tiermesh_embedding_cache_lookups", "Embedding cache lookups", ["result"])
_HEADER = struct.Struct("<i?")  # token count, truncated


class EmbeddingCache:
    def __init__(self, url: str, *, ttl_s: int, model_version: str, model_digest: str) -> None:
        self._client = redis.Redis.from_url(url, socket_timeout=0.05, socket_connect_timeout=0.2)
        self._ttl_s = ttl_s
        self._prefix = f"tiermesh:embedding:{model_version}:{model_digest.removeprefix('sha256:')[:16]}:"
        self._last_warning = 0.0

    def _key(self, text: str) -> str:
        return self._prefix + hashlib.sha256(text.encode()).hexdigest()

    def _warn(self, error: Exception) -> None:
        if time.monotonic() - self._last_warning > 60:
            self._last_warning = time.monotonic()
            logger.warning("embedding cache unavailable, serving uncached: %s", error)

    async def get_many(self, texts: Sequence[str]) -> list[Embedded | None]:
        try:
            raw = await self._client.mget([self._key(t) for t in texts])
        except (redis.RedisError, OSError) as error:
            self._warn(error)
            LOOKUPS.labels("error").inc(len(texts))
            return [None] * len(texts)
        found: list[Embedded | None] = []
        for value in raw:
            if value is None:
                found.append(None)
                continue
            token_count, truncated = _HEADER.unpack_from(value)
            vector = np.frombuffer(value, dtype=np.float32, offset=_HEADER.size)
            found.append(Embedded(vector, token_count, truncated))
        hits = sum(item is not None for item in found)
        LOOKUPS.labels("hit").inc(hits)
        LOOKUPS.labels("miss").inc(len(found) - hits)
        return found

    async def put_many(self, texts: Sequence[str], embedded: Sequence[Embedded]) -> None:
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for text, item in zip(texts, embedded, strict=True):
                    value = (
                        _HEADER.pack(item.token_count, item.truncated)
                        + item.vector.astype(np.float32).tobytes()
                    )
                    pipe.set(self._key(text), value, ex=self._ttl_s)
                await pipe.execute()
        except (redis.RedisError, OSError) as error:
            self._warn(error)

    async def close(self) -> None:
        await self._client.aclose()
