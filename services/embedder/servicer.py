"""The embedder's gRPC protocol: request validation and proto conversion around the engine."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc

from services.embedder.cache import EmbeddingCache
from services.embedder.config import EmbedderConfig
from services.embedder.engine import EmbeddingEngine, load_engine
from tiermesh.common.v1 import common_pb2
from tiermesh.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from tiermesh.kit.batching import MicroBatcher
from tiermesh.kit.errors import InvalidArgument, Unavailable, check_count, check_text
from tiermesh.kit.minilm import Embedded
from tiermesh.kit.registry import Registry


class EmbedderTier(embedder_pb2_grpc.EmbedderServiceServicer):
    """EmbedderService over a micro-batched engine, with an optional Redis cache."""

    name = "embedder"
    service_names = (embedder_pb2.DESCRIPTOR.services_by_name["EmbedderService"].full_name,)

    def __init__(self, config: EmbedderConfig, *, registry: Registry | None = None) -> None:
        self.config = config
        self.registry = registry or Registry()
        self.engine: EmbeddingEngine | None = None
        self.batcher: MicroBatcher[str, Embedded] | None = None
        self.cache: EmbeddingCache | None = None
        self.model = common_pb2.ModelInfo()

    # -- lifecycle (tiermesh.kit.server.Tier) --------------------------------------------------------

    def register(self, server: grpc.aio.Server) -> None:
        embedder_pb2_grpc.add_EmbedderServiceServicer_to_server(self, server)

    async def start(self) -> None:
        model = self.registry.get(self.config.model, self.config.model_version)
        self.engine = await asyncio.to_thread(
            load_engine,
            model,
            device=self.config.device,
            threads=self.config.threads,
            token_budget=self.config.token_budget,
            spin_wait=self.config.spin_wait,
        )
        self.batcher = MicroBatcher(
            self.engine.embed,
            max_batch=self.config.max_batch_size,
            max_wait_s=self.config.max_wait_ms / 1000,
            label=self.name,
        )
        self.batcher.start()
        if self.config.cache_url:
            self.cache = EmbeddingCache(
                self.config.cache_url,
                ttl_s=self.config.cache_ttl_s,
                model_version=model.version,
                model_digest=model.digest,
            )
        self.model = common_pb2.ModelInfo(name=model.name, version=model.version, digest=model.digest)

    async def stop(self) -> None:
        if self.batcher is not None:
            await self.batcher.close()
        if self.cache is not None:
            await self.cache.close()
        if self.engine is not None:
            self.engine.close()

    # -- RPCs ------------------------------------------------------------------------------------

    async def Embed(self, request: embedder_pb2.EmbedRequest, context: grpc.aio.ServicerContext):
        self._check_version(request.model_version)
        check_text(request.text, "text", max_chars=self.config.max_text_chars)
        (embedded,) = await self._embed([request.text])
        return embedder_pb2.EmbedResponse(embedding=embedded, model=self.model)

    async def EmbedBatch(self, request: embedder_pb2.EmbedBatchRequest, context: grpc.aio.ServicerContext):
        self._check_version(request.model_version)
        check_count(len(request.texts), "texts", low=1, high=self.config.max_texts)
        for index, text in enumerate(request.texts):
            check_text(text, f"texts[{index}]", max_chars=self.config.max_text_chars)
        embeddings = await self._embed(request.texts)
        assert self.engine is not None
        return embedder_pb2.EmbedBatchResponse(
            embeddings=embeddings, model=self.model, dimension=self.engine.dimension
        )

    # -- helpers ---------------------------------------------------------------------------------

    def _check_version(self, wanted: str) -> None:
        if self.engine is None:
            raise Unavailable("embedder is still loading its model")
        if wanted and wanted != self.model.version:
            raise InvalidArgument("model_version", f"this tier serves {self.model.version!r}, not {wanted!r}")

    async def _embed(self, texts: Sequence[str]) -> list[embedder_pb2.Embedding]:
        assert self.batcher is not None
        found: list[Embedded | None] = [None] * len(texts)
        cached = [False] * len(texts)
        if self.cache is not None:
            found = await self.cache.get_many(texts)
            cached = [item is not None for item in found]
        missing = [i for i, item in enumerate(found) if item is None]
        if missing:
            computed = await self.batcher.submit([texts[i] for i in missing])
            for index, item in zip(missing, computed, strict=True):
                found[index] = item
            if self.cache is not None:
                await self.cache.put_many([texts[i] for i in missing], computed)
        return [
            embedder_pb2.Embedding(
                values=item.vector.tolist(),
                token_count=item.token_count,
                truncated=item.truncated,
                cached=was_cached,
            )
            for item, was_cached in zip(found, cached, strict=True)
            if item is not None
        ]
