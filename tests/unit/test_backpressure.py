"""A tier at its concurrency limit refuses more calls at once, over real gRPC (in-process server).

The toy tier's Search blocks until the test lets it go, so "at once" is checked by order, not by
a clock: every refusal arrives while the admitted calls are still blocked.
"""

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from tiermesh.common.v1 import common_pb2
from tiermesh.kit.config import ServerConfig
from tiermesh.kit.testing import serving_in_process, tier_config
from tiermesh.retriever.v1 import retriever_pb2, retriever_pb2_grpc

pytestmark = pytest.mark.asyncio(loop_scope="session")

SERVICE = "tiermesh.retriever.v1.RetrieverService"


class GatedTier(retriever_pb2_grpc.RetrieverServiceServicer):
    """Search waits for `gate`; counts the calls that got in."""

    name = "retriever"
    service_names = (SERVICE,)
    model = common_pb2.ModelInfo()

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.entered = 0

    def register(self, server: grpc.aio.Server) -> None:
        retriever_pb2_grpc.add_RetrieverServiceServicer_to_server(self, server)

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def Search(self, request, context):
        self.entered += 1
        await self.gate.wait()
        return retriever_pb2.SearchResponse()


def refused_count() -> float:
    labels = {"tier": "retriever", "method": "/tiermesh.retriever.v1.RetrieverService/Search"}
    return REGISTRY.get_sample_value("tiermesh_rpc_refused_total", labels) or 0.0


async def test_calls_over_the_limit_are_refused_while_the_admitted_ones_still_run():
    tier, limit, extra = GatedTier(), 3, 4
    config = tier_config(ServerConfig, max_concurrent_rpcs=limit)
    refused_before = refused_count()
    async with (
        serving_in_process(tier, config) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = retriever_pb2_grpc.RetrieverServiceStub(channel)
        request = retriever_pb2.SearchRequest(text="q")
        admitted = [asyncio.ensure_future(stub.Search(request)) for _ in range(limit)]
        while tier.entered < limit:
            await asyncio.sleep(0.01)
        over = [stub.Search(retriever_pb2.SearchRequest(text="q"), timeout=5) for _ in range(extra)]
        outcomes = await asyncio.gather(*over, return_exceptions=True)
        # every extra call has its answer while the admitted ones are still held at the gate
        assert not any(call.done() for call in admitted)
        assert all(isinstance(o, grpc.aio.AioRpcError) for o in outcomes), outcomes
        assert {o.code() for o in outcomes} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert "RETRIEVER_MAX_CONCURRENT_RPCS" in outcomes[0].details()
        assert refused_count() - refused_before == extra
        health = health_pb2_grpc.HealthStub(channel)  # health is never refused
        check = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
        assert check.status == health_pb2.HealthCheckResponse.SERVING

        tier.gate.set()
        await asyncio.gather(*admitted)  # the admitted calls all succeed
        await stub.Search(retriever_pb2.SearchRequest(text="q"), timeout=5)  # and the slots are free again
        assert tier.entered == limit + 1
