"""An engine that dies: calls in flight and new calls fail fast with UNAVAILABLE, and the tier
reports NOT_SERVING. Uses an engine of its own (this test kills it), not the session's."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.llm.servicer import LlmTier
from services.llm.tests.conftest import tiny_config
from tiermesh.kit.testing import serving_in_process
from tiermesh.llm.v1 import llm_pb2, llm_pb2_grpc

SERVICE = "tiermesh.llm.v1.LlmService"
STATUS = health_pb2.HealthCheckResponse
# vLLM's engine core is a process of its own, started here and killed by the test.
pytestmark = pytest.mark.integration


@pytest.mark.slow
async def test_a_dead_engine_fails_calls_fast_and_reports_not_serving(tiny_model, llm_registry):
    import psutil  # comes with vLLM

    config = tiny_config()
    tier = LlmTier(config, registry=llm_registry)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    async with serving_in_process(tier, config) as server:
        assert tier.report_serving == server.report_serving  # the kit hands the tier its health
        engine_processes = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        assert engine_processes
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = llm_pb2_grpc.LlmServiceStub(channel)
            stream = stub.GenerateStream(
                llm_pb2.GenerateStreamRequest(
                    prompt="Go on", sampling=llm_pb2.SamplingParams(max_tokens=1500)
                ),
                timeout=30,
            )
            await anext(aiter(stream))
            for process in engine_processes:
                process.kill()
            with pytest.raises(grpc.aio.AioRpcError) as in_flight:
                async for _chunk in stream:
                    pass
            assert in_flight.value.code() == grpc.StatusCode.UNAVAILABLE

            with pytest.raises(grpc.aio.AioRpcError) as new_call:
                await stub.Generate(llm_pb2.GenerateRequest(prompt="hello"), timeout=10)
            assert new_call.value.code() == grpc.StatusCode.UNAVAILABLE

            health = health_pb2_grpc.HealthStub(channel)
            for _ in range(50):
                status = (await health.Check(health_pb2.HealthCheckRequest(service=SERVICE))).status
                if status == STATUS.NOT_SERVING:
                    break
                await asyncio.sleep(0.1)
            assert status == STATUS.NOT_SERVING
