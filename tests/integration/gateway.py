"""Helpers shared by the gateway's integration tests."""

import contextlib

import httpx
import redis.asyncio as aioredis

from services.gateway.config import GatewayConfig
from services.gateway.keys import KeyStore
from services.gateway.servicer import GatewayTier
from tiermesh.kit.testing import serving_in_process, tier_config

TIMEOUT = httpx.Timeout(120.0, connect=5.0)


def rest_client(status: dict, secret: str = "", timeout: httpx.Timeout = TIMEOUT) -> httpx.Client:
    """A client of the mesh's REST API through Envoy, with the API key `secret` (none: anonymous)."""
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    return httpx.Client(base_url=f"http://{status['envoy']['http']}", headers=headers, timeout=timeout)


@contextlib.asynccontextmanager
async def local_gateway(status: dict, **settings):
    """A gateway tier served in this process, calling the mesh's tiers through its Envoy; yields
    (its REST base URL, a fresh API key with high limits)."""
    envoy = status["envoy"]["grpc"]
    config = tier_config(
        GatewayConfig,
        http_port=0,
        store_url=status["store"]["url"],
        shutdown_grace_s=1.0,
        **{f"{tier}_target": envoy for tier in ("classifiers", "embedder", "retriever", "llm", "bias")},
        **settings,
    )
    store = aioredis.Redis.from_url(status["store"]["url"])
    try:
        secret, _ = await KeyStore(store).create(
            "local", requests_per_minute=100_000, tokens_per_minute=10**9
        )
    finally:
        await store.aclose()
    tier = GatewayTier(config)
    async with serving_in_process(tier, config):
        yield f"http://127.0.0.1:{tier.http_port}", secret
