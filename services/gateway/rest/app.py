"""`create_app`: the REST API's FastAPI app, wired from its parts (the serving objects, the API-key
gate, the error handlers, the routes, the OpenAPI document with this gateway's limits, and the
access middleware)."""

import redis.asyncio as aioredis
from fastapi import FastAPI

from services.gateway.config import GatewayConfig
from services.gateway.feedback import FeedbackStore
from services.gateway.flow import Advisor
from services.gateway.keys import KeyStore, RateLimiter
from services.gateway.rest.auth import KeyGate
from services.gateway.rest.errors import install_error_handlers
from services.gateway.rest.middleware import AccessMiddleware
from services.gateway.rest.openapi import install_openapi
from services.gateway.rest.routes import Handlers, router
from services.gateway.rest.serving_advice import AdviceServing
from services.gateway.rest.serving_chat import ChatServing
from services.gateway.rest.serving_embeddings import EmbeddingsServing
from services.gateway.rest.serving_health import HealthServing
from services.gateway.tiers import RemoteTiers

DESCRIPTION = (
    "Loan advice answered through the tiermesh mesh (intent and entities, retrieval, "
    "generation, bias check), plus OpenAI-compatible chat completions and embeddings.\n\n"
    "Authenticate with `Authorization: Bearer <API key>` (create one with `tiermesh keys create`)."
)


def create_app(
    config: GatewayConfig,
    advisor: Advisor,
    tiers: RemoteTiers,
    *,
    keys: KeyStore | None,
    limiter: RateLimiter | None,
    feedback: FeedbackStore | None,
    store: aioredis.Redis | None,
) -> FastAPI:
    """The REST API over `advisor` (and `tiers` and `store` for readiness); `keys` and `limiter`
    check API keys when the configuration requires them, `feedback` keeps ratings of answers."""
    app = FastAPI(title="tiermesh gateway", version="1", description=DESCRIPTION)
    app.state.key_gate = KeyGate(config, keys, limiter)
    app.state.handlers = Handlers(
        config=config,
        health=HealthServing(config, tiers, store),
        advice=AdviceServing(config, advisor, feedback),
        chat=ChatServing(config, advisor),
        embeddings=EmbeddingsServing(config, advisor),
    )
    install_error_handlers(app)
    app.include_router(router)
    install_openapi(app, config)
    app.add_middleware(
        AccessMiddleware, max_body_bytes=config.max_body_bytes, max_in_flight=config.max_concurrent_rpcs
    )
    return app
