"""The gateway tier: `AdvisorService` over gRPC and the REST API, both on one `Advisor` flow."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import redis.asyncio as aioredis
import uvicorn

from services.gateway import keys, prompt, rest
from services.gateway.cache import ResponseCache
from services.gateway.config import GatewayConfig
from services.gateway.feedback import FeedbackStore
from services.gateway.flow import Advisor, Question, resolve
from services.gateway.store_memory import watch_store_memory
from services.gateway.tiers import RemoteTiers
from tiermesh.common.v1 import common_pb2
from tiermesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tiermesh.kit.errors import Unavailable

logger = logging.getLogger(__name__)

# Longer than Envoy's idle timeout for the REST cluster (60 s, envoy/rest_cluster.yaml.tmpl), so
# Envoy, not the gateway, closes an idle connection: the other way round, Envoy may send a request
# down a connection at the moment the gateway closes it, and the call fails.
HTTP_KEEP_ALIVE_S = 75


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside the tier's event loop: the kit's SIGTERM handling stops it, not uvicorn's."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class GatewayTier(gateway_pb2_grpc.AdvisorServiceServicer):
    name = "gateway"
    service_names = ("tiermesh.gateway.v1.AdvisorService",)

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.template = prompt.load(config.prompt_version)  # a bad version stops start-up, named
        self.advisor: Advisor | None = None
        self.http_port = 0
        self._store: aioredis.Redis | None = None
        self._cache: ResponseCache | None = None
        self._http: _EmbeddedServer | None = None
        self._http_task: asyncio.Task[None] | None = None
        self._app: Any = None
        self._followers: list[asyncio.Task[None]] = []  # of the store; cancelled on stop

    @property
    def model(self) -> common_pb2.ModelInfo:
        return self.template.model

    def register(self, server: grpc.aio.Server) -> None:
        gateway_pb2_grpc.add_AdvisorServiceServicer_to_server(self, server)

    async def start(self) -> None:
        config = self.config
        tiers = RemoteTiers(
            {
                gateway_pb2.TIER_CLASSIFIERS: config.classifiers_target,
                gateway_pb2.TIER_EMBEDDER: config.embedder_target,
                gateway_pb2.TIER_RETRIEVER: config.retriever_target,
                gateway_pb2.TIER_LLM: config.llm_target,
                gateway_pb2.TIER_BIAS: config.bias_target,
            },
            max_message_mb=config.max_message_mb,
        )
        feedback = None
        if config.store_url:
            self._store = aioredis.Redis.from_url(
                config.store_url, socket_timeout=2, socket_connect_timeout=2
            )
            feedback = FeedbackStore(
                self._store, ttl_s=config.feedback_ttl_s, max_records=config.feedback_max_records
            )
            self._followers.append(asyncio.create_task(watch_store_memory(self._store)))
            if config.cache_ttl_s > 0:
                self._cache = ResponseCache(self._store, config.cache_ttl_s)
                await self._cache.start()
        elif config.require_api_key:
            raise ValueError(
                "GATEWAY_STORE_URL: required while GATEWAY_REQUIRE_API_KEY is true (keys live there)"
            )
        self.advisor = Advisor(config, tiers, self.template, cache=self._cache, records=feedback)
        app = rest.create_app(
            config,
            self.advisor,
            tiers,
            keys=keys.KeyStore(self._store) if self._store else None,
            limiter=keys.RateLimiter(self._store) if self._store else None,
            feedback=feedback,
            store=self._store,
        )
        self._app = app
        if self._store is not None and config.require_api_key:
            # its own connection, without the request-path socket timeout: it waits for messages
            listener = aioredis.Redis.from_url(
                config.store_url, socket_connect_timeout=2, socket_keepalive=True
            )
            self._followers.append(asyncio.create_task(app.state.key_gate.follow_revocations(listener)))
        self._http = _EmbeddedServer(
            uvicorn.Config(
                app,
                host=config.host,
                port=config.http_port,
                log_config=None,
                access_log=False,  # the app logs each request itself, redacted
                lifespan="off",
                timeout_graceful_shutdown=int(config.shutdown_grace_s),
                timeout_keep_alive=HTTP_KEEP_ALIVE_S,
            )
        )
        self._http_task = asyncio.create_task(self._http.serve())
        while not self._http.started:
            if self._http_task.done():
                raise RuntimeError(f"REST API could not listen on {config.host}:{config.http_port}")
            await asyncio.sleep(0.02)
        self.http_port = self._http.servers[0].sockets[0].getsockname()[1]
        logger.info(
            "REST API on http://%s:%d (OpenAPI at /openapi.json, docs at /docs)%s",
            config.host,
            self.http_port,
            "" if config.require_api_key else "; API keys NOT required",
        )

    async def drain(self) -> None:
        """The process is stopping: `/healthz` answers 503 so Envoy takes the REST API out of
        the pool too, while calls are still served (the kit waits its drain delay after this)."""
        if self._app is not None:
            self._app.state.draining = True

    async def stop(self) -> None:
        for follower in self._followers:
            follower.cancel()
        if self._http is not None and self._http_task is not None:
            self._http.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await self._http_task
        if self.advisor is not None:
            await self.advisor.drain()
        if self._cache is not None:
            await self._cache.stop()
        if self.advisor is not None:
            await self.advisor.tiers.close()
        if self._store is not None:
            await self._store.aclose()

    # -- RPCs ------------------------------------------------------------------------------------

    def _ready(self) -> Advisor:
        if self.advisor is None:
            raise Unavailable("gateway: still starting")
        return self.advisor

    def _question(self, request: Any) -> Question:
        options = request.options
        return resolve(
            self.config,
            request.question,
            user_id=request.user_id,
            top_k=options.top_k if options.HasField("top_k") else None,
            max_tokens=options.max_tokens if options.HasField("max_tokens") else None,
            temperature=options.temperature if options.HasField("temperature") else None,
            seed=options.seed if options.HasField("seed") else None,
        )

    async def Advise(self, request: gateway_pb2.AdviseRequest, context: grpc.aio.ServicerContext):
        advisor = self._ready()
        question = self._question(request)
        advice = await advisor.advise(question, advisor.deadline(context.time_remaining()))
        return gateway_pb2.AdviseResponse(advice=advice)

    async def AdviseStream(
        self, request: gateway_pb2.AdviseStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.AdviseStreamResponse]:
        advisor = self._ready()
        question = self._question(request)
        async for item in advisor.advise_stream(question, advisor.deadline(context.time_remaining())):
            if isinstance(item, str):
                yield gateway_pb2.AdviseStreamResponse(chunk=gateway_pb2.AdviceChunk(text=item))
            else:
                yield gateway_pb2.AdviseStreamResponse(advice=item)
