"""What `POST /v1/chat/completions` does: an OpenAI-compatible chat completion answered by the
Advisor flow (the last user message is the question), in one `chat.completion` body or as a
stream of `chat.completion.chunk` events ending in `data: [DONE]`. Both carry the answer's
sources and its complete REST form (`tiermesh`) beside the OpenAI fields.
"""

import contextlib
import time
from collections.abc import AsyncGenerator
from typing import Any

from services.gateway.config import GatewayConfig
from services.gateway.flow import Advisor, Question, new_response_id, resolve
from services.gateway.rest.auth import Caller
from services.gateway.rest.errors import ApiError
from services.gateway.rest.protocol import (
    ADVISOR_MODEL,
    ChatCompletionRequest,
    JsonReply,
    advice_json,
    advice_tokens,
)
from services.gateway.rest.sse import DONE, data_event
from tiermesh.gateway.v1 import gateway_pb2

COMPLETION_PREFIX = "chatcmpl-"


class ChatServing:
    """The chat completions route's work, over the Advisor flow."""

    def __init__(self, config: GatewayConfig, advisor: Advisor) -> None:
        self.config = config
        self.advisor = advisor

    def question_of(self, body: ChatCompletionRequest) -> Question:
        """The question a chat request asks (ApiError or InvalidArgument when it cannot be answered),
        its options named in errors by the OpenAI parameters that set them."""
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
        return resolve(
            self.config,
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

    async def completion(self, body: ChatCompletionRequest) -> JsonReply:
        """The complete answer as one `chat.completion` body."""
        question = self.question_of(body)
        deadline = self.advisor.deadline(None)
        created = int(time.time())
        answer = await self.advisor.advise(question, deadline)
        return JsonReply(completion_json(answer, question, created), advice_tokens(answer))

    def completion_chunks(self, body: ChatCompletionRequest, caller: Caller) -> AsyncGenerator[str]:
        """The answer as `chat.completion.chunk` events (then a usage chunk when the request asks
        for it, then `[DONE]`); its tokens are charged to `caller` once it is complete. A request
        that cannot be answered raises at once."""
        question = self.question_of(body)
        deadline = self.advisor.deadline(None)
        created = int(time.time())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        response_id = new_response_id()  # the chunks carry the answer's id before the flow ends
        stream = self.advisor.advise_stream(question, deadline, response_id=response_id)
        ident = COMPLETION_PREFIX + response_id
        return _chunk_events(
            stream, caller, question, ident=ident, created=created, include_usage=include_usage
        )


async def _chunk_events(
    items: AsyncGenerator[str | gateway_pb2.Advice],
    caller: Caller,
    question: Question,
    *,
    ident: str,
    created: int,
    include_usage: bool,
) -> AsyncGenerator[str]:
    """The flow's text as `delta` chunks (the first with the role), then the final chunk with the
    finish reason, sources and answer; then, if asked, a chunk of usage alone; then `[DONE]`."""
    first = True
    async with contextlib.aclosing(items):
        async for item in items:
            if isinstance(item, str):
                delta = {"role": "assistant", "content": item} if first else {"content": item}
                first = False
                yield data_event(chunk_json(ident, created, delta, None))
                continue
            final = chunk_json(ident, created, {}, finish_reason(item, question))
            described = advice_json(item)
            final.update(sources=described["sources"], tiermesh=described)
            yield data_event(final)
            await caller.charge(advice_tokens(item))
            if include_usage:
                yield data_event(
                    {**chunk_json(ident, created, {}, None), "choices": [], "usage": usage_json(item)}
                )
    yield DONE


def completion_json(answer: gateway_pb2.Advice, question: Question, created: int) -> dict[str, Any]:
    """A `chat.completion` body: one choice, the usage, the sources and the complete answer."""
    described = advice_json(answer)
    return {
        "id": COMPLETION_PREFIX + answer.response_id,
        "object": "chat.completion",
        "created": created,
        "model": ADVISOR_MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer.text},
                "finish_reason": finish_reason(answer, question),
            }
        ],
        "usage": usage_json(answer),
        "sources": described["sources"],
        "tiermesh": described,
    }


def chunk_json(ident: str, created: int, delta: dict[str, str], finish: str | None) -> dict[str, Any]:
    """A `chat.completion.chunk` with one choice's `delta`."""
    return {
        "id": ident,
        "object": "chat.completion.chunk",
        "created": created,
        "model": ADVISOR_MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def usage_json(advice: gateway_pb2.Advice) -> dict[str, int]:
    """The OpenAI `usage` of an answer."""
    prompt, completion = advice.usage.prompt_tokens, advice.usage.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish_reason(advice: gateway_pb2.Advice, question: Question) -> str:
    """`length` when the answer used every token it was allowed, else `stop`."""
    return "length" if advice.usage.completion_tokens >= question.max_tokens else "stop"
