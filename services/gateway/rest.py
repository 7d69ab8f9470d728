"""The REST/JSON API for external apps: advice (JSON or Server-Sent Events), OpenAI-compatible
chat completions and embeddings, feedback, health, and the OpenAPI document with interactive docs.

Every route but health and the docs needs an API key (`Authorization: Bearer <key>`, as the
`openai` client sends it, or `X-API-Key`) and passes its key's rate limits. Every error is a JSON
body `{"error": {"code", "message", "param", "type"}}` whose `code` is stable; nothing answers
with a stack trace.
"""

import base64
import contextlib
import json
import logging
import math
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Annotated, Any, Literal

import numpy as np
import redis.asyncio as aioredis
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from google.protobuf import json_format
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from prometheus_client import Counter
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.gateway.config import GatewayConfig
from services.gateway.feedback import OUTCOMES, FeedbackStore, UnknownResponse
from services.gateway.flow import Advisor, Question, check_unicode, check_user_id, new_response_id, resolve
from services.gateway.keys import ApiKey, KeyStore, RateLimiter
from services.gateway.tiers import RemoteTiers
from tiermesh.classifiers.v1 import classifiers_pb2
from tiermesh.gateway.v1 import gateway_pb2
from tiermesh.kit.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, RpcError, Unavailable

logger = logging.getLogger(__name__)

ADVISOR_MODEL = "tiermesh-advisor"
REST_REQUESTS = Counter(
    "tiermesh_gateway_http_requests_total", "REST requests by route and status", ["route", "status"]
)


# -- errors ------------------------------------------------------------------------------------


class ApiError(Exception):
    """An error answered as `{"error": {...}}` with an HTTP status and a stable code."""

    def __init__(
        self, status: int, code: str, message: str, *, param: str | None = None, headers: dict | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"code": self.code, "message": self.message, "param": self.param, "type": kind}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def from_flow(error: RpcError) -> ApiError:
    """The HTTP form of an error the flow raised."""
    if isinstance(error, InvalidArgument):
        return ApiError(422, "invalid_request", str(error), param=error.field)
    if isinstance(error, DeadlineExceeded):
        return ApiError(504, "upstream_timeout", str(error), param=str(error).split(":", 1)[0])
    if isinstance(error, Unavailable):
        return ApiError(503, "upstream_unavailable", str(error), param=str(error).split(":", 1)[0])
    if isinstance(error, FailedPrecondition):
        return ApiError(409, "failed_precondition", str(error))
    return ApiError(500, "internal_error", "internal error")


class _Limits:
    """Pure ASGI middleware: a span per request (W3C traceparent in), body size limit, access log."""

    def __init__(self, app: Any, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        route = f"{scope['method']} {scope['path']}"
        span = trace.get_tracer("tiermesh.gateway").start_span(
            route, context=propagate.extract(headers), kind=trace.SpanKind.SERVER
        )
        token = otel_context.attach(trace.set_span_in_context(span))
        trace_id = format(span.get_span_context().trace_id, "032x")
        started = time.perf_counter()
        status = 500
        started_response = False

        async def traced_send(message: dict) -> None:
            nonlocal status, started_response
            if message["type"] == "http.response.start":
                started_response = True
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-trace-id", trace_id.encode())]
            await send(message)

        try:
            body = await self._body(headers, receive)
            if body is None:
                await ApiError(413, "body_too_large", self._too_large()).response()(
                    scope, receive, traced_send
                )
            else:
                await self.app(scope, body, traced_send)
        except Exception as error:
            # A bug must not reach the caller as a stack trace: log it, answer a JSON 500.
            logger.error("unexpected error in %s: %r", route, error, exc_info=error)
            if not started_response:
                message = f"internal error (trace {trace_id})"
                await ApiError(500, "internal_error", message).response()(scope, receive, traced_send)
        finally:
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(trace.Status(trace.StatusCode.ERROR, str(status)))
            span.end()
            otel_context.detach(token)
            REST_REQUESTS.labels(_route_label(scope), str(status)).inc()
            logger.info(
                "%s %d %.1f ms",
                route,
                status,
                (time.perf_counter() - started) * 1000,
                extra={"fields": {"status": status, "path": scope["path"], "trace_id": trace_id}},
            )

    async def _body(self, headers: dict[str, str], receive: Callable) -> Callable | None:
        """`receive` for the app, or None when the body is over the limit. A declared length is
        checked at once; a chunked body is read (up to the limit) before the app sees it."""
        declared = headers.get("content-length", "")
        if declared.isdigit():
            return None if int(declared) > self.max_body_bytes else receive
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                return None
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay() -> dict:
            return messages.pop(0) if messages else await receive()

        return replay

    def _too_large(self) -> str:
        return f"request body: larger than the limit of {self.max_body_bytes} bytes"


def _route_label(scope: dict) -> str:
    route = scope.get("route")
    return getattr(route, "path", "unmatched")


# -- request and response bodies ---------------------------------------------------------------


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


def _name(enum: Any, value: int, prefix: str) -> str:
    return enum.Name(value).removeprefix(prefix).lower()


def advice_json(advice: gateway_pb2.Advice) -> dict[str, Any]:
    """The REST form of an answer (enums as lower-case words, durations in milliseconds)."""
    bias: dict[str, Any] = {
        "status": _name(gateway_pb2.BiasCheckStatus, advice.bias.status, "BIAS_CHECK_STATUS_"),
        "score": None,
        "flagged": None,
        "threshold": None,
        "evidence": [],
        "unchecked_reason": advice.bias.unchecked_reason,
    }
    if advice.bias.status == gateway_pb2.BIAS_CHECK_STATUS_CHECKED:
        verdict = advice.bias.verdict
        bias.update(
            score=verdict.score,
            flagged=verdict.flagged,
            threshold=verdict.threshold,
            evidence=[
                json_format.MessageToDict(item, preserving_proto_field_name=True) for item in verdict.evidence
            ],
        )
    entities = []
    for entity in advice.entities:
        item: dict[str, Any] = {
            "label": _name(classifiers_pb2.EntityLabel, entity.label, "ENTITY_LABEL_"),
            "text": entity.text,
            "start": entity.start,
            "end": entity.end,
            "amount": None,
            "currency": None,
        }
        if entity.HasField("money"):
            item.update(amount=entity.money.amount, currency=entity.money.currency_code)
        entities.append(item)
    return {
        "response_id": advice.response_id,
        "text": advice.text,
        "out_of_scope": advice.out_of_scope,
        "cached": advice.cached,
        "sources": [
            {"doc_id": s.doc_id, "title": s.title, "section": s.section, "score": round(s.score, 6)}
            for s in advice.sources
        ],
        "intent": (
            {
                "label": advice.intent.label,
                "probability": advice.intent.probability,
                "low_confidence": advice.intent.low_confidence,
            }
            if advice.HasField("intent")
            else None
        ),
        "entities": entities,
        "bias": bias,
        "versions": [
            {
                "tier": _name(gateway_pb2.Tier, v.tier, "TIER_"),
                "model": v.model.name,
                "version": v.model.version,
                "digest": v.model.digest,
                "arm": _name(gateway_pb2.Arm, v.arm, "ARM_"),
            }
            for v in advice.versions
        ],
        "degraded": [
            _name(gateway_pb2.DegradedMode, mode, "DEGRADED_MODE_") for mode in advice.degraded_modes
        ],
        "trace_id": advice.trace_id,
        "timings": [
            {
                "tier": _name(gateway_pb2.Tier, t.tier, "TIER_"),
                "rpc": t.rpc,
                "ms": t.duration.ToNanoseconds() / 1e6,
                "status": t.status_code,
            }
            for t in advice.timings
        ],
        "total_ms": advice.total_duration.ToNanoseconds() / 1e6,
        "usage": {
            "prompt_tokens": advice.usage.prompt_tokens,
            "completion_tokens": advice.usage.completion_tokens,
        },
    }


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


class FeedbackRequest(_Strict):
    response_id: str = Field(description="the response_id of an answer (or a chat completion's id)")
    rating: float | None = Field(None, description="-1 (bad) to 1 (good)")
    outcome: str = Field("", description="what happened next, e.g. accepted, applied, approved, repaid")
    comment: str = Field("", description="free text, at most 2000 characters")


# -- the app -----------------------------------------------------------------------------------

Caller = ApiKey | None


def create_app(
    config: GatewayConfig,
    advisor: Advisor,
    tiers: RemoteTiers,
    *,
    keys: KeyStore | None,
    limiter: RateLimiter | None,
    feedback: FeedbackStore | None,
    store: aioredis.Redis | None,
) -> Any:
    app = FastAPI(
        title="tiermesh gateway",
        version="1",
        description=(
            "Loan advice answered through the tiermesh mesh (intent and entities, retrieval, "
            "generation, bias check), plus OpenAI-compatible chat completions and embeddings.\n\n"
            "Authenticate with `Authorization: Bearer <API key>` (create one with `tiermesh keys create`)."
        ),
    )
    bearer = HTTPBearer(auto_error=False, description="an API key from `tiermesh keys create`")

    # errors ---------------------------------------------------------------------------------------

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, error: ApiError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RpcError)
    async def flow_error(_request: Request, error: RpcError) -> JSONResponse:
        return from_flow(error).response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        field = _field(first.get("loc", ()))
        if first.get("type") == "json_invalid":
            return ApiError(
                400, "invalid_json", f"request body: not valid JSON ({first.get('msg')})"
            ).response()
        if not field and first.get("type") in ("model_attributes_type", "dict_type", "model_type"):
            message = "request body: expected a JSON object (send Content-Type: application/json)"
            return ApiError(400, "invalid_json", message).response()
        message = f"{field or 'request body'}: {first.get('msg', 'invalid')}"
        return ApiError(422, "invalid_request", message, param=field or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        return ApiError(
            error.status_code, codes.get(error.status_code, "http_error"), str(error.detail)
        ).response()

    # auth and limits ------------------------------------------------------------------------------

    async def caller(
        request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
    ) -> Caller:
        if not config.require_api_key:
            return None
        presented = credentials.credentials if credentials else request.headers.get("x-api-key", "")
        if not presented:
            raise ApiError(
                401,
                "missing_api_key",
                "no API key: send Authorization: Bearer <key> (tiermesh keys create makes one)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        assert keys is not None and limiter is not None  # the tier refuses to start without a store
        try:
            key = await keys.verify(presented)
            if key is None:
                raise ApiError(
                    401,
                    "invalid_api_key",
                    "the API key is unknown or revoked",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            decision = await limiter.acquire(key)
        except (OSError, aioredis.RedisError) as error:
            raise ApiError(503, "store_unavailable", f"store: cannot check the API key ({error})") from None
        if not decision.allowed:
            retry = max(1, math.ceil(decision.retry_after_s))
            raise ApiError(
                429,
                "rate_limit_exceeded",
                f"{decision.limit} of key {key.key_id} reached; retry after {retry} s",
                headers={"Retry-After": str(retry)},
            )
        request.state.key = key
        return key

    async def charge(key: Caller, tokens: int) -> None:
        if key is not None and limiter is not None and tokens > 0:
            try:
                await limiter.charge(key, tokens)
            except (OSError, aioredis.RedisError) as error:
                logger.warning("tokens not charged to %s: %s", key.key_id, error)

    def charged(key: Caller, advice: gateway_pb2.Advice) -> BackgroundTask:
        """Charge an answer's tokens once the response is sent (off its latency)."""
        return BackgroundTask(charge, key, advice.usage.prompt_tokens + advice.usage.completion_tokens)

    Authorized = Annotated[Caller, Depends(caller)]

    # health -----------------------------------------------------------------------------------------

    @app.get("/healthz", tags=["health"], summary="the process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], summary="the store and the tiers an answer needs are serving")
    async def readyz() -> JSONResponse:
        checks = {
            tier: await tiers.health(tier) for tier in ("embedder", "retriever", "llm", "classifiers", "bias")
        }
        if store is not None:
            try:
                checks["store"] = "SERVING" if await store.ping() else "DOWN"
            except (OSError, aioredis.RedisError):
                checks["store"] = "DOWN"
        needed = (
            ("embedder", "retriever", "llm", "store")
            if not config.answer_without_sources
            else ("llm", "store")
        )
        ready = all(checks.get(name, "SERVING") == "SERVING" for name in needed)
        return JSONResponse(
            {"status": "ready" if ready else "not_ready", "checks": checks}, 200 if ready else 503
        )

    # advice -----------------------------------------------------------------------------------------

    def question_of(body: AdviceRequest) -> Question:
        return resolve(
            config,
            body.question,
            user_id=body.user_id,
            top_k=body.options.top_k,
            max_tokens=body.options.max_tokens,
            temperature=body.options.temperature,
            seed=body.options.seed,
            metadata_filter=body.filters,
        )

    @app.post(
        "/v1/advice",
        tags=["advice"],
        summary="answer a loan question through the whole mesh",
        response_model=AdviceOut,
        responses={
            200: {"content": {"text/event-stream": {}}, "description": "advice, or events when stream"}
        },
    )
    async def advice(body: AdviceRequest, key: Authorized) -> Any:
        question = question_of(body)
        deadline = advisor.deadline(None)
        if not body.stream:
            answer = await advisor.advise(question, deadline)
            return JSONResponse(advice_json(answer), background=charged(key, answer))

        async def events(items: AsyncGenerator[str | gateway_pb2.Advice]) -> AsyncIterator[str]:
            async with contextlib.aclosing(items):
                async for item in items:
                    if isinstance(item, str):
                        yield _event("chunk", {"text": item})
                    else:
                        yield _event("advice", advice_json(item))
                        await charge(key, item.usage.prompt_tokens + item.usage.completion_tokens)

        return await _stream(events(advisor.advise_stream(question, deadline)))

    @app.post(
        "/v1/feedback", tags=["advice"], summary="rate an answer or report its outcome", status_code=201
    )
    async def post_feedback(body: FeedbackRequest, key: Authorized) -> dict[str, str]:
        if feedback is None:
            raise ApiError(503, "store_unavailable", "feedback needs the store (GATEWAY_STORE_URL)")
        response_id = body.response_id.removeprefix("chatcmpl-")
        try:
            feedback_id = await feedback.add(
                response_id,
                rating=body.rating,
                outcome=body.outcome,
                comment=body.comment,
                key_id=key.key_id if key else "",
            )
        except UnknownResponse:
            raise ApiError(
                404,
                "response_not_found",
                f"response_id: no answer {body.response_id!r} (or it expired)",
                param="response_id",
            ) from None
        return {"feedback_id": feedback_id, "response_id": response_id}

    # OpenAI-compatible ------------------------------------------------------------------------------

    @app.get("/v1/models", tags=["openai"], summary="the models this API answers for")
    async def models(_key: Authorized) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": 0, "owned_by": "tiermesh"}
                for name in (ADVISOR_MODEL, config.embedding_model)
            ],
        }

    @app.post(
        "/v1/chat/completions", tags=["openai"], summary="OpenAI-compatible chat, answered by the RAG flow"
    )
    async def chat_completions(body: ChatCompletionRequest, key: Authorized) -> Any:
        if body.model != ADVISOR_MODEL:
            raise ApiError(
                404,
                "model_not_found",
                f"model: {body.model!r} is not served here; use {ADVISOR_MODEL!r}",
                param="model",
            )
        if body.n not in (None, 1):
            raise ApiError(422, "invalid_request", "n: only 1 choice is generated", param="n")
        users = [m for m in body.messages if m.role == "user" and m.text().strip()]
        if not users:
            raise ApiError(
                422, "invalid_request", "messages: needs a user message with text", param="messages"
            )
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        question = resolve(
            config,
            users[-1].text(),
            user_id=body.user or "",
            max_tokens=max_tokens,
            temperature=body.temperature,
            seed=body.seed,
            fields={
                "question": "messages",
                "user_id": "user",
                "temperature": "temperature",
                "max_tokens": "max_completion_tokens"
                if body.max_completion_tokens is not None
                else "max_tokens",
            },
        )
        deadline = advisor.deadline(None)
        created = int(time.time())
        if not body.stream:
            answer = await advisor.advise(question, deadline)
            described = advice_json(answer)
            completion = {
                "id": "chatcmpl-" + answer.response_id,
                "object": "chat.completion",
                "created": created,
                "model": ADVISOR_MODEL,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": answer.text},
                        "finish_reason": _finish_reason(answer, question),
                    }
                ],
                "usage": _usage(answer),
                "sources": described["sources"],
                "tiermesh": described,
            }
            return JSONResponse(completion, background=charged(key, answer))

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        ident = "chatcmpl-" + new_response_id()

        async def chunks(items: AsyncGenerator[str | gateway_pb2.Advice]) -> AsyncIterator[str]:
            first = True
            async with contextlib.aclosing(items):
                async for item in items:
                    if isinstance(item, str):
                        delta = {"role": "assistant", "content": item} if first else {"content": item}
                        first = False
                        yield _data(_chunk(ident, created, delta, None))
                        continue
                    final = _chunk(ident, created, {}, _finish_reason(item, question))
                    described = advice_json(item)
                    final.update(sources=described["sources"], tiermesh=described)
                    yield _data(final)
                    await charge(key, item.usage.prompt_tokens + item.usage.completion_tokens)
                    if include_usage:
                        yield _data(
                            {**_chunk(ident, created, {}, None), "choices": [], "usage": _usage(item)}
                        )
            yield "data: [DONE]\n\n"

        stream = advisor.advise_stream(question, deadline, response_id=ident.removeprefix("chatcmpl-"))
        return await _stream(chunks(stream))

    @app.post(
        "/v1/embeddings", tags=["openai"], summary="OpenAI-compatible embeddings from the embedder tier"
    )
    async def embeddings(body: EmbeddingsRequest, key: Authorized) -> JSONResponse:
        if body.model != config.embedding_model:
            raise ApiError(
                404,
                "model_not_found",
                f"model: {body.model!r} is not served here; use {config.embedding_model!r}",
                param="model",
            )
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        if not 1 <= len(texts) <= config.max_embed_inputs:
            raise ApiError(
                422,
                "invalid_request",
                f"input: 1 to {config.max_embed_inputs} texts, got {len(texts)}",
                param="input",
            )
        for index, text in enumerate(texts):
            field = "input" if isinstance(body.input, str) else f"input[{index}]"
            if not text.strip():
                raise ApiError(422, "invalid_request", f"{field}: must not be empty", param=field)
            check_unicode(text, field)
        check_user_id(body.user or "", "user")
        try:
            reply, _arm = await advisor.embed(texts, user_id=body.user or "", deadline=advisor.deadline(None))
        except InvalidArgument as error:
            if isinstance(body.input, str) and error.field.startswith("input[0]"):  # one text: "input"
                raise InvalidArgument("input" + error.field[8:], str(error).split(": ", 1)[1]) from None
            raise
        if body.dimensions is not None and body.dimensions != reply.dimension:
            raise ApiError(
                422,
                "invalid_request",
                f"dimensions: this model has {reply.dimension}, got {body.dimensions}",
                param="dimensions",
            )
        tokens = sum(item.token_count for item in reply.embeddings)
        data = []
        for index, item in enumerate(reply.embeddings):
            values = list(item.values)
            if body.encoding_format == "base64":
                encoded: Any = base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode()
            else:
                encoded = values
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        body_out = {
            "object": "list",
            "data": data,
            "model": reply.model.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return JSONResponse(body_out, background=BackgroundTask(charge, key, tokens))

    document = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _with_limits(document(), config)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(_Limits, max_body_bytes=config.max_body_bytes)
    return app


def _with_limits(schema: dict[str, Any], config: GatewayConfig) -> dict[str, Any]:
    """State this gateway's limits in its OpenAPI document (they come from its configuration,
    so the pydantic models cannot carry them); requests outside them are refused with 422."""
    models = schema["components"]["schemas"]
    int64 = {"minimum": -(2**63), "maximum": 2**63 - 1}
    user = {"maxLength": 128, "pattern": "^[\\x20-\\x7e]*$"}
    temperature = {"minimum": 0, "maximum": 2}
    tokens = {"minimum": 1, "maximum": config.max_tokens_cap}
    limits = {
        "AdviceRequest": {
            "question": {"minLength": 1, "maxLength": config.max_question_chars},
            "user_id": user,
        },
        "AdviceOptions": {
            "top_k": {"minimum": 1, "maximum": config.max_top_k},
            "max_tokens": tokens,
            "temperature": temperature,
            "seed": int64,
        },
        "ChatCompletionRequest": {
            "max_tokens": tokens,
            "max_completion_tokens": tokens,
            "temperature": temperature,
            "seed": int64,
            "n": {"minimum": 1, "maximum": 1},
            "user": user,
        },
        "EmbeddingsRequest": {"user": user},
        "FeedbackRequest": {
            "rating": {"minimum": -1, "maximum": 1},
            "outcome": {"enum": ["", *OUTCOMES]},
            "comment": {"maxLength": 2000},
        },
    }
    for model, fields in limits.items():
        properties = models[model]["properties"]
        for name, bounds in fields.items():
            # an optional field is anyOf [<its type>, null]: the bounds belong to its type
            for branch in properties[name].get("anyOf", [properties[name]]):
                if branch.get("type") != "null":
                    branch.update(bounds)
    return schema


# pydantic names the union member that failed in the location (e.g. "str", "list[str]"); not a field
_UNION_MEMBER = re.compile(r"(str|int|float|bool|none)|\w+\[.*\]|function-.*")


def _field(location: tuple) -> str:
    """`("body", "messages", 0, "content")` -> `messages[0].content`."""
    field = ""
    for part in location[1:] if location[:1] == ("body",) else location:
        if isinstance(part, int):
            field += f"[{part}]"
        elif not _UNION_MEMBER.fullmatch(part):
            field += f".{part}" if field else part
    return field


# -- helpers -----------------------------------------------------------------------------------


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


def _data(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _chunk(ident: str, created: int, delta: dict[str, str], finish: str | None) -> dict[str, Any]:
    return {
        "id": ident,
        "object": "chat.completion.chunk",
        "created": created,
        "model": ADVISOR_MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def _usage(advice: gateway_pb2.Advice) -> dict[str, int]:
    prompt, completion = advice.usage.prompt_tokens, advice.usage.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish_reason(advice: gateway_pb2.Advice, question: Question) -> str:
    return "length" if advice.usage.completion_tokens >= question.max_tokens else "stop"


async def _stream(events: AsyncGenerator[str]) -> StreamingResponse:
    """An SSE response whose first event is produced before the status is sent, so that errors
    before any text (bad options, a tier down) still answer with their own status and JSON body."""
    first = await anext(events, None)

    async def body() -> AsyncIterator[str]:
        async with contextlib.aclosing(events):  # a client gone mid-stream stops the generation
            if first is not None:
                yield first
            try:
                async for event in events:
                    yield event
            except RpcError as error:
                yield _event("error", from_flow(error).body())

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
