"""The REST API's wire protocol: the request and response models (their JSON schemas are the
OpenAPI document's), and the conversions at the boundary from the flow's `gateway_pb2.Advice` to
JSON (enums as lower-case words, durations in milliseconds).

The models carry no docstrings on purpose: a docstring would become a description in the OpenAPI
document. The limits that come from the gateway's configuration are added by `openapi.py`.
"""

import dataclasses
from typing import Any, Literal

from google.protobuf import json_format
from pydantic import BaseModel, ConfigDict, Field

from services.gateway.config import GatewayConfig
from tiermesh.classifiers.v1 import classifiers_pb2
from tiermesh.gateway.v1 import gateway_pb2

ADVISOR_MODEL = "tiermesh-advisor"


@dataclasses.dataclass(frozen=True)
class JsonReply:
    """A JSON body to answer with, and the tokens to charge the caller once it is sent."""

    body: dict[str, Any]
    tokens: int


# -- advice ------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class AdviceOptions(_Strict):
    top_k: int | None = Field(None, description="passages used as context (1 to the gateway's cap)")
    max_tokens: int | None = Field(None, description="most tokens of advice (1 to the gateway's cap)")
    temperature: float | None = Field(None, description="sampling temperature, 0 to 2 (0 = greedy)")
    seed: int | None = Field(None, description="generation seed, for reproducible answers")


class AdviceRequest(_Strict):
    question: str = Field(
        description="the question, e.g. 'Can I afford a $25,000 car loan on $4,000 a month?'"
    )
    user_id: str = Field("", description="stable id of the end user: keeps their A/B arms sticky")
    options: AdviceOptions = Field(default_factory=AdviceOptions)
    filters: dict[str, str] = Field(
        default_factory=dict, description="only passages whose metadata has these values (e.g. topic)"
    )
    stream: bool = Field(False, description="answer as Server-Sent Events: chunk events, then advice")


class SourceOut(BaseModel):
    doc_id: str
    title: str
    section: str
    score: float


class IntentOut(BaseModel):
    label: str
    probability: float
    low_confidence: bool


class EntityOut(BaseModel):
    label: str
    text: str
    start: int
    end: int
    amount: float | None = None
    currency: str | None = None


class BiasOut(BaseModel):
    status: Literal["checked", "unchecked"]
    score: float | None = None
    flagged: bool | None = None
    threshold: float | None = None
    evidence: list[dict[str, Any]] = []
    unchecked_reason: str = ""


class VersionOut(BaseModel):
    tier: str
    model: str
    version: str
    digest: str
    arm: str


class TimingOut(BaseModel):
    tier: str
    rpc: str
    ms: float
    status: str


class UsageOut(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class AdviceOut(BaseModel):
    response_id: str
    text: str
    out_of_scope: bool
    cached: bool
    sources: list[SourceOut]
    intent: IntentOut | None
    entities: list[EntityOut]
    bias: BiasOut
    versions: list[VersionOut]
    degraded: list[str]
    trace_id: str
    timings: list[TimingOut]
    total_ms: float
    usage: UsageOut


class FeedbackRequest(_Strict):
    response_id: str = Field(description="the response_id of an answer (or a chat completion's id)")
    rating: float | None = Field(None, description="-1 (bad) to 1 (good)")
    outcome: str = Field("", description="what happened next, e.g. accepted, applied, approved, repaid")
    comment: str = Field("", description="free text, at most 2000 characters")


def _enum_word(enum: Any, value: int, prefix: str) -> str:
    """`TIER_LLM` -> `llm`: an enum value as the lower-case word the JSON uses."""
    return enum.Name(value).removeprefix(prefix).lower()


def advice_tokens(advice: gateway_pb2.Advice) -> int:
    """The tokens an answer costs its caller: prompt and completion."""
    return advice.usage.prompt_tokens + advice.usage.completion_tokens


def advice_json(advice: gateway_pb2.Advice) -> dict[str, Any]:
    """The REST form of an answer (enums as lower-case words, durations in milliseconds)."""
    return {
        "response_id": advice.response_id,
        "text": advice.text,
        "out_of_scope": advice.out_of_scope,
        "cached": advice.cached,
        "sources": [
            {"doc_id": s.doc_id, "title": s.title, "section": s.section, "score": round(s.score, 6)}
            for s in advice.sources
        ],
        "intent": _intent_json(advice.intent) if advice.HasField("intent") else None,
        "entities": [_entity_json(entity) for entity in advice.entities],
        "bias": _bias_json(advice.bias),
        "versions": [_version_json(version) for version in advice.versions],
        "degraded": [
            _enum_word(gateway_pb2.DegradedMode, mode, "DEGRADED_MODE_") for mode in advice.degraded_modes
        ],
        "trace_id": advice.trace_id,
        "timings": [_timing_json(timing) for timing in advice.timings],
        "total_ms": advice.total_duration.ToNanoseconds() / 1e6,
        "usage": {
            "prompt_tokens": advice.usage.prompt_tokens,
            "completion_tokens": advice.usage.completion_tokens,
        },
    }


def _intent_json(intent: classifiers_pb2.Intent) -> dict[str, Any]:
    return {"label": intent.label, "probability": intent.probability, "low_confidence": intent.low_confidence}


def _entity_json(entity: classifiers_pb2.Entity) -> dict[str, Any]:
    item: dict[str, Any] = {
        "label": _enum_word(classifiers_pb2.EntityLabel, entity.label, "ENTITY_LABEL_"),
        "text": entity.text,
        "start": entity.start,
        "end": entity.end,
        "amount": None,
        "currency": None,
    }
    if entity.HasField("money"):
        item.update(amount=entity.money.amount, currency=entity.money.currency_code)
    return item


def _bias_json(bias: gateway_pb2.BiasCheck) -> dict[str, Any]:
    described: dict[str, Any] = {
        "status": _enum_word(gateway_pb2.BiasCheckStatus, bias.status, "BIAS_CHECK_STATUS_"),
        "score": None,
        "flagged": None,
        "threshold": None,
        "evidence": [],
        "unchecked_reason": bias.unchecked_reason,
    }
    if bias.status == gateway_pb2.BIAS_CHECK_STATUS_CHECKED:
        verdict = bias.verdict
        described.update(
            score=verdict.score,
            flagged=verdict.flagged,
            threshold=verdict.threshold,
            evidence=[
                json_format.MessageToDict(item, preserving_proto_field_name=True) for item in verdict.evidence
            ],
        )
    return described


def _version_json(version: gateway_pb2.TierVersion) -> dict[str, Any]:
    return {
        "tier": _enum_word(gateway_pb2.Tier, version.tier, "TIER_"),
        "model": version.model.name,
        "version": version.model.version,
        "digest": version.model.digest,
        "arm": _enum_word(gateway_pb2.Arm, version.arm, "ARM_"),
    }


def _timing_json(timing: gateway_pb2.HopTiming) -> dict[str, Any]:
    return {
        "tier": _enum_word(gateway_pb2.Tier, timing.tier, "TIER_"),
        "rpc": timing.rpc,
        "ms": timing.duration.ToNanoseconds() / 1e6,
        "status": timing.status_code,
    }


# -- OpenAI-compatible -------------------------------------------------------------------------


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    # Other OpenAI parameters (top_p, stop, logprobs, ...) are accepted and not used.
    model_config = ConfigDict(strict=True, extra="allow")
    model: str = Field(description=f"'{ADVISOR_MODEL}': the advisor's RAG flow")
    messages: list[ChatMessageIn] = Field(
        description="the conversation; the last user message is the question"
    )
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    model: str = Field(description="the embedding model, e.g. 'all-minilm-l6-v2'")
    input: str | list[str] = Field(description="a text or a list of texts (token arrays are not supported)")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


def model_list(config: GatewayConfig) -> dict[str, Any]:
    """The OpenAI `GET /v1/models` body: the advisor and the embedding model."""
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "tiermesh"}
            for name in (ADVISOR_MODEL, config.embedding_model)
        ],
    }
