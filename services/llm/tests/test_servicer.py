"""LlmService through its gRPC interface, served in-process by vLLM on a tiny random Llama."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.llm.config import LlmConfig
from services.llm.servicer import LlmTier
from services.llm.tests.conftest import TINY_MODEL, tiny_config
from tiermesh.kit.server import TierServer
from tiermesh.kit.testing import health_while
from tiermesh.llm.v1 import llm_pb2, llm_pb2_grpc

SERVICE = "tiermesh.llm.v1.LlmService"
USER = llm_pb2.ROLE_USER


def chat(*turns: tuple[int, str]) -> llm_pb2.Chat:
    return llm_pb2.Chat(messages=[llm_pb2.ChatMessage(role=role, content=text) for role, text in turns])


@pytest_asyncio.fixture(loop_scope="session")
async def stub(llm_server):
    async with grpc.aio.insecure_channel(llm_server.address) as channel:
        yield llm_pb2_grpc.LlmServiceStub(channel)


async def stream_all(stub, request: llm_pb2.GenerateStreamRequest) -> list[llm_pb2.GenerateStreamResponse]:
    return [chunk async for chunk in stub.GenerateStream(request)]


async def wait_until_idle(tier: LlmTier, timeout: float = 5.0) -> float:
    """Seconds until the engine's scheduler holds no running or waiting request."""
    assert tier.engine is not None
    started = time.perf_counter()
    while (load := tier.engine.load()).running or load.waiting:
        assert time.perf_counter() - started < timeout, f"engine still busy: {load}"
        await asyncio.sleep(0.02)
    return time.perf_counter() - started


async def test_generate_returns_text_usage_timing_and_model(stub, tiny_model, tiny_tokenizer):
    prompt = "Can I afford a car loan?"
    response = await stub.Generate(
        llm_pb2.GenerateRequest(prompt=prompt, sampling=llm_pb2.SamplingParams(max_tokens=12, temperature=0))
    )
    assert response.text
    assert response.usage.prompt_tokens == len(tiny_tokenizer(prompt).input_ids)
    assert 1 <= response.usage.completion_tokens <= 12
    if response.finish_reason == llm_pb2.FINISH_REASON_LENGTH:
        assert response.usage.completion_tokens == 12
    else:  # random weights may pick the end-of-sequence token
        assert response.finish_reason == llm_pb2.FINISH_REASON_STOP
    assert 0 < response.time_to_first_token.ToTimedelta().total_seconds() < 10
    assert (response.model.name, response.model.version, response.model.digest) == (
        TINY_MODEL,
        tiny_model.version,
        tiny_model.digest,
    )


async def test_max_tokens_defaults_to_the_configured_default(stub):
    response = await stub.Generate(llm_pb2.GenerateRequest(prompt="Hello", sampling={"temperature": 0}))
    assert response.usage.completion_tokens <= 16  # tiny_config's default_max_tokens


async def test_stream_equals_unary_for_the_same_seed(stub):
    sampling = llm_pb2.SamplingParams(max_tokens=40, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    unary = await stub.Generate(
        llm_pb2.GenerateRequest(chat=chat((USER, "Tell me a story")), sampling=sampling)
    )
    chunks = await stream_all(
        stub, llm_pb2.GenerateStreamRequest(chat=chat((USER, "Tell me a story")), sampling=sampling)
    )
    assert "".join(c.delta for c in chunks) == unary.text
    *body, last = chunks
    assert len(body) >= 1
    assert all(c.finish_reason == llm_pb2.FINISH_REASON_UNSPECIFIED and not c.HasField("usage") for c in body)
    assert last.finish_reason == unary.finish_reason and last.usage == unary.usage
    assert last.HasField("time_to_first_token")
    assert all(c.model.version == unary.model.version for c in chunks)


async def test_a_different_seed_gives_different_text(stub):
    texts = set()
    for seed in (1, 2):
        sampling = llm_pb2.SamplingParams(max_tokens=30, temperature=1.0, seed=seed)
        texts.add((await stub.Generate(llm_pb2.GenerateRequest(prompt="Once", sampling=sampling))).text)
    assert len(texts) == 2


async def test_chat_is_rendered_with_the_models_chat_template(stub, tiny_tokenizer):
    turns = [
        {"role": "system", "content": "You advise on loans."},
        {"role": "user", "content": "What is APR?"},
    ]
    rendered = tiny_tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    assert rendered.startswith("<|im_start|>system\nYou advise on loans.<|im_end|>")
    assert rendered.endswith("<|im_start|>assistant\n")
    greedy = llm_pb2.SamplingParams(max_tokens=20, temperature=0)
    from_chat = await stub.Generate(
        llm_pb2.GenerateRequest(
            chat=chat((llm_pb2.ROLE_SYSTEM, turns[0]["content"]), (USER, turns[1]["content"])),
            sampling=greedy,
        )
    )
    from_prompt = await stub.Generate(llm_pb2.GenerateRequest(prompt=rendered, sampling=greedy))
    assert from_chat.usage.prompt_tokens == len(tiny_tokenizer(rendered, add_special_tokens=False).input_ids)
    assert from_chat.usage == from_prompt.usage and from_chat.text == from_prompt.text


async def test_a_stop_sequence_ends_the_text_before_it(stub):
    greedy = llm_pb2.SamplingParams(max_tokens=24, temperature=0)
    full = (await stub.Generate(llm_pb2.GenerateRequest(prompt="Loans", sampling=greedy))).text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    greedy.stop.append(stop)
    stopped = await stub.Generate(llm_pb2.GenerateRequest(prompt="Loans", sampling=greedy))
    assert stopped.finish_reason == llm_pb2.FINISH_REASON_STOP
    assert stopped.text == full[: full.index(stop)]


async def test_generation_stops_when_the_context_window_is_full(stub, tiny_tokenizer):
    prompt = "loan " * 2030
    prompt_tokens = len(tiny_tokenizer(prompt).input_ids)
    assert 2000 < prompt_tokens < 2048
    response = await stub.Generate(
        llm_pb2.GenerateRequest(prompt=prompt, sampling=llm_pb2.SamplingParams(max_tokens=100, temperature=0))
    )
    assert response.usage.prompt_tokens == prompt_tokens
    assert response.usage.completion_tokens <= 2048 - prompt_tokens
    if response.finish_reason == llm_pb2.FINISH_REASON_LENGTH:
        assert response.usage.completion_tokens == 2048 - prompt_tokens


def _sampling(**fields) -> llm_pb2.GenerateRequest:
    return llm_pb2.GenerateRequest(prompt="hi", sampling=llm_pb2.SamplingParams(**fields))


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (llm_pb2.GenerateRequest(), "prompt: must not be empty"),
        (llm_pb2.GenerateRequest(prompt="  \n"), "prompt: must not be empty"),
        (llm_pb2.GenerateRequest(chat=llm_pb2.Chat()), "chat.messages: needs at least 1 item"),
        (
            llm_pb2.GenerateRequest(chat=chat(*[(USER, "a")] * 5)),
            "chat.messages: has 5 items; the limit is 4",
        ),
        (
            llm_pb2.GenerateRequest(chat=chat((llm_pb2.ROLE_UNSPECIFIED, "hi"))),
            "chat.messages[0].role: must be ROLE_SYSTEM",
        ),
        (
            llm_pb2.GenerateRequest(chat=chat((USER, "hi"), (7, "hi"))),
            "chat.messages[1].role: must be ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT, got 7",
        ),
        (
            llm_pb2.GenerateRequest(chat=chat((USER, "hi"), (USER, ""))),
            "chat.messages[1].content: must not be empty",
        ),
        (llm_pb2.GenerateRequest(prompt="x" * 20_001), "prompt: is 20001 characters; the limit is 20000"),
        (_sampling(max_tokens=0), "sampling.max_tokens: must be between 1 and 1500, got 0"),
        (_sampling(max_tokens=-3), "sampling.max_tokens: must be between 1 and 1500, got -3"),
        (_sampling(max_tokens=1501), "sampling.max_tokens: must be between 1 and 1500, got 1501"),
        (_sampling(temperature=-0.5), "sampling.temperature: must be >= 0, got -0.5"),
        (_sampling(temperature=float("nan")), "sampling.temperature: must be >= 0, got nan"),
        (_sampling(top_p=0), "sampling.top_p: must be in (0, 1], got 0"),
        (_sampling(top_p=1.5), "sampling.top_p: must be in (0, 1], got 1.5"),
        (_sampling(top_k=0), "sampling.top_k: must be >= 1, got 0"),
        (_sampling(repetition_penalty=0), "sampling.repetition_penalty: must be > 0, got 0"),
        (_sampling(stop=["a", "b", "c"]), "sampling.stop: has 3 items; the limit is 2"),
        (_sampling(stop=["a", ""]), "sampling.stop[1]: must not be empty"),
        (_sampling(stop=["y" * 65]), "sampling.stop[0]: is 65 characters; the limit is 64"),
        (llm_pb2.GenerateRequest(prompt="hi", model_version="9.9.9"), "model_version: this tier serves"),
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_field(stub, request_, message):
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Generate(request_)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith(message), raised.value.details()


async def test_a_prompt_longer_than_the_context_window_is_invalid_argument(stub, tiny_tokenizer):
    text = "loan " * 2100
    as_prompt = len(tiny_tokenizer(text).input_ids)
    rendered = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    as_chat = len(tiny_tokenizer(rendered, add_special_tokens=False).input_ids)
    for request, expected in (
        (llm_pb2.GenerateRequest(prompt=text), f"prompt: is {as_prompt} tokens; "),
        (
            llm_pb2.GenerateRequest(chat=chat((USER, text))),
            f"chat: is {as_chat} tokens after the chat template; ",
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Generate(request)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert raised.value.details() == (
            f"{expected}the context window is 2048 tokens and must leave room for at least 1 generated token"
        )


async def test_bad_input_to_the_stream_is_invalid_argument(stub):
    request = llm_pb2.GenerateStreamRequest(prompt="hi", sampling=llm_pb2.SamplingParams(top_p=2))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stream_all(stub, request)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith("sampling.top_p: must be in (0, 1]")


async def test_a_cancelled_stream_is_aborted_in_the_engine(stub, llm_server):
    tier = llm_server.tier
    await wait_until_idle(tier)
    request = llm_pb2.GenerateStreamRequest(prompt="Go on", sampling=llm_pb2.SamplingParams(max_tokens=1500))
    call = stub.GenerateStream(request)
    received = 0
    async for _chunk in call:
        received += 1
        if received == 3:
            break
    assert tier.engine.load().running == 1
    call.cancel()
    assert await wait_until_idle(tier) < 2.0  # well before 1500 tokens could have been generated
    follow_up = await stub.Generate(_sampling(max_tokens=2))
    assert follow_up.usage.completion_tokens >= 1


async def test_a_passed_deadline_aborts_the_request_in_the_engine(stub, llm_server):
    tier = llm_server.tier
    await wait_until_idle(tier)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Generate(_sampling(max_tokens=1500), timeout=0.5)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert await wait_until_idle(tier) < 2.0


async def test_concurrent_requests_are_batched(stub, llm_server):
    sampling = llm_pb2.SamplingParams(max_tokens=200, temperature=0)
    calls = [stub.Generate(llm_pb2.GenerateRequest(prompt=f"Loan {i}", sampling=sampling)) for i in range(4)]
    seen_running = 0
    pending = asyncio.gather(*calls)
    while not pending.done():
        seen_running = max(seen_running, llm_server.tier.engine.load().running)
        await asyncio.sleep(0.01)
    responses = await pending
    assert all(r.usage.completion_tokens >= 1 for r in responses)
    assert seen_running > 1


async def test_metrics_carry_token_counts_and_latencies_by_model_version(stub, llm_server, tiny_model):
    await stub.Generate(_sampling(max_tokens=8, temperature=0))
    with urllib.request.urlopen(f"http://127.0.0.1:{llm_server.metrics_port}/metrics") as response:
        body = response.read().decode()
    label = f'model_version="{tiny_model.version}"'
    for name in (
        "tiermesh_llm_time_to_first_token_seconds_bucket",
        "tiermesh_llm_inter_token_latency_seconds_bucket",
        "tiermesh_llm_generated_tokens_bucket",
        "tiermesh_llm_prompt_tokens_total",
        "tiermesh_llm_completion_tokens_total",
        "tiermesh_llm_requests_running",
        "tiermesh_llm_requests_waiting",
    ):
        assert any(line.startswith(name + "{") and label in line for line in body.splitlines()), name
    method = f"/{SERVICE}/Generate"
    assert f'code="OK",method="{method}",model_version="{tiny_model.version}",tier="llm"' in body


async def test_health_reports_serving(llm_server):
    async with grpc.aio.insecure_channel(llm_server.address) as channel:
        for service in ("", SERVICE):
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service)
            )
            assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_not_serving_and_unavailable_before_the_engine_is_loaded(tiny_model, llm_registry):
    config: LlmConfig = tiny_config()
    server = TierServer(LlmTier(config, registry=llm_registry), config)
    await server.start()  # the port is open; the engine is not loaded
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE)
            )
            assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await llm_pb2_grpc.LlmServiceStub(channel).Generate(llm_pb2.GenerateRequest(prompt="early"))
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(grace=0)


async def test_over_long_input_is_refused_by_size_while_health_checks_answer(llm_server):
    # 80,000 characters cannot fit 2,048 tokens at 16 characters a token: refused untokenized.
    too_long = llm_pb2.GenerateRequest(chat=chat(*[(USER, "loan " * 4_000)] * 4))
    # 20,000 characters may fit by size: tokenized (off the event loop), then refused by count.
    tokenized = llm_pb2.GenerateRequest(prompt="loan " * 4_000)
    async with grpc.aio.insecure_channel(llm_server.address) as channel:
        stub = llm_pb2_grpc.LlmServiceStub(channel)
        calls = [
            asyncio.ensure_future(stub.Generate(request, timeout=30))
            for request in [too_long] * 8 + [tokenized] * 4
        ]
        statuses = await health_while(channel, SERVICE, calls)
        errors = await asyncio.gather(*calls, return_exceptions=True)
    assert set(statuses) == {health_pb2.HealthCheckResponse.SERVING}
    assert all(isinstance(e, grpc.aio.AioRpcError) for e in errors), errors
    assert {e.code() for e in errors} == {grpc.StatusCode.INVALID_ARGUMENT}
    assert {e.details() for e in errors[:8]} == {
        "chat: is 80000 characters; the context window of 2048 tokens holds at most 32768 "
        "(LLM_MAX_CHARS_PER_TOKEN=16 per token)"
    }
    assert all(
        e.details().startswith("prompt: is 4001 tokens; the context window is 2048") for e in errors[8:]
    )
