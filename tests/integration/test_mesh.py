"""The whole mesh as real processes, called through Envoy as a client would."""

import json
import os
import time
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tiermesh.control.probes import grpc_health
from tiermesh.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from tiermesh.kit.testing import run_cli

pytestmark = pytest.mark.integration
SERVICE = "tiermesh.embedder.v1.EmbedderService"


@pytest.fixture(scope="module")
def envoy(mesh):
    _, status = mesh
    return status["envoy"]["grpc"]


@pytest.fixture(scope="module")
def stub(envoy):
    with grpc.insecure_channel(envoy) as channel:
        yield embedder_pb2_grpc.EmbedderServiceStub(channel)


def test_status_reports_every_component_healthy(mesh):
    running, status = mesh
    tiers = {"embedder", "retriever", "retriever-2", "llm", "classifiers", "bias", "gateway"}
    # A/A treatments of two cheap tiers, for the A/B tests (no users until a test moves some)
    tiers |= {"bias-treatment", "gateway-treatment"}
    assert set(status) == {"store", "xds", "envoy", "otlp-sink", *tiers}
    assert status["xds"]["health"] == "SERVING"  # Envoy's configuration comes from the control plane
    assert status["store"]["health"] == "SERVING" and status["store"]["url"].startswith("redis://127.0.0.1:")
    assert status["envoy"]["health"] == "LIVE" and status["envoy"]["admin"].startswith("127.0.0.1:")
    assert status["embedder"]["health"] == status["retriever-2"]["health"] == "SERVING"
    assert status["bias-treatment"]["arm"] == "treatment" and status["bias"]["arm"] == "control"
    assert status["otlp-sink"]["health"] == "SERVING"
    assert status["gateway"]["health"] == "SERVING" and status["gateway"]["http"].startswith("127.0.0.1:")
    assert status["envoy"]["http"].startswith("127.0.0.1:")  # the REST listener
    cli = run_cli(running.environ, "status", "--json")
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["embedder"]["grpc"] == status["embedder"]["grpc"]


def test_embeddings_through_envoy_match_sentence_transformers(stub, embedding_model):
    from sentence_transformers import SentenceTransformer

    texts = ["Can I afford a $25,000 car loan on $4,000 a month?", "refinance", "What documents do I need?"]
    response = stub.EmbedBatch(embedder_pb2.EmbedBatchRequest(texts=texts), timeout=10)
    got = np.array([e.values for e in response.embeddings])
    reference = SentenceTransformer(str(embedding_model.path / "sentence-transformers"), device="cpu")
    expected = reference.encode(texts, normalize_embeddings=True)
    assert (got * expected).sum(axis=1).min() >= 0.999
    assert response.model.version == embedding_model.version


def test_reflection_through_envoy_lists_and_describes_with_no_proto_files(envoy):
    with grpc.insecure_channel(envoy) as channel:
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE),
        ]
        responses = list(reflection.ServerReflectionInfo(iter(requests), timeout=5))
    names = {s.name for s in responses[0].list_services_response.service}
    assert SERVICE in names
    assert responses[1].file_descriptor_response.file_descriptor_proto  # serialized FileDescriptorProtos


def test_health_through_envoy(envoy):
    assert grpc_health(envoy, SERVICE, tier="embedder") == "SERVING"
    assert grpc_health(envoy, SERVICE) == "SERVING"  # the front tier without the header


def test_bad_input_through_envoy_names_the_field(stub, envoy):
    with pytest.raises(grpc.RpcError) as raised:
        stub.EmbedBatch(embedder_pb2.EmbedBatchRequest(texts=["ok", ""]), timeout=5)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details() == "texts[1]: must not be empty"
    raw = embedder_pb2.EmbedRequest(text="oops").SerializeToString().replace(b"oops", b"o\xffps")
    with grpc.insecure_channel(envoy) as channel, pytest.raises(grpc.RpcError) as raised:
        channel.unary_unary(f"/{SERVICE}/Embed")(raw, timeout=5)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith("text: is not valid UTF-8")


def test_repeated_text_is_served_from_the_store_cache(stub):
    text = f"cache probe {os.getpid()}"
    first = stub.Embed(embedder_pb2.EmbedRequest(text=text), timeout=5)
    second = stub.Embed(embedder_pb2.EmbedRequest(text=text), timeout=5)
    assert not first.embedding.cached and second.embedding.cached
    np.testing.assert_allclose(first.embedding.values, second.embedding.values, atol=1e-6)


def test_metrics_endpoint_counts_calls(stub, mesh, embedding_model):
    _, status = mesh
    stub.Embed(embedder_pb2.EmbedRequest(text="metrics probe"), timeout=5)
    with urllib.request.urlopen(f"http://{status['embedder']['metrics']}/metrics", timeout=5) as response:
        body = response.read().decode()
    assert (
        f'tiermesh_rpc_requests_total{{arm="control",code="OK",method="/{SERVICE}/Embed",model_version="{embedding_model.version}",tier="embedder"}}'
        in body
    )
    assert 'tiermesh_model_info{digest="sha256:' in body


def test_one_trace_from_client_through_envoy_to_the_tier(stub, mesh):
    running, _ = mesh
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    traceparent = f"00-{trace_id}-00f067aa0ba902b7-01"
    stub.Embed(embedder_pb2.EmbedRequest(text="trace me"), metadata=[("traceparent", traceparent)], timeout=5)
    spans_file = running.run_dir / "traces.jsonl"
    for _ in range(50):  # Envoy's spans reach the file through the OTLP sink, batched
        ours = [s for s in map(json.loads, spans_file.read_text().splitlines()) if s["trace_id"] == trace_id]
        if len(ours) == 2:
            break
        time.sleep(0.2)
    envoy, tier = sorted(ours, key=lambda span: span["start_ns"])
    # the caller's span → Envoy's hop → the tier's own span, one trace
    assert envoy["service"] == "envoy" and envoy["name"] == "envoy embedder" and envoy["kind"] == "SERVER"
    assert envoy["parent_span_id"] == "00f067aa0ba902b7"
    assert envoy["attributes"]["upstream_cluster"] == "embedder"
    assert tier["name"] == f"{SERVICE}/Embed" and tier["service"] == "tiermesh-embedder"
    assert tier["parent_span_id"] == envoy["span_id"]


def test_logs_are_json_lines(mesh, embedding_model):
    running, _ = mesh
    lines = (running.log_dir / "embedder.log").read_text().splitlines()
    entries = [json.loads(line) for line in lines if line.startswith("{")]
    assert any(
        f"SERVING model all-minilm-l6-v2 version {embedding_model.version}" in e["msg"] for e in entries
    )
    assert all({"ts", "level", "service", "msg"} <= set(e) for e in entries)
