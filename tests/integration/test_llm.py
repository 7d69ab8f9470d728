"""The llm tier in the real mesh, serving the converted SmolLM2 through Envoy."""

import time
import urllib.request

import grpc
import pytest

from tiermesh.llm.v1 import llm_pb2, llm_pb2_grpc

pytestmark = pytest.mark.integration
QUESTION = "In one sentence: what does the APR of a car loan tell me?"


@pytest.fixture(scope="module")
def stub(mesh):
    _, status = mesh
    with grpc.insecure_channel(status["envoy"]["grpc"]) as channel:
        yield llm_pb2_grpc.LlmServiceStub(channel)


def chat(text: str) -> llm_pb2.Chat:
    return llm_pb2.Chat(messages=[llm_pb2.ChatMessage(role=llm_pb2.ROLE_USER, content=text)])


def test_a_loan_question_gets_a_coherent_answer(stub, language_model):
    response = stub.Generate(
        llm_pb2.GenerateRequest(
            chat=chat(QUESTION), sampling=llm_pb2.SamplingParams(temperature=0, max_tokens=60)
        ),
        timeout=120,
    )
    words = response.text.lower()
    assert any(word in words for word in ("interest", "rate", "cost", "percent", "apr")), response.text
    assert response.usage.prompt_tokens > 10 and 0 < response.usage.completion_tokens <= 60
    assert response.finish_reason in (llm_pb2.FINISH_REASON_STOP, llm_pb2.FINISH_REASON_LENGTH)
    assert (response.model.name, response.model.version) == (language_model.name, language_model.version)
    assert response.time_to_first_token.ToTimedelta().total_seconds() > 0


def test_streaming_yields_the_unary_text_for_the_same_seed(stub):
    sampling = llm_pb2.SamplingParams(temperature=0.8, top_p=0.9, seed=11, max_tokens=40)
    unary = stub.Generate(llm_pb2.GenerateRequest(chat=chat(QUESTION), sampling=sampling), timeout=120)
    chunks = list(
        stub.GenerateStream(
            llm_pb2.GenerateStreamRequest(chat=chat(QUESTION), sampling=sampling), timeout=120
        )
    )
    assert len(chunks) > 1 and "".join(c.delta for c in chunks) == unary.text
    assert chunks[-1].finish_reason == unary.finish_reason and chunks[-1].usage == unary.usage


def running(status: dict) -> float:
    with urllib.request.urlopen(f"http://{status['llm']['metrics']}/metrics", timeout=5) as response:
        lines = response.read().decode().splitlines()
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("tiermesh_llm_requests_running{")
    )


def test_a_cancelled_stream_is_aborted_in_the_engine(stub, mesh):
    _, status = mesh
    stream = stub.GenerateStream(
        llm_pb2.GenerateStreamRequest(
            prompt="Tell a long story about money.", sampling=llm_pb2.SamplingParams(max_tokens=1000)
        ),
        timeout=120,
    )
    next(stream)
    assert running(status) >= 1
    stream.cancel()
    deadline = time.monotonic() + 10
    while running(status) > 0:
        assert time.monotonic() < deadline, "the engine kept generating for a cancelled call"
        time.sleep(0.1)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (llm_pb2.GenerateRequest(), "prompt: must not be empty"),
        (
            llm_pb2.GenerateRequest(prompt="hi", sampling=llm_pb2.SamplingParams(max_tokens=0)),
            "sampling.max_tokens",
        ),
        (llm_pb2.GenerateRequest(prompt="hi", sampling=llm_pb2.SamplingParams(top_p=1.5)), "sampling.top_p"),
        (llm_pb2.GenerateRequest(chat=llm_pb2.Chat(messages=[llm_pb2.ChatMessage(content="x")])), "role"),
    ],
)
def test_bad_input_through_envoy_names_the_field(stub, request_, message):
    with pytest.raises(grpc.RpcError) as raised:
        stub.Generate(request_, timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in raised.value.details()
