"""EmbedderService through its gRPC interface, served in-process on a free port."""

import grpc
import numpy as np
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.embedder.config import EmbedderConfig
from services.embedder.servicer import EmbedderTier
from tiermesh.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from tiermesh.kit.server import TierServer
from tiermesh.kit.testing import serving_in_process, tier_config

SERVICE = "tiermesh.embedder.v1.EmbedderService"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(embedding_model, spans):
    config = tier_config(EmbedderConfig, max_texts=8, max_text_chars=100, max_wait_ms=1.0)
    async with serving_in_process(EmbedderTier(config), config) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="session")
async def stub(server):
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield embedder_pb2_grpc.EmbedderServiceStub(channel)


async def test_embed_returns_a_normalised_vector_and_the_model(stub, embedding_model):
    response = await stub.Embed(embedder_pb2.EmbedRequest(text="What is APR?"))
    vector = np.array(response.embedding.values)
    assert vector.shape == (384,) and abs(np.linalg.norm(vector) - 1) < 1e-5
    assert response.embedding.token_count == 6 and not response.embedding.cached
    assert (response.model.name, response.model.version, response.model.digest) == (
        embedding_model.name,
        embedding_model.version,
        embedding_model.digest,
    )


async def test_batch_keeps_order_and_matches_single_calls(stub):
    texts = ["loan one", "a different question about interest", "loan one"]
    batch = await stub.EmbedBatch(embedder_pb2.EmbedBatchRequest(texts=texts))
    assert batch.dimension == 384 and len(batch.embeddings) == 3
    single = await stub.Embed(embedder_pb2.EmbedRequest(text=texts[1]))
    np.testing.assert_allclose(batch.embeddings[1].values, single.embedding.values, atol=1e-5)
    np.testing.assert_allclose(batch.embeddings[0].values, batch.embeddings[2].values, atol=1e-6)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (embedder_pb2.EmbedRequest(text=""), "text: must not be empty"),
        (embedder_pb2.EmbedRequest(text="y" * 101), "text: is 101 characters; the limit is 100"),
        (embedder_pb2.EmbedRequest(text="hi", model_version="9.9.9"), "model_version: this tier serves"),
        (embedder_pb2.EmbedBatchRequest(texts=[]), "texts: needs at least 1 item"),
        (embedder_pb2.EmbedBatchRequest(texts=["a"] * 9), "texts: has 9 items; the limit is 8"),
        (embedder_pb2.EmbedBatchRequest(texts=["ok", "   "]), "texts[1]: must not be empty"),
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_field(stub, request_, message):
    call = stub.Embed if isinstance(request_, embedder_pb2.EmbedRequest) else stub.EmbedBatch
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call(request_)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith(message)


async def test_non_utf8_text_is_invalid_argument_naming_the_item(server):
    raw = (
        embedder_pb2.EmbedBatchRequest(texts=["fine", "BAD!"])
        .SerializeToString()
        .replace(b"BAD!", b"\xc3\x28\xff\xfe")
    )
    async with grpc.aio.insecure_channel(server.address) as channel:
        call = channel.unary_unary(f"/{SERVICE}/EmbedBatch")  # raw bytes in, raw bytes out
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call(raw)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert raised.value.details().startswith("texts[1]: is not valid UTF-8")
        # the tier is still fine afterwards
        ok = await channel.unary_unary(f"/{SERVICE}/Embed")(
            embedder_pb2.EmbedRequest(text="ok").SerializeToString()
        )
        assert embedder_pb2.EmbedResponse.FromString(ok).embedding.values


async def test_health_reports_serving_for_the_service(server):
    async with grpc.aio.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE):
            response = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_the_service(server):
    async with grpc.aio.insecure_channel(server.address) as channel:
        stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = [s.name async for r in stream for s in r.list_services_response.service]
    assert SERVICE in names and "grpc.health.v1.Health" in names


async def test_metrics_count_calls_by_status_code(stub, server, embedding_model):
    import urllib.request

    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Embed(embedder_pb2.EmbedRequest(text=""))
    await stub.Embed(embedder_pb2.EmbedRequest(text="counted"))
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics") as response:
        body = response.read().decode()
    method = f"/{SERVICE}/Embed"
    for code in ("OK", "INVALID_ARGUMENT"):
        assert (
            f'tiermesh_rpc_requests_total{{arm="control",code="{code}",method="{method}",model_version="{embedding_model.version}",tier="embedder"}}'
            in body
        )
    assert "tiermesh_rpc_latency_seconds_bucket" in body and "tiermesh_batch_size_bucket" in body


async def test_a_call_continues_the_callers_trace(stub, spans, embedding_model):
    from opentelemetry import trace

    tracer = trace.get_tracer("test")
    spans.clear()
    with tracer.start_as_current_span("caller") as parent:
        from tiermesh.kit.telemetry import outgoing_metadata

        await stub.Embed(embedder_pb2.EmbedRequest(text="traced"), metadata=outgoing_metadata())
    server_spans = [s for s in spans.get_finished_spans() if s.name == f"{SERVICE}/Embed"]
    assert server_spans, [s.name for s in spans.get_finished_spans()]
    assert server_spans[-1].context.trace_id == parent.get_span_context().trace_id
    assert server_spans[-1].parent.span_id == parent.get_span_context().span_id
    assert server_spans[-1].attributes["tiermesh.model_version"] == embedding_model.version


async def test_unavailable_until_the_engine_is_loaded(embedding_model):
    config = tier_config(EmbedderConfig)
    server = TierServer(EmbedderTier(config), config)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE)
            )
            assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await embedder_pb2_grpc.EmbedderServiceStub(channel).Embed(
                    embedder_pb2.EmbedRequest(text="early")
                )
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
            await server.load()
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE)
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(grace=0)


async def test_kit_channels_send_the_current_trace_downstream(server, spans):
    from opentelemetry import trace

    from tiermesh.kit.telemetry import channel

    spans.clear()
    with trace.get_tracer("test").start_as_current_span("upstream tier") as parent:
        async with channel(server.address) as downstream:
            await embedder_pb2_grpc.EmbedderServiceStub(downstream).Embed(
                embedder_pb2.EmbedRequest(text="hop")
            )
    finished = {s.name: s for s in spans.get_finished_spans()}
    client, served = finished[f"{SERVICE}/Embed"], None
    served = [s for s in spans.get_finished_spans() if s.kind == trace.SpanKind.SERVER][-1]
    client = [s for s in spans.get_finished_spans() if s.kind == trace.SpanKind.CLIENT][-1]
    assert client.parent.span_id == parent.get_span_context().span_id
    assert served.parent.span_id == client.context.span_id
    assert served.context.trace_id == parent.get_span_context().trace_id
