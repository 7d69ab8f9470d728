"""The real model: SmolLM2-135M-Instruct converted from the package's GGUF, published, served."""

from __future__ import annotations

import grpc
import pytest

from services.llm.config import MODEL_NAME, LlmConfig
from services.llm.convert import prepare, source_gguf
from services.llm.servicer import LlmTier
from tiermesh.kit.registry import Registry, file_sha256
from tiermesh.kit.testing import serving_in_process, tier_config
from tiermesh.llm.v1 import llm_pb2, llm_pb2_grpc

pytestmark = pytest.mark.integration


@pytest.mark.slow
async def test_prepare_converts_the_gguf_publishes_it_once_and_the_tier_serves_it(tmp_path):
    registry = Registry(tmp_path / "models")
    published = prepare(registry)
    assert published.name == MODEL_NAME and published.version == "1.0.0"
    assert published.metadata["source"]["file_sha256"] == file_sha256(source_gguf())
    parameters = published.metadata["parameters"]
    assert parameters["context_length"] == 8192 and parameters["dtype"] == "float32"
    assert parameters["conversion"]["from"] == "GGUF Q4_1"
    assert published.metadata["metrics"]["reload_max_abs_logit_difference"] <= 1e-4
    assert prepare(registry) == published  # idempotent: nothing converted or published again

    config = tier_config(LlmConfig, kv_cache_gib=0.5)
    async with (
        serving_in_process(LlmTier(config, registry=registry), config) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        question = llm_pb2.ChatMessage(role=llm_pb2.ROLE_USER, content="What is the capital of France?")
        response = await llm_pb2_grpc.LlmServiceStub(channel).Generate(
            llm_pb2.GenerateRequest(
                chat=llm_pb2.Chat(messages=[question]),
                sampling=llm_pb2.SamplingParams(max_tokens=24, temperature=0),
            )
        )
    assert "Paris" in response.text
    assert response.model.digest == published.digest
