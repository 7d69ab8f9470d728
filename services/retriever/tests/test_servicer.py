"""RetrieverService through its gRPC interface, served in-process on a free port."""

import asyncio

import grpc
import pytest
from prometheus_client import REGISTRY

from services.retriever.config import RetrieverConfig
from services.retriever.servicer import RetrieverTier
from services.retriever.tests.conftest import artifact
from tiermesh.kit.testing import free_port, serving_in_process, tier_config
from tiermesh.retriever.v1 import retriever_pb2, retriever_pb2_grpc

pytestmark = pytest.mark.asyncio(loop_scope="session")


def config(**values) -> RetrieverConfig:
    # No store (announcements off) and a fast periodic check; no embedder listens at this target.
    defaults = {"index": "test-index", "check_interval_s": 0.05, "max_k": 20,
                "embedder_target": f"127.0.0.1:{free_port()}", "embed_timeout_s": 1.0}  # fmt: skip
    return tier_config(RetrieverConfig, **{**defaults, **values})


async def search(server, request) -> retriever_pb2.SearchResponse:
    async with grpc.aio.insecure_channel(server.address) as channel:
        return await retriever_pb2_grpc.RetrieverServiceStub(channel).Search(request, timeout=5)


def vector_request(values, **fields) -> retriever_pb2.SearchRequest:
    return retriever_pb2.SearchRequest(vector=retriever_pb2.QueryVector(values=list(values)), **fields)


async def test_vector_search_filters_and_index_info(scratch_registry, embedding_model):
    version, vectors = artifact(scratch_registry, embedding_model)
    scratch_registry.set_latest("test-index", version.version)
    settings = config()
    async with serving_in_process(RetrieverTier(settings, registry=scratch_registry), settings) as server:
        response = await search(server, vector_request(vectors[7] * 3.0, k=4, nprobe=2))  # any length
        assert response.passages[0].doc_id == "doc-7"
        assert response.passages[0].score == pytest.approx(1.0, abs=1e-5) and len(response.passages) == 4
        assert (response.model.version, response.embedder.version, response.nprobe) == (
            version.version, embedding_model.version, 2,
        )  # fmt: skip
        filtered = await search(server, vector_request(vectors[7], k=20, metadata_filter={"topic": "fees"}))
        assert filtered.passages and {p.metadata["topic"] for p in filtered.passages} == {"fees"}
        assert (await search(server, vector_request(vectors[7]))).nprobe == 8  # the version's default

        async with grpc.aio.insecure_channel(server.address) as channel:
            info = await retriever_pb2_grpc.RetrieverServiceStub(channel).GetIndexInfo(
                retriever_pb2.GetIndexInfoRequest()
            )
        assert (info.kind, info.vector_count, info.dimension, info.nlist) == (
            retriever_pb2.INDEX_KIND_IVF, 2000, 32, 51,
        )  # fmt: skip
        assert info.max_nprobe == 51 and info.memory_bytes > 2000 * 32 * 4 and info.create_time.seconds > 0
        assert REGISTRY.get_sample_value("tiermesh_retriever_vectors", {"index": "test-index"}) == 2000


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"k": 0}, "k: must be between 1 and 20, got 0"),
        ({"k": 21}, "k: must be between 1 and 20, got 21"),
        ({"nprobe": 0}, "nprobe: must be between 1 and 51, got 0"),
        ({"nprobe": 52}, "nprobe: must be between 1 and 51, got 52"),
        ({"index_version": "0123456789ab"}, "index_version: this replica serves"),
        ({"metadata_filter": {"colour": "red"}}, "metadata_filter: key 'colour' is not filterable"),
    ],
)
async def test_bad_requests_name_the_field(scratch_registry, embedding_model, fields, message):
    version, vectors = artifact(scratch_registry, embedding_model)
    scratch_registry.set_latest("test-index", version.version)
    settings = config()
    async with serving_in_process(RetrieverTier(settings, registry=scratch_registry), settings) as server:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await search(server, vector_request(vectors[0], **fields))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in raised.value.details()


async def test_bad_queries_name_the_problem_and_the_tier_keeps_serving(scratch_registry, embedding_model):
    version, vectors = artifact(scratch_registry, embedding_model)
    scratch_registry.set_latest("test-index", version.version)
    settings = config(max_text_chars=50)
    bad = [
        (retriever_pb2.SearchRequest(), grpc.StatusCode.INVALID_ARGUMENT, "query: set either text or vector"),
        (retriever_pb2.SearchRequest(text=" "), grpc.StatusCode.INVALID_ARGUMENT, "text: must not be empty"),
        (
            retriever_pb2.SearchRequest(text="x" * 51),
            grpc.StatusCode.INVALID_ARGUMENT,
            "text: is 51 characters",
        ),
        (
            vector_request([0.1] * 31),
            grpc.StatusCode.INVALID_ARGUMENT,
            "has 31 values; the index dimension is 32",
        ),
        (vector_request([float("nan")] + [0.1] * 31), grpc.StatusCode.INVALID_ARGUMENT, "value 0 is nan"),
        (vector_request([0.1] * 31 + [float("inf")]), grpc.StatusCode.INVALID_ARGUMENT, "value 31 is inf"),
        (vector_request([0.0] * 32), grpc.StatusCode.INVALID_ARGUMENT, "must not be all zeros"),
        (retriever_pb2.SearchRequest(text="What is APR?"), grpc.StatusCode.UNAVAILABLE, "embedder ("),
    ]
    async with serving_in_process(RetrieverTier(settings, registry=scratch_registry), settings) as server:
        for request, code, message in bad:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await search(server, request)
            assert (raised.value.code(), message in raised.value.details()) == (code, True), raised.value
        assert (await search(server, vector_request(vectors[3]))).passages[0].doc_id == "doc-3"


@pytest.mark.slow
async def test_hot_swap_by_periodic_check_and_a_corrupt_version_is_refused(scratch_registry, embedding_model):
    first, vectors = artifact(scratch_registry, embedding_model)
    second, _ = artifact(scratch_registry, embedding_model, kind="flat")
    broken, _ = artifact(scratch_registry, embedding_model, seed=5)
    (broken.path / "index.faiss").write_bytes(b"\0" * 100)
    scratch_registry.set_latest("test-index", first.version)
    settings = config()
    tier = RetrieverTier(settings, registry=scratch_registry)
    async with serving_in_process(tier, settings) as server:
        scratch_registry.set_latest("test-index", second.version)
        async with asyncio.timeout(5):
            while tier.model.version != second.version:
                await asyncio.sleep(0.02)
        assert (await search(server, vector_request(vectors[1]))).model.version == second.version

        labels = {"tier": "retriever", "name": "test-index", "outcome": "failed"}
        failures = REGISTRY.get_sample_value("tiermesh_model_swaps_total", labels) or 0
        scratch_registry.set_latest("test-index", broken.version)
        async with asyncio.timeout(5):
            while REGISTRY.get_sample_value("tiermesh_model_swaps_total", labels) != failures + 1:
                await asyncio.sleep(0.02)
        response = await search(server, vector_request(vectors[1]))
        assert response.model.version == second.version and response.passages[0].doc_id == "doc-1"
