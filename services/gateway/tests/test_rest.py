"""The REST forms of an answer and of request errors (the routes themselves are tested through
Envoy in tests/integration/test_gateway.py)."""

import json

import grpc
import pytest

from services.gateway.config import GatewayConfig
from services.gateway.rest import create_app
from services.gateway.rest.errors import api_error_from_flow, field_path
from services.gateway.rest.protocol import AdviceOut, advice_json
from services.gateway.tests.test_flow import ScriptedTiers, ask, failure
from tiermesh.classifiers.v1 import classifiers_pb2
from tiermesh.kit.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from tiermesh.kit.testing import tier_config


@pytest.mark.parametrize(
    "tiers",
    [
        ScriptedTiers(),
        ScriptedTiers(ScoreText=failure(grpc.StatusCode.UNAVAILABLE)),
        ScriptedTiers(
            ClassifyIntent=failure(grpc.StatusCode.UNAVAILABLE),
            ExtractEntities=classifiers_pb2.ExtractEntitiesResponse(
                entities=[classifiers_pb2.Entity(label=classifiers_pb2.ENTITY_LABEL_DATE, text="March")]
            ),
        ),
    ],
    ids=["full", "bias-unchecked", "no-intent"],
)
async def test_the_json_answer_has_exactly_the_documented_shape(tiers):
    described = advice_json(await ask(tiers))
    # the document's schema (AdviceOut) adds nothing and drops nothing: every key is always present
    assert AdviceOut.model_validate(described).model_dump() == described


def test_the_fields_of_a_request_error_are_named_as_the_caller_wrote_them():
    assert field_path(("body", "messages", 0, "content")) == "messages[0].content"
    assert field_path(("body", "input", "list[str]", 3)) == "input[3]"
    assert field_path(("body", "options", "top_k")) == "options.top_k"
    assert field_path(("body",)) == ""


def test_the_openapi_document_states_this_gateways_configured_limits():
    config = tier_config(GatewayConfig, max_top_k=7, max_tokens_cap=64, max_question_chars=500)
    app = create_app(config, None, None, keys=None, limiter=None, feedback=None, store=None)
    models = app.openapi()["components"]["schemas"]
    top_k = models["AdviceOptions"]["properties"]["top_k"]["anyOf"][0]
    assert (top_k["minimum"], top_k["maximum"]) == (1, 7)
    assert models["ChatCompletionRequest"]["properties"]["max_tokens"]["anyOf"][0]["maximum"] == 64
    assert models["AdviceRequest"]["properties"]["question"]["maxLength"] == 500
    assert "repaid" in models["FeedbackRequest"]["properties"]["outcome"]["enum"]


@pytest.mark.parametrize(
    ("error", "status", "code", "retry_after"),
    [
        (ResourceExhausted("llm: RESOURCE_EXHAUSTED: at its limit"), 503, "overloaded", "1"),
        (Unavailable("retriever: UNAVAILABLE: connection refused"), 503, "upstream_unavailable", "1"),
        (DeadlineExceeded("llm: DEADLINE_EXCEEDED: late"), 504, "upstream_timeout", None),
    ],
)
def test_failures_downstream_say_whether_and_when_to_retry(error, status, code, retry_after):
    answer = api_error_from_flow(error).response()
    assert answer.status_code == status
    assert json.loads(answer.body)["error"]["code"] == code
    assert json.loads(answer.body)["error"]["param"] == str(error).split(":", 1)[0]
    assert answer.headers.get("retry-after") == retry_after
