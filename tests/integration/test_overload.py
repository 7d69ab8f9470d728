"""Overload through the public interfaces of a real mesh: calls beyond a tier's capacity are
refused at once with a clear, retryable answer (gRPC: UNAVAILABLE `overflow` from Envoy's
circuit breaker; REST: 503 `overloaded` with `Retry-After`) while the admitted calls are served,
and the mesh stays healthy.

Capacities are made tiny (gateway 3 concurrent requests, embedder 1) and every call embeds 128
long texts, so a burst of calls is certain to overflow them."""

import asyncio
from collections.abc import Iterator

import grpc
import httpx
import pytest

from tiermesh.control.runner import Mesh
from tiermesh.control.testing import running_mesh
from tiermesh.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from tiermesh.kit.topology import only, replica_ports, tier_named

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.chaos]

TEXTS = [
    f"Question {i}: how does an adjustable-rate mortgage reset after the fixed period ends? " * 4
    for i in range(128)
]
BURST = 12


@pytest.fixture(scope="module")
def small_mesh(tmp_path_factory, embedding_model) -> Iterator[tuple[Mesh, dict]]:
    settings = {
        "GATEWAY_MAX_CONCURRENT_RPCS": "3",
        "EMBEDDER_MAX_CONCURRENT_RPCS": "1",
        "GATEWAY_REQUIRE_API_KEY": "false",
        "EMBEDDER_CACHE_URL": "",  # every call computes its embeddings
    }
    tiers = only("embedder", "gateway")
    with running_mesh(tmp_path_factory.mktemp("overload"), tiers=tiers, **settings) as (mesh, status):
        yield mesh, status


async def burst(base_url: str) -> list[httpx.Response]:
    body = {"model": "all-minilm-l6-v2", "input": TEXTS}
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
        return await asyncio.gather(*(client.post("/v1/embeddings", json=body) for _ in range(BURST)))


def refusals(answers: list[httpx.Response]) -> list[dict]:
    """The error bodies of the 503s; every answer is a 200 or a retryable 503 `overloaded`."""
    assert {a.status_code for a in answers} <= {200, 503}, [(a.status_code, a.text[:200]) for a in answers]
    refused = [a for a in answers if a.status_code == 503]
    assert all(a.headers.get("retry-after") == "1" for a in refused)
    assert all(a.headers["content-type"].startswith("application/json") for a in refused)
    return [a.json()["error"] for a in refused]


def test_rest_calls_beyond_the_capacity_are_refused_with_retry_after_and_the_rest_served(small_mesh):
    mesh, status = small_mesh
    answers = asyncio.run(burst(f"http://{status['envoy']['http']}"))
    errors = refusals(answers)
    assert errors and sum(a.status_code == 200 for a in answers) >= 1
    assert {e["code"] for e in errors} == {"overloaded"}, errors
    # Envoy's circuit breaker (in front of the gateway) or the embedder's (behind it), named
    assert all("limit" in e["message"] or "overflow" in e["message"] for e in errors), errors
    assert all(len(a.json()["data"]) == len(TEXTS) for a in answers if a.status_code == 200)
    # nothing was harmed: one call alone is served, every component healthy, none restarted
    single = httpx.post(
        f"http://{status['envoy']['http']}/v1/embeddings",
        json={"model": "all-minilm-l6-v2", "input": "APR?"},
        timeout=30,
    )
    assert single.status_code == 200, single.text
    report = mesh.status()
    assert all(entry.get("restarts", 0) == 0 for entry in report.values()), report


def test_the_gateway_refuses_requests_beyond_its_own_limit(small_mesh):
    mesh, _status = small_mesh
    port = replica_ports(mesh.settings, tier_named("gateway"), "HTTP")[0]
    errors = refusals(asyncio.run(burst(f"http://127.0.0.1:{port}")))
    own = [e for e in errors if "GATEWAY_MAX_CONCURRENT_RPCS" in e["message"]]
    assert own and all(e["code"] == "overloaded" for e in own), errors
    assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200


def test_grpc_calls_beyond_a_tiers_capacity_are_refused_by_envoy_at_once(small_mesh):
    _mesh, status = small_mesh

    async def calls() -> list[object]:
        async with grpc.aio.insecure_channel(status["envoy"]["grpc"]) as channel:
            stub = embedder_pb2_grpc.EmbedderServiceStub(channel)
            request = embedder_pb2.EmbedBatchRequest(texts=TEXTS)
            pending = [asyncio.ensure_future(stub.EmbedBatch(request, timeout=120)) for _ in range(BURST)]
            first = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            refused_first = all(isinstance(call.exception(), grpc.aio.AioRpcError) for call in first[0])
            outcomes = await asyncio.gather(*pending, return_exceptions=True)
            return [refused_first, *outcomes]

    refused_first, *outcomes = asyncio.run(calls())
    failed = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert failed and len(failed) < BURST
    assert {o.code() for o in failed} == {grpc.StatusCode.UNAVAILABLE}, [o.details() for o in failed]
    assert all("overflow" in o.details() for o in failed), [o.details() for o in failed]
    assert refused_first  # refusals come back before any admitted call has finished its work
