"""The REST API's routes, thin: each parses its request (FastAPI and the protocol's models), calls
the serving object for its group (kept on `app.state.handlers`) and answers with JSON or
Server-Sent Events, charging the caller's key once the answer is sent.

The routes' function names, annotations, tags and summaries make the OpenAPI document's operations
(their ids and response schemas): renaming one changes the document.
"""

import dataclasses
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from services.gateway.config import GatewayConfig
from services.gateway.rest.auth import Authorized, Caller
from services.gateway.rest.protocol import (
    AdviceOut,
    AdviceRequest,
    ChatCompletionRequest,
    EmbeddingsRequest,
    FeedbackRequest,
    JsonReply,
    model_list,
)
from services.gateway.rest.serving_advice import AdviceServing
from services.gateway.rest.serving_chat import ChatServing
from services.gateway.rest.serving_embeddings import EmbeddingsServing
from services.gateway.rest.serving_health import HealthServing
from services.gateway.rest.sse import stream_response


@dataclasses.dataclass(frozen=True)
class Handlers:
    """What the routes call, one serving object per group of routes."""

    config: GatewayConfig
    health: HealthServing
    advice: AdviceServing
    chat: ChatServing
    embeddings: EmbeddingsServing


def handlers_of(request: Request) -> Handlers:
    """The dependency: the app's `Handlers` (`app.state.handlers`)."""
    return request.app.state.handlers


Served = Annotated[Handlers, Depends(handlers_of)]

router = APIRouter()


def _charged_json(reply: JsonReply, caller: Caller) -> JSONResponse:
    """`reply` as a JSON response; its tokens are charged to `caller` once it is sent."""
    return JSONResponse(reply.body, background=caller.charge_later(reply.tokens))


# -- health ------------------------------------------------------------------------------------


@router.get("/healthz", tags=["health"], summary="the process is up (503 while it drains to stop)")
async def healthz(request: Request) -> Any:
    # Draining (SIGTERM): Envoy's health check sees 503 and stops sending here before the port closes.
    if getattr(request.app.state, "draining", False):
        return JSONResponse({"status": "draining"}, 503)
    return {"status": "ok"}


@router.get("/readyz", tags=["health"], summary="the store and the tiers an answer needs are serving")
async def readyz(handlers: Served) -> JSONResponse:
    body, ready = await handlers.health.readiness()
    return JSONResponse(body, 200 if ready else 503)


# -- advice ------------------------------------------------------------------------------------


@router.post(
    "/v1/advice",
    tags=["advice"],
    summary="answer a loan question through the whole mesh",
    response_model=AdviceOut,
    responses={200: {"content": {"text/event-stream": {}}, "description": "advice, or events when stream"}},
)
async def advice(body: AdviceRequest, caller: Authorized, handlers: Served) -> Any:
    if body.stream:
        return await stream_response(handlers.advice.advice_events(body, caller))
    return _charged_json(await handlers.advice.advise(body), caller)


@router.post("/v1/feedback", tags=["advice"], summary="rate an answer or report its outcome", status_code=201)
async def post_feedback(body: FeedbackRequest, caller: Authorized, handlers: Served) -> dict[str, str]:
    return await handlers.advice.add_feedback(body, caller)


# -- OpenAI-compatible -------------------------------------------------------------------------


@router.get("/v1/models", tags=["openai"], summary="the models this API answers for")
async def models(_caller: Authorized, handlers: Served) -> dict[str, Any]:
    return model_list(handlers.config)


@router.post(
    "/v1/chat/completions", tags=["openai"], summary="OpenAI-compatible chat, answered by the RAG flow"
)
async def chat_completions(body: ChatCompletionRequest, caller: Authorized, handlers: Served) -> Any:
    if body.stream:
        return await stream_response(handlers.chat.completion_chunks(body, caller))
    return _charged_json(await handlers.chat.completion(body), caller)


@router.post("/v1/embeddings", tags=["openai"], summary="OpenAI-compatible embeddings from the embedder tier")
async def embeddings(body: EmbeddingsRequest, caller: Authorized, handlers: Served) -> JSONResponse:
    return _charged_json(await handlers.embeddings.embeddings(body), caller)
