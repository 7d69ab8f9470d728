"""What `GET /readyz` checks: the store and the tiers an answer needs are serving (the embedder
and retriever only while answers need sources)."""

from typing import Any

import redis.asyncio as aioredis

from services.gateway.config import GatewayConfig
from services.gateway.tiers import RemoteTiers

TIERS = ("embedder", "retriever", "llm", "classifiers", "bias")


class HealthServing:
    """The readiness check, over the tiers' gRPC health and the store."""

    def __init__(self, config: GatewayConfig, tiers: RemoteTiers, store: aioredis.Redis | None) -> None:
        self.config = config
        self.tiers = tiers
        self.store = store

    async def readiness(self) -> tuple[dict[str, Any], bool]:
        """(the body: "ready" or "not_ready" and every check's state, whether ready)."""
        checks = {tier: await self.tiers.health(tier) for tier in TIERS}
        if self.store is not None:
            try:
                checks["store"] = "SERVING" if await self.store.ping() else "DOWN"
            except (OSError, aioredis.RedisError):
                checks["store"] = "DOWN"
        needed = (
            ("embedder", "retriever", "llm", "store")
            if not self.config.answer_without_sources
            else ("llm", "store")
        )
        ready = all(checks.get(name, "SERVING") == "SERVING" for name in needed)
        return {"status": "ready" if ready else "not_ready", "checks": checks}, ready
