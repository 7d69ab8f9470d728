"""API keys and rate limits of the REST API: the `Authorized` dependency of every route but health
and the docs (it verifies the key, `Authorization: Bearer <key>` or `X-API-Key`, and counts the
request against the key's limits) and the `Caller` it yields, which charges the tokens an answer
used to the caller's key.

Through a store outage, keys verified against the store in the last `GATEWAY_KEY_CACHE_TTL_S` keep
working (`VerifiedKeys`); what degrades meanwhile: unknown keys (and keys created during the
outage) are refused with 503, rate limits are not counted, and tokens are not charged. A
revocation is announced on the store and drops the key from every gateway's cache at once.
"""

import asyncio
import collections
import dataclasses
import hashlib
import logging
import math
import time
from typing import Annotated

import redis.asyncio as aioredis
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.background import BackgroundTask

from services.gateway.config import GatewayConfig
from services.gateway.keys import KEY_ID_PATTERN, REVOKED_CHANNEL, ApiKey, KeyStore, RateLimiter
from services.gateway.rest.errors import ApiError

# The REST API logs under one name, the one it had as a single module.
logger = logging.getLogger("services.gateway.rest")

BEARER = HTTPBearer(auto_error=False, description="an API key from `tiermesh keys create`")


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who made a request: its API key (None while keys are not required), and its limiter."""

    key: ApiKey | None
    limiter: RateLimiter | None

    @property
    def key_id(self) -> str:
        return self.key.key_id if self.key else ""

    async def charge(self, tokens: int) -> None:
        """Count `tokens` against the key's limit; a store that is down costs the count, not the answer."""
        if self.key is not None and self.limiter is not None and tokens > 0:
            try:
                await self.limiter.charge(self.key, tokens)
            except (OSError, aioredis.RedisError) as error:
                logger.warning("tokens not charged to %s: %s", self.key.key_id, error)

    def charge_later(self, tokens: int) -> BackgroundTask:
        """Charge `tokens` once the response is sent (off its latency)."""
        return BackgroundTask(self.charge, tokens)


class VerifiedKeys:
    """API keys the store vouched for recently, by their secret's digest (never the secret): what
    the gateway still admits while the store is unreachable. Bounded: the least recently used go."""

    def __init__(self, ttl_s: float, capacity: int = 100_000) -> None:
        self.ttl_s = ttl_s
        self.capacity = capacity
        self._keys: collections.OrderedDict[str, tuple[ApiKey, float]] = collections.OrderedDict()

    @staticmethod
    def _digest(presented: str) -> str:
        return hashlib.sha256(presented.encode(errors="replace")).hexdigest()

    def remember(self, presented: str, key: ApiKey) -> None:
        digest = self._digest(presented)
        self._keys[digest] = (key, time.monotonic())
        self._keys.move_to_end(digest)
        while len(self._keys) > self.capacity:
            self._keys.popitem(last=False)

    def recall(self, presented: str) -> ApiKey | None:
        """The key, if the store verified it within the TTL."""
        found = self._keys.get(self._digest(presented))
        if found is None or time.monotonic() - found[1] > self.ttl_s:
            return None
        return found[0]

    def forget(self, key_id: str) -> None:
        """Drop a revoked (or no longer valid) key at once."""
        for digest in [d for d, (key, _) in self._keys.items() if key.key_id == key_id]:
            del self._keys[digest]


class KeyGate:
    """Admits a request whose API key is known, not revoked and within its rate limits."""

    def __init__(self, config: GatewayConfig, keys: KeyStore | None, limiter: RateLimiter | None) -> None:
        self.config = config
        self.keys = keys
        self.limiter = limiter
        self.verified = VerifiedKeys(config.key_cache_ttl_s)

    @property
    def required(self) -> bool:
        """Whether requests need an API key (read per request, as the configuration says now)."""
        return self.config.require_api_key

    async def admit(self, presented: str) -> ApiKey:
        """The key whose secret is `presented`, its request counted; else an ApiError (401, 429, 503)."""
        if not presented:
            raise ApiError(
                401,
                "missing_api_key",
                "no API key: send Authorization: Bearer <key> (tiermesh keys create makes one)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        assert self.keys is not None and self.limiter is not None  # the tier refuses to start without a store
        try:
            key = await self.keys.verify(presented)
            if key is None:
                self._forget(presented)
                raise ApiError(
                    401,
                    "invalid_api_key",
                    "the API key is unknown or revoked",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            self.verified.remember(presented, key)
            decision = await self.limiter.acquire(key)
        except (OSError, aioredis.RedisError) as error:
            return self._admit_from_memory(presented, error)
        if not decision.allowed:
            retry = max(1, math.ceil(decision.retry_after_s))
            raise ApiError(
                429,
                "rate_limit_exceeded",
                f"{decision.limit} of key {key.key_id} reached; retry after {retry} s",
                headers={"Retry-After": str(retry)},
            )
        return key

    def _forget(self, presented: str) -> None:
        match = KEY_ID_PATTERN.search(presented[:32]) if isinstance(presented, str) else None
        if match:
            self.verified.forget(match.group(0))

    def _admit_from_memory(self, presented: str, error: BaseException) -> ApiKey:
        """The store is unreachable: admit a key it verified recently (uncounted), else 503."""
        key = self.verified.recall(presented)
        if key is None:
            raise ApiError(503, "store_unavailable", f"store: cannot check the API key ({error})")
        logger.warning(
            "store unreachable (%s): admitting recently verified key %s uncounted", error, key.key_id
        )
        return key

    async def follow_revocations(self, store: aioredis.Redis) -> None:
        """Forget each key revoked anywhere as its revocation is announced; resubscribes after a
        store outage (run as a task for the gateway's life)."""
        while True:
            try:
                async with store.pubsub() as pubsub:
                    await pubsub.subscribe(REVOKED_CHANNEL)
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            self.verified.forget(message["data"].decode(errors="replace"))
            except (OSError, aioredis.RedisError) as error:
                logger.debug("revocations: store unreachable (%s); resubscribing", error)
                await asyncio.sleep(1.0)


async def authorize(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]
) -> Caller:
    """The dependency: the caller of `request`, admitted by the app's `KeyGate` (`app.state.key_gate`)."""
    gate: KeyGate = request.app.state.key_gate
    if not gate.required:
        return Caller(None, gate.limiter)
    presented = credentials.credentials if credentials else request.headers.get("x-api-key", "")
    key = await gate.admit(presented)
    request.state.key = key
    return Caller(key, gate.limiter)


Authorized = Annotated[Caller, Depends(authorize)]
