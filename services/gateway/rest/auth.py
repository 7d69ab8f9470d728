"""API keys and rate limits of the REST API: the `Authorized` dependency of every route but health
and the docs (it verifies the key, `Authorization: Bearer <key>` or `X-API-Key`, and counts the
request against the key's limits) and the `Caller` it yields, which charges the tokens an answer
used to the caller's key.
"""

import dataclasses
import logging
import math
from typing import Annotated

import redis.asyncio as aioredis
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.background import BackgroundTask

from services.gateway.config import GatewayConfig
from services.gateway.keys import ApiKey, KeyStore, RateLimiter
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


class KeyGate:
    """Admits a request whose API key is known, not revoked and within its rate limits."""

    def __init__(self, config: GatewayConfig, keys: KeyStore | None, limiter: RateLimiter | None) -> None:
        self.config = config
        self.keys = keys
        self.limiter = limiter

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
                raise ApiError(
                    401,
                    "invalid_api_key",
                    "the API key is unknown or revoked",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            decision = await self.limiter.acquire(key)
        except (OSError, aioredis.RedisError) as error:
            raise ApiError(503, "store_unavailable", f"store: cannot check the API key ({error})") from None
        if not decision.allowed:
            retry = max(1, math.ceil(decision.retry_after_s))
            raise ApiError(
                429,
                "rate_limit_exceeded",
                f"{decision.limit} of key {key.key_id} reached; retry after {retry} s",
                headers={"Retry-After": str(retry)},
            )
        return key


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
