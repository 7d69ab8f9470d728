"""The retriever's gRPC protocol: request validation, text embedding via the embedder tier, protos."""

from __future__ import annotations

import math

import grpc
import numpy as np
from google.protobuf import timestamp_pb2

from services.retriever.config import RetrieverConfig
from services.retriever.engine import IndexEngine
from services.retriever.index import LoadedIndex
from tiermesh.common.v1 import common_pb2
from tiermesh.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from tiermesh.kit import telemetry
from tiermesh.kit.errors import FailedPrecondition, InvalidArgument, Unavailable, check_text, from_downstream
from tiermesh.kit.hotswap import Follower
from tiermesh.kit.minilm import served_model
from tiermesh.kit.registry import LATEST, ModelVersion, Registry
from tiermesh.retriever.v1 import retriever_pb2, retriever_pb2_grpc

_KINDS = {"flat": retriever_pb2.INDEX_KIND_FLAT, "ivf": retriever_pb2.INDEX_KIND_IVF}


def _model_info(described: dict[str, str] | ModelVersion) -> common_pb2.ModelInfo:
    if isinstance(described, ModelVersion):
        return common_pb2.ModelInfo(name=described.name, version=described.version, digest=described.digest)
    return common_pb2.ModelInfo(
        name=described.get("name", ""),
        version=described.get("version", ""),
        digest=described.get("digest", ""),
    )


class RetrieverTier(retriever_pb2_grpc.RetrieverServiceServicer):
    """RetrieverService over a hot-swappable FAISS index."""

    name = "retriever"
    service_names = (retriever_pb2.DESCRIPTOR.services_by_name["RetrieverService"].full_name,)

    def __init__(self, config: RetrieverConfig, *, registry: Registry | None = None) -> None:
        self.config = config
        self.registry = registry or Registry()
        self.engine = IndexEngine(
            max_nprobe=config.max_nprobe,
            search_threads=config.search_threads,
            faiss_threads=config.faiss_threads,
        )
        self.follower: Follower | None = None
        self._channel: grpc.aio.Channel | None = None
        self._embedder: embedder_pb2_grpc.EmbedderServiceStub | None = None

    @property
    def model(self) -> common_pb2.ModelInfo:
        loaded = self.engine.current
        return _model_info(loaded.version) if loaded else common_pb2.ModelInfo()

    # -- lifecycle (tiermesh.kit.server.Tier) --------------------------------------------------------

    def register(self, server: grpc.aio.Server) -> None:
        retriever_pb2_grpc.add_RetrieverServiceServicer_to_server(self, server)

    async def start(self) -> None:
        await self._load(self.registry.get(self.config.index, self.config.index_version))
        self._channel = telemetry.channel(self.config.embedder_target)
        self._embedder = embedder_pb2_grpc.EmbedderServiceStub(self._channel)
        if self.config.index_version == LATEST:
            self.follower = Follower(
                tier=self.name,
                name=self.config.index,
                registry=self.registry,
                store_url=self.config.store_url,
                serving=self.engine.serving_version,
                load=self._load,
                check_interval_s=self.config.check_interval_s,
            )
            self.follower.start(listen=bool(self.config.store_url))

    async def _load(self, version: ModelVersion) -> None:
        # Indexes must come from the vectors the embedder tier serves (EMBEDDER_MODEL[_VERSION]).
        await self.engine.load(version, embedder=served_model(self.registry))

    async def stop(self) -> None:
        if self.follower is not None:
            await self.follower.stop()
        if self._channel is not None:
            await self._channel.close()
        self.engine.close()

    # -- RPCs ------------------------------------------------------------------------------------

    async def Search(self, request: retriever_pb2.SearchRequest, context: grpc.aio.ServicerContext):
        loaded = self._serving(request.index_version)  # this request stays on this version
        k = request.k if request.HasField("k") else self.config.default_k
        if not 1 <= k <= self.config.max_k:
            raise InvalidArgument("k", f"must be between 1 and {self.config.max_k}, got {k}")
        nprobe = self._nprobe(loaded, request)
        query = request.WhichOneof("query")
        if query is None:
            raise InvalidArgument("query", "set either text or vector")
        if query == "vector":
            vector = self._vector(loaded, request.vector.values)
        else:
            check_text(request.text, "text", max_chars=self.config.max_text_chars)
            vector = await self._embed(loaded, request.text, context)
        try:
            hits = await self.engine.search(
                loaded, vector, k=k, nprobe=nprobe, metadata_filter=request.metadata_filter
            )
        except KeyError as missing:
            keys = ", ".join(loaded.filterable) or "none"
            raise InvalidArgument(
                "metadata_filter", f"key {missing.args[0]!r} is not filterable (filterable keys: {keys})"
            ) from None
        return retriever_pb2.SearchResponse(
            passages=[
                retriever_pb2.Passage(
                    doc_id=hit.passage.doc_id,
                    chunk_index=hit.passage.chunk_index,
                    score=hit.score,
                    title=hit.passage.title,
                    section=hit.passage.section,
                    text=hit.passage.text,
                    metadata=hit.passage.metadata,
                )
                for hit in hits
            ],
            model=_model_info(loaded.version),
            embedder=_model_info(loaded.embedder),
            nprobe=nprobe if loaded.kind == "ivf" else 0,
        )

    async def GetIndexInfo(
        self, request: retriever_pb2.GetIndexInfoRequest, context: grpc.aio.ServicerContext
    ):
        loaded = self._serving("")
        created = timestamp_pb2.Timestamp()
        if loaded.version.metadata.get("created"):
            created.FromJsonString(loaded.version.metadata["created"].replace("+00:00", "Z"))
        return retriever_pb2.GetIndexInfoResponse(
            model=_model_info(loaded.version),
            kind=_KINDS[loaded.kind],
            vector_count=loaded.count,
            dimension=loaded.dimension,
            nlist=loaded.nlist,
            default_nprobe=loaded.default_nprobe,
            max_nprobe=loaded.max_nprobe,
            memory_bytes=loaded.memory_bytes,
            embedder=_model_info(loaded.embedder),
            create_time=created,
        )

    # -- helpers ---------------------------------------------------------------------------------

    def _serving(self, wanted: str) -> LoadedIndex:
        loaded = self.engine.current
        if loaded is None:
            raise Unavailable("retriever is still loading its index")
        if wanted and wanted != loaded.version.version:
            raise InvalidArgument(
                "index_version", f"this replica serves {loaded.version.version!r}, not {wanted!r}"
            )
        return loaded

    def _nprobe(self, loaded: LoadedIndex, request: retriever_pb2.SearchRequest) -> int:
        if not request.HasField("nprobe"):
            return loaded.default_nprobe
        if loaded.kind != "ivf":
            if request.nprobe < 1:
                raise InvalidArgument("nprobe", f"must be at least 1, got {request.nprobe}")
            return 0  # a flat index scans everything
        if not 1 <= request.nprobe <= loaded.max_nprobe:
            raise InvalidArgument(
                "nprobe", f"must be between 1 and {loaded.max_nprobe}, got {request.nprobe}"
            )
        return request.nprobe

    @staticmethod
    def _vector(loaded: LoadedIndex, values: object) -> np.ndarray:
        vector = np.asarray(values, dtype=np.float32)
        if vector.shape != (loaded.dimension,):
            raise InvalidArgument(
                "vector.values", f"has {vector.size} values; the index dimension is {loaded.dimension}"
            )
        if not np.isfinite(vector).all():
            position = int(np.flatnonzero(~np.isfinite(vector))[0])
            raise InvalidArgument("vector.values", f"value {position} is {vector[position]} (must be finite)")
        norm = float(np.linalg.norm(vector))
        if norm == 0 or not math.isfinite(norm):
            raise InvalidArgument("vector.values", "must not be all zeros")
        return vector / norm  # the index holds unit vectors, so scores are cosines

    async def _embed(self, loaded: LoadedIndex, text: str, context: grpc.aio.ServicerContext) -> np.ndarray:
        assert self._embedder is not None
        remaining = context.time_remaining()
        timeout = min(self.config.embed_timeout_s, remaining) if remaining is not None else None
        try:
            response = await self._embedder.Embed(
                embedder_pb2.EmbedRequest(text=text, model_version=loaded.embedder["version"]),
                timeout=timeout or self.config.embed_timeout_s,
            )
        except grpc.aio.AioRpcError as error:
            detail = f"embedder ({self.config.embedder_target}): {error.details()}"
            if error.code() == grpc.StatusCode.INVALID_ARGUMENT and "model_version" in (
                error.details() or ""
            ):
                raise FailedPrecondition(
                    f"index {loaded.version.version} needs embedder {loaded.embedder['version']}; {detail}"
                ) from None
            if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidArgument("text", error.details() or "rejected by the embedder") from None
            raise from_downstream(f"embedder ({self.config.embedder_target})", error) from None
        return np.asarray(response.embedding.values, dtype=np.float32)
