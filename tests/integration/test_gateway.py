"""The gateway tier in the real mesh: its REST API and gRPC AdvisorService through Envoy, answered
by the real classifiers, embedder, retriever, llm (SmolLM2) and bias tiers.

Generation is slow on CPU, so every generating request asks for a few greedy, seeded tokens, and
as few requests generate as the checks allow (out-of-scope questions never reach the llm).
"""

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import openai
import pytest
import redis

from services.gateway import prompt
from tests.integration.gateway import local_gateway, rest_client
from tiermesh.classifiers.v1 import classifiers_pb2, classifiers_pb2_grpc
from tiermesh.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from tiermesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tiermesh.kit.contract import REPO_ROOT
from tiermesh.kit.testing import run_cli

pytestmark = pytest.mark.integration

QUESTIONS = REPO_ROOT / "services" / "retriever" / "knowledge" / "questions.jsonl"
# Checked by hand: its document comes back first, well ahead of the next (by ~0.27 in score), and
# the intent (refinancing) is confident.
QUESTION = "What if the appraisal on my refinance comes in lower than I expected?"
OUT_OF_SCOPE = "What's a good recipe for banana bread?"
GENERATION = {"max_tokens": 12, "temperature": 0, "seed": 7}
TIERS = {"gateway", "classifiers", "embedder", "retriever", "llm", "bias"}
HOPS = {
    ("classifiers", "ClassifyIntent"),
    ("classifiers", "ExtractEntities"),
    ("embedder", "Embed"),
    ("retriever", "Search"),
    ("llm", "Generate"),
    ("bias", "ScoreText"),
}
SECRET = re.compile(r"\btm_(k_[0-9a-f]{10})_[A-Za-z0-9_-]{43}")


def error_of(response: httpx.Response) -> dict:
    """The `error` member of a JSON error response (asserting its shape)."""
    assert response.headers["content-type"].startswith("application/json"), response.text
    error = response.json()["error"]
    assert set(error) == {"code", "message", "param", "type"}, error
    return error


def events(response: httpx.Response) -> list[tuple[str, dict]]:
    """The Server-Sent Events of a response: (event name, JSON data)."""
    assert response.headers["content-type"].startswith("text/event-stream"), response.headers
    found = []
    for block in response.text.strip().split("\n\n"):
        name, data = "message", []
        for line in block.splitlines():
            if line.startswith("event:"):
                name = line.removeprefix("event:").strip()
            elif line.startswith("data:"):
                data.append(line.removeprefix("data:").strip())
        found.append((name, json.loads("\n".join(data))))
    return found


def create_key(
    store_url: str, name: str, *, requests: int = 600, tokens: int = 10_000_000
) -> tuple[str, str]:
    """A new API key made with `tiermesh keys create`: (secret, key id)."""
    result = run_cli(
        {**os.environ, "REDIS_URL": store_url},
        "keys", "create", "--name", name,
        "--requests-per-minute", str(requests), "--tokens-per-minute", str(tokens),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    found = SECRET.search(result.stdout)
    assert found, result.stdout
    return found.group(0), found.group(1)


@pytest.fixture(scope="module")
def status(mesh):
    return mesh[1]


@pytest.fixture(scope="module")
def store_url(status):
    return status["store"]["url"]


@pytest.fixture(scope="module")
def secret(store_url):
    """An API key with generous limits."""
    return create_key(store_url, "integration")[0]


@pytest.fixture(scope="module")
def api(status, secret):
    """An httpx client on Envoy's REST listener, with the key."""
    with rest_client(status, secret) as client:
        yield client


@pytest.fixture(scope="module")
def anonymous(status):
    with rest_client(status) as client:
        yield client


@pytest.fixture(scope="module")
def channel(status):
    with grpc.insecure_channel(status["envoy"]["grpc"]) as opened:
        yield opened


def advise(api: httpx.Client, question: str, **extra) -> httpx.Response:
    return api.post("/v1/advice", json={"question": question, "options": GENERATION, **extra})


# -- the answer ----------------------------------------------------------------------------------


def test_the_question_is_answered_from_its_document(
    api,
    channel,
    embedding_model,
    knowledge_index,
    language_model,
    classifier_models,
    bias_text_model,
):
    expected = {json.loads(line)["question"]: json.loads(line)["doc_id"] for line in QUESTIONS.open()}
    doc_id = expected[QUESTION]
    intent = classifiers_pb2_grpc.ClassifiersServiceStub(channel).ClassifyIntent(
        classifiers_pb2.ClassifyIntentRequest(text=QUESTION), timeout=10
    )

    response = advise(api, QUESTION)

    assert response.status_code == 200, response.text
    advice = response.json()
    assert advice["text"].strip() and not advice["out_of_scope"] and not advice["cached"]
    assert doc_id in [source["doc_id"] for source in advice["sources"]], advice["sources"]
    assert len(advice["sources"]) == 4  # the gateway's default top_k
    assert advice["intent"]["label"] == intent.intent.label == "refinancing"
    assert advice["bias"]["status"] == "checked" and advice["bias"]["unchecked_reason"] == ""
    assert advice["bias"]["score"] is not None and advice["bias"]["flagged"] is not None
    assert advice["degraded"] == []
    assert re.fullmatch(r"[0-9a-f]{32}", advice["trace_id"]) and advice["trace_id"] != "0" * 32
    assert response.headers["x-trace-id"] == advice["trace_id"]
    assert advice["response_id"].startswith("resp_")
    assert 0 < advice["usage"]["completion_tokens"] <= GENERATION["max_tokens"]
    assert advice["usage"]["prompt_tokens"] > 0

    versions = advice["versions"]
    assert {v["tier"] for v in versions} == TIERS
    for version in versions:
        assert version["version"] and version["digest"].startswith("sha256:"), version
        assert version["arm"] == "control", version
    served = {(v["model"], v["version"], v["digest"]) for v in versions}
    for model in (
        embedding_model,
        knowledge_index,
        language_model,
        classifier_models["intent"],
        classifier_models["ner"],
        bias_text_model,
    ):
        assert (model.name, model.version, model.digest) in served, (model.name, versions)

    timings = advice["timings"]
    assert {(t["tier"], t["rpc"]) for t in timings} == HOPS and len(timings) == len(HOPS)
    assert all(t["status"] == "OK" and t["ms"] > 0 for t in timings), timings
    assert advice["total_ms"] >= max(t["ms"] for t in timings)


def test_streaming_and_unary_answers_agree_over_rest_and_grpc(api, channel):
    unary = advise(api, QUESTION)
    assert unary.status_code == 200, unary.text
    text = unary.json()["text"]
    assert text.strip()

    streamed = advise(api, QUESTION, stream=True)
    assert streamed.status_code == 200, streamed.text
    found = events(streamed)
    names = [name for name, _ in found]
    assert names[-1] == "advice" and set(names[:-1]) == {"chunk"} and len(names) > 2, names
    chunks = "".join(data["text"] for name, data in found if name == "chunk")
    final = found[-1][1]
    assert chunks == final["text"] == text
    assert final["response_id"] != unary.json()["response_id"]
    assert {(t["tier"], t["rpc"]) for t in final["timings"]} == HOPS - {("llm", "Generate")} | {
        ("llm", "GenerateStream")
    }

    advisor = gateway_pb2_grpc.AdvisorServiceStub(channel)
    options = gateway_pb2.AdviseOptions(**GENERATION)
    answer = advisor.Advise(gateway_pb2.AdviseRequest(question=QUESTION, options=options), timeout=120)
    assert answer.advice.text == text
    assert answer.advice.bias.status == gateway_pb2.BIAS_CHECK_STATUS_CHECKED
    messages = list(
        advisor.AdviseStream(gateway_pb2.AdviseStreamRequest(question=QUESTION, options=options), timeout=120)
    )
    assert [m.WhichOneof("event") for m in messages][-1] == "advice"
    assert all(m.WhichOneof("event") == "chunk" for m in messages[:-1])
    assert "".join(m.chunk.text for m in messages[:-1]) == messages[-1].advice.text == text


def test_the_openai_client_chats_embeds_and_lists_models(secret, channel, status):
    client = openai.OpenAI(
        base_url=f"http://{status['envoy']['http']}/v1", api_key=secret, max_retries=0, timeout=120
    )
    messages = [{"role": "user", "content": QUESTION}]
    sampling = {"max_tokens": GENERATION["max_tokens"], "temperature": 0, "seed": GENERATION["seed"]}

    completion = client.chat.completions.create(model="tiermesh-advisor", messages=messages, **sampling)
    content = completion.choices[0].message.content
    assert content.strip() and completion.id.startswith("chatcmpl-resp_")
    assert completion.model == "tiermesh-advisor" and completion.choices[0].finish_reason in (
        "stop",
        "length",
    )
    assert completion.usage.prompt_tokens > 0 and completion.usage.completion_tokens > 0
    assert (
        completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    )
    sources = completion.model_extra["sources"]
    assert sources and {"doc_id", "title", "section", "score"} <= set(sources[0])

    stream = client.chat.completions.create(
        model="tiermesh-advisor",
        messages=messages,
        stream=True,
        stream_options={"include_usage": True},
        **sampling,
    )
    chunks = list(stream)
    deltas = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert deltas == content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")

    texts = ["What is an APR?", "Can I refinance a car loan?"]
    embeddings = client.embeddings.create(model="all-minilm-l6-v2", input=texts)  # sent as base64
    embedder = embedder_pb2_grpc.EmbedderServiceStub(channel)
    assert [item.index for item in embeddings.data] == [0, 1]
    for text, item in zip(texts, embeddings.data, strict=True):
        direct = embedder.Embed(embedder_pb2.EmbedRequest(text=text), timeout=10).embedding.values
        assert len(item.embedding) == len(direct) == 384
        np.testing.assert_allclose(item.embedding, direct, atol=1e-5)
    assert embeddings.usage.prompt_tokens > 0
    floats = client.embeddings.create(model="all-minilm-l6-v2", input=texts[0], encoding_format="float")
    np.testing.assert_allclose(floats.data[0].embedding, embeddings.data[0].embedding, atol=1e-6)

    assert {model.id for model in client.models.list()} == {"tiermesh-advisor", "all-minilm-l6-v2"}

    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=4)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="text-embedding-3-small", input="hi")


def test_an_out_of_scope_question_is_refused_without_the_llm(api, channel):
    intent = classifiers_pb2_grpc.ClassifiersServiceStub(channel).ClassifyIntent(
        classifiers_pb2.ClassifyIntentRequest(text=OUT_OF_SCOPE), timeout=10
    )
    assert intent.intent.label == "out_of_scope" and not intent.intent.low_confidence

    response = advise(api, OUT_OF_SCOPE)

    assert response.status_code == 200, response.text
    advice = response.json()
    gateway = next(v for v in advice["versions"] if v["tier"] == "gateway")
    assert advice["out_of_scope"] is True
    assert advice["text"] == prompt.load(gateway["version"]).refusal
    assert advice["intent"]["label"] == "out_of_scope"
    assert advice["sources"] == [] and advice["usage"] == {"prompt_tokens": 0, "completion_tokens": 0}
    assert "llm" not in {t["tier"] for t in advice["timings"]}
    assert "retriever" not in {t["tier"] for t in advice["timings"]}
    assert "llm" not in {v["tier"] for v in advice["versions"]}
    assert advice["bias"]["status"] == "checked"  # the refusal is scored like any advice


# -- keys and limits -----------------------------------------------------------------------------


def test_requests_need_a_valid_unrevoked_key(anonymous, store_url):
    missing = anonymous.get("/v1/models")
    assert missing.status_code == 401 and error_of(missing)["code"] == "missing_api_key"
    assert missing.headers["www-authenticate"] == "Bearer"
    for wrong in ("not-a-key", "tm_k_0123456789_" + "A" * 43):
        refused = anonymous.get("/v1/models", headers={"Authorization": f"Bearer {wrong}"})
        assert refused.status_code == 401 and error_of(refused)["code"] == "invalid_api_key"
    refused = anonymous.post(
        "/v1/advice", json={"question": OUT_OF_SCOPE}, headers={"Authorization": "Bearer tm_nope"}
    )
    assert refused.status_code == 401 and error_of(refused)["code"] == "invalid_api_key"

    secret, key_id = create_key(store_url, "to-revoke")
    assert anonymous.get("/v1/models", headers={"Authorization": f"Bearer {secret}"}).status_code == 200
    assert anonymous.get("/v1/models", headers={"X-API-Key": secret}).status_code == 200
    result = run_cli({**os.environ, "REDIS_URL": store_url}, "keys", "revoke", key_id)
    assert result.returncode == 0, result.stderr
    revoked = anonymous.get("/v1/models", headers={"Authorization": f"Bearer {secret}"})
    assert revoked.status_code == 401 and error_of(revoked)["code"] == "invalid_api_key"

    assert anonymous.get("/healthz").status_code == 200
    assert anonymous.get("/healthz").json() == {"status": "ok"}


def test_a_key_over_its_request_limit_is_told_when_to_retry(anonymous, store_url):
    secret, key_id = create_key(store_url, "two-a-minute", requests=2)
    headers = {"Authorization": f"Bearer {secret}"}
    assert [anonymous.get("/v1/models", headers=headers).status_code for _ in range(2)] == [200, 200]

    refused = anonymous.get("/v1/models", headers=headers)

    assert refused.status_code == 429
    error = error_of(refused)
    assert error["code"] == "rate_limit_exceeded" and "requests_per_minute" in error["message"]
    assert key_id in error["message"]
    assert refused.headers["retry-after"].isdigit() and 1 <= int(refused.headers["retry-after"]) <= 61


def test_a_key_over_its_token_limit_is_refused_after_generating(anonymous, store_url):
    secret, _ = create_key(store_url, "few-tokens", tokens=50)
    headers = {"Authorization": f"Bearer {secret}"}
    body = {"question": QUESTION, "options": {**GENERATION, "max_tokens": 4}}
    first = anonymous.post("/v1/advice", json=body, headers=headers)
    assert first.status_code == 200, first.text
    assert sum(first.json()["usage"].values()) > 50  # the whole prompt is charged

    refused = anonymous.get("/v1/models", headers=headers)

    assert refused.status_code == 429
    error = error_of(refused)
    assert error["code"] == "rate_limit_exceeded" and "tokens_per_minute" in error["message"], error
    assert refused.headers["retry-after"].isdigit() and int(refused.headers["retry-after"]) >= 1


# -- bad input -----------------------------------------------------------------------------------

ADVICE = "/v1/advice"
CHAT = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"
FEEDBACK = "/v1/feedback"
EMBEDDER = "all-minilm-l6-v2"
INVALID = "invalid_request"


def _chat(**fields) -> dict:
    return {"model": "tiermesh-advisor", "messages": [{"role": "user", "content": OUT_OF_SCOPE}], **fields}


@pytest.mark.parametrize(
    ("path", "body", "http_status", "code", "param"),
    [
        (ADVICE, {"question": "hi", "options": {"top_k": "5"}}, 422, INVALID, "options.top_k"),
        (ADVICE, {"question": "hi", "options": {"top_k": 0}}, 422, INVALID, "options.top_k"),
        (ADVICE, {"question": "hi", "options": {"top_k": 11}}, 422, INVALID, "options.top_k"),
        (ADVICE, {"question": "hi", "options": {"max_tokens": 0}}, 422, INVALID, "options.max_tokens"),
        (ADVICE, {"question": "hi", "options": {"max_tokens": 5000}}, 422, INVALID, "options.max_tokens"),
        (ADVICE, {"question": "hi", "options": {"temperature": 3}}, 422, INVALID, "options.temperature"),
        (ADVICE, {"question": "hi", "options": {"tokens": 3}}, 422, INVALID, "options.tokens"),
        (ADVICE, {"question": ""}, 422, INVALID, "question"),
        (ADVICE, {"question": "   \n"}, 422, INVALID, "question"),
        (ADVICE, {"question": "Is my loan too big? " * 101}, 422, INVALID, "question"),
        (ADVICE, {"question": 42}, 422, INVALID, "question"),
        (ADVICE, {"options": {}}, 422, INVALID, "question"),
        (ADVICE, {"question": "hi", "user_id": "u" * 129}, 422, INVALID, "user_id"),
        (ADVICE, [{"question": "hi"}], 400, "invalid_json", None),
        (CHAT, _chat(max_tokens=0), 422, INVALID, "max_tokens"),
        (CHAT, _chat(max_tokens=5000), 422, INVALID, "max_tokens"),
        (CHAT, _chat(max_completion_tokens=5000), 422, INVALID, "max_completion_tokens"),
        (CHAT, _chat(temperature=2.5), 422, INVALID, "temperature"),
        (CHAT, _chat(n=2), 422, INVALID, "n"),
        (CHAT, _chat(messages=[]), 422, INVALID, "messages"),
        (CHAT, _chat(messages=[{"role": "system", "content": "Be brief."}]), 422, INVALID, "messages"),
        (CHAT, _chat(messages=[{"role": "user", "content": "  "}]), 422, INVALID, "messages"),
        (CHAT, _chat(model="gpt-4o"), 404, "model_not_found", "model"),
        (EMBEDDINGS, {"model": EMBEDDER, "input": ""}, 422, INVALID, "input"),
        (EMBEDDINGS, {"model": EMBEDDER, "input": []}, 422, INVALID, "input"),
        (EMBEDDINGS, {"model": EMBEDDER, "input": ["ok", " "]}, 422, INVALID, "input[1]"),
        (EMBEDDINGS, {"model": EMBEDDER, "input": "hi", "dimensions": 5}, 422, INVALID, "dimensions"),
        (EMBEDDINGS, {"model": "nope", "input": "hi"}, 404, "model_not_found", "model"),
        (FEEDBACK, {"response_id": "resp_x", "rating": 5}, 422, INVALID, "rating"),
        (FEEDBACK, {"response_id": "resp_x", "outcome": "loved"}, 422, INVALID, "outcome"),
    ],
)  # fmt: skip
def test_bad_input_is_a_json_error_naming_the_field(api, path, body, http_status, code, param):
    response = api.post(path, json=body)

    assert response.status_code == http_status, response.text
    error = error_of(response)
    assert (error["code"], error["param"]) == (code, param), error
    assert error["type"] == "invalid_request_error" and error["message"]
    if param:
        assert error["message"].startswith(param.split("[")[0]), error


def test_malformed_huge_and_misrouted_requests_are_json_errors(api):
    malformed = api.post(ADVICE, content=b'{"question": "hi",', headers={"content-type": "application/json"})
    assert malformed.status_code == 400 and error_of(malformed)["code"] == "invalid_json"

    huge = api.post(ADVICE, json={"question": "x" * 70_000})
    assert huge.status_code == 413
    assert error_of(huge)["code"] == "body_too_large" and "65536" in error_of(huge)["message"]

    for path in ("/v1/nothing-here", "/v2/advice"):
        unknown = api.get(path)
        assert unknown.status_code == 404 and error_of(unknown)["code"] == "not_found"
    wrong_method = api.get(ADVICE)
    assert wrong_method.status_code == 405 and error_of(wrong_method)["code"] == "method_not_allowed"


def test_a_body_over_the_limit_without_a_length_is_refused_as_too_large(api):
    body = json.dumps({"question": "x" * 70_000}).encode()

    def chunked():  # no Content-Length: the limit is found while reading
        for start in range(0, len(body), 8192):
            yield body[start : start + 8192]

    response = api.post(ADVICE, content=chunked(), headers={"content-type": "application/json"})

    assert response.status_code < 500, response.text
    assert response.status_code == 413 and error_of(response)["code"] == "body_too_large"


def test_a_seed_beyond_int64_is_refused_naming_the_field(api):
    body = {"question": QUESTION, "options": {**GENERATION, "seed": 2**63}}

    response = api.post(ADVICE, json=body)

    assert response.status_code == 422, response.text
    assert error_of(response)["param"] == "options.seed"


def test_a_question_that_is_not_valid_unicode_is_refused_naming_the_field(api):
    body = '{"question": "Can I refinance my car loan?\\ud800", "options": {"max_tokens": 4}}'

    response = api.post(ADVICE, content=body.encode(), headers={"content-type": "application/json"})

    assert response.status_code == 422, response.text
    assert error_of(response)["param"] == "question"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (EMBEDDINGS, {"model": "all-minilm-l6-v2", "input": "word " * 2000}, "input"),
        (ADVICE, {"question": QUESTION, "filters": {"colour": "blue"}, "options": GENERATION}, "filters"),
    ],
)
def test_a_request_a_tier_refuses_names_the_callers_field(api, path, body, param):
    response = api.post(path, json=body)

    assert response.status_code == 422, response.text
    error = error_of(response)
    assert error["param"] == param


# -- feedback --------------------------------------------------------------------------------------


def test_feedback_on_an_answer_lands_in_the_store_with_its_versions(api, store_url):
    advice = advise(api, OUT_OF_SCOPE, user_id="user-feedback")
    assert advice.status_code == 200, advice.text
    response_id = advice.json()["response_id"]
    chat = api.post(CHAT, json=_chat(max_tokens=8, user="user-feedback"))
    assert chat.status_code == 200, chat.text
    completion_id = chat.json()["id"]
    assert completion_id.startswith("chatcmpl-resp_")

    given = api.post(
        "/v1/feedback",
        json={"response_id": response_id, "rating": 1, "outcome": "accepted", "comment": "clear"},
    )
    on_chat = api.post("/v1/feedback", json={"response_id": completion_id, "rating": -0.5})

    assert given.status_code == 201, given.text
    assert given.json()["response_id"] == response_id and given.json()["feedback_id"]
    assert on_chat.status_code == 201, on_chat.text
    assert on_chat.json()["response_id"] == completion_id.removeprefix("chatcmpl-")
    with redis.Redis.from_url(store_url, decode_responses=True) as store:
        entries = dict(store.xrevrange("tiermesh:feedback", count=200))
    entry = entries[given.json()["feedback_id"]]
    assert entry["response_id"] == response_id and float(entry["rating"]) == 1.0
    assert (entry["outcome"], entry["comment"], entry["user_id"]) == ("accepted", "clear", "user-feedback")
    assert entry["out_of_scope"] == "1" and entry["intent"] == "out_of_scope"
    versions = json.loads(entry["versions"])
    assert {v["tier"] for v in versions} == {"gateway", "classifiers", "embedder", "bias"}
    assert all(v["version"] for v in versions)
    chat_entry = entries[on_chat.json()["feedback_id"]]
    assert chat_entry["response_id"] == completion_id.removeprefix("chatcmpl-")
    assert float(chat_entry["rating"]) == -0.5 and json.loads(chat_entry["versions"])

    unknown = api.post("/v1/feedback", json={"response_id": "resp_" + "0" * 32, "rating": 1})
    assert unknown.status_code == 404
    assert (error_of(unknown)["code"], error_of(unknown)["param"]) == ("response_not_found", "response_id")
    out_of_range = api.post("/v1/feedback", json={"response_id": response_id, "rating": 5})
    assert out_of_range.status_code == 422 and error_of(out_of_range)["param"] == "rating"


# -- health and docs -----------------------------------------------------------------------------


def test_readyz_reports_every_dependency_serving(anonymous):
    response = anonymous.get("/readyz")

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ready"
    assert body["checks"] == {
        name: "SERVING" for name in ("embedder", "retriever", "llm", "classifiers", "bias", "store")
    }


def test_the_openapi_document_and_docs_are_served(anonymous):
    document = anonymous.get("/openapi.json")
    assert document.status_code == 200
    paths = document.json()["paths"]
    assert {
        "/healthz",
        "/readyz",
        "/v1/advice",
        "/v1/feedback",
        "/v1/models",
        "/v1/chat/completions",
        "/v1/embeddings",
    } <= set(paths)
    assert "post" in paths["/v1/advice"] and "get" in paths["/v1/models"]
    docs = anonymous.get("/docs")
    assert docs.status_code == 200 and docs.headers["content-type"].startswith("text/html")
    assert "<html" in docs.text.lower() and "/openapi.json" in docs.text


async def test_a_user_id_that_cannot_be_a_header_is_refused_not_hung(status):
    async with (
        local_gateway(status) as (url, secret),
        httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {secret}"}) as client,
    ):
        plain = await client.post(ADVICE, json={"question": OUT_OF_SCOPE, "user_id": "user-1"}, timeout=30)
        assert plain.status_code == 200, plain.text
        for user_id in ("zoë", "a\nb", "a\u0000b", "\ud800"):
            # it would travel downstream as a header (x-tiermesh-user): refused, never hung
            body = json.dumps({"question": OUT_OF_SCOPE, "user_id": user_id})  # "\ud800" escaped
            response = await client.post(
                ADVICE, content=body, headers={"content-type": "application/json"}, timeout=5
            )
            assert response.status_code == 422, response.text
            assert error_of(response)["param"] == "user_id"


async def test_a_fuzz_of_the_openapi_document_finds_no_server_error(status, tmp_path):
    async with local_gateway(status, max_tokens_cap=8, default_max_tokens=8) as (url, secret):
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {secret}"}) as client:
            answered = await client.post(ADVICE, json={"question": OUT_OF_SCOPE}, timeout=30)
        assert answered.status_code == 200, answered.text
        # Fields pinned to valid values: the models (else nearly every request is a 404) and an
        # answer to rate (else every feedback is a 404).
        config = tmp_path / "schemathesis.toml"
        config.write_text(
            f"""
[[operations]]
include-path = "/v1/chat/completions"
parameters = {{ "body.model" = "tiermesh-advisor" }}

[[operations]]
include-path = "/v1/embeddings"
parameters = {{ "body.model" = "all-minilm-l6-v2" }}

[[operations]]
include-path = "/v1/feedback"
parameters = {{ "body.response_id" = "{answered.json()["response_id"]}" }}
"""
        )
        command = [
            sys.executable, "-m", "schemathesis.cli",
            "--config-file", str(config),
            "run", f"{url}/openapi.json",
            "--header", f"Authorization: Bearer {secret}",
            "--checks", "not_a_server_error",
            "--max-examples", "15",
            "--seed", "20251123",
            "--request-timeout", "30",
            "--workers", "1",
            "--generation-database", "none",
            "--no-color",
        ]  # fmt: skip
        result = await asyncio.to_thread(
            subprocess.run, command, capture_output=True, text=True, timeout=240, check=False
        )

    assert result.returncode == 0, result.stdout[-20_000:] + result.stderr[-5_000:]
    assert " passed" in result.stdout, result.stdout


@pytest.mark.slow
def test_personal_data_in_questions_never_reaches_the_gateway_log(api, status):
    email, phone, account = "jane.doe@example.com", "(415) 555-0134", "4111 1111 1111 1111"
    question = f"My email is {email}, call {phone}; why was card {account} declined for a recipe?"
    for body in ({"question": question}, {"question": question, "options": {"top_k": 99}}):
        response = api.post(ADVICE, json=body)
        assert response.status_code in (200, 422), response.text
    log = Path(status["gateway"]["log"]).read_text(encoding="utf-8")
    assert '"POST /v1/advice' in log  # the requests were logged ...
    for raw in (email, phone, account):
        assert raw not in log  # ... without the personal data


def test_tiermesh_trace_draws_one_answers_path_through_every_tier_and_envoy_hop(api, mesh):
    response = advise(api, QUESTION)
    assert response.status_code == 200, response.text
    trace_id = response.json()["trace_id"]
    for _ in range(50):  # the REST spans end just after the response is sent; Envoy's are batched
        shown = run_cli(mesh[0].environ, "trace", trace_id)
        if "envoy gateway REST (server)" in shown.stdout and "POST /v1/advice (server)" in shown.stdout:
            break
        time.sleep(0.2)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    # Envoy's REST listener starts the trace; the gateway's REST span continues it
    assert lines[1].split()[4] == "envoy" and lines[1].endswith("envoy gateway REST (server)")
    assert lines[2].split()[4] == "tiermesh-gateway" and lines[2].endswith("POST /v1/advice (server)")
    for service, rpc in (
        ("classifiers", "ClassifiersService/ClassifyIntent"),
        ("embedder", "EmbedderService/Embed"),
        ("retriever", "RetrieverService/Search"),
        ("llm", "LlmService/Generate"),
        ("bias", "BiasService/ScoreText"),
    ):
        # the gateway's call, under it Envoy's hop, under that the tier's own span
        client = next(i for i, line in enumerate(lines) if line.endswith(f"{rpc} (client)"))
        assert lines[client + 1].split()[4] == "envoy" and lines[client + 1].endswith(
            f"envoy {service} (server)"
        )
        assert f"tiermesh-{service}" in lines[client + 2] and lines[client + 2].endswith(f"{rpc} (server)")
    missing = run_cli(mesh[0].environ, "trace", "0" * 32)
    assert missing.returncode == 1 and "no spans of trace" in missing.stderr


# -- A/B arms (the mesh runs an A/A treatment of bias and of the gateway) --------------------------


def test_the_answer_reports_the_arm_of_every_tier_that_served_it(api, mesh):
    env = mesh[0].environ
    assert run_cli(env, "traffic", "set", "bias", "treatment=100").returncode == 0
    try:
        advice = advise(api, QUESTION, user_id="arm-check").json()
    finally:
        assert run_cli(env, "traffic", "set", "bias", "treatment=0").returncode == 0
    arms = {version["tier"]: version["arm"] for version in advice["versions"]}
    assert arms["bias"] == "treatment" and arms["llm"] == arms["embedder"] == "control", arms
    assert advice["bias"]["status"] == "checked"


def test_a_gateway_shift_leaves_a_stream_in_flight_on_its_arm(mesh, channel):
    env = mesh[0].environ
    stub = gateway_pb2_grpc.AdvisorServiceStub(channel)
    request = gateway_pb2.AdviseStreamRequest(
        question=QUESTION, user_id="streamer", options=gateway_pb2.AdviseOptions(max_tokens=48)
    )
    stream = stub.AdviseStream(request, timeout=120)
    assert dict(stream.initial_metadata())["x-tiermesh-arm"] == "control"
    first = next(stream)
    shifted = run_cli(env, "traffic", "set", "gateway", "treatment=100")
    try:
        assert shifted.returncode == 0, shifted.stderr
        rest = list(stream)  # the stream goes on, on the arm it started on, to its final answer
        assert stream.code() == grpc.StatusCode.OK
        assert rest and rest[-1].WhichOneof("event") == "advice", (first, rest[-1])
        _, call = stub.Advise.with_call(
            gateway_pb2.AdviseRequest(question=QUESTION, user_id="streamer", options=request.options),
            timeout=120,
        )
        assert dict(call.initial_metadata())["x-tiermesh-arm"] == "treatment"  # new calls: the new split
    finally:
        assert run_cli(env, "traffic", "set", "gateway", "treatment=0").returncode == 0
