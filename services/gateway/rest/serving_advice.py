"""What the advice routes do: `POST /v1/advice` answers a question through the Advisor flow, in
one JSON body or as Server-Sent Events (`chunk` events, then the `advice`); `POST /v1/feedback`
records a rating or outcome of an answer in the feedback store.
"""

import contextlib
from collections.abc import AsyncGenerator

from services.gateway.config import GatewayConfig
from services.gateway.feedback import FeedbackStore, UnknownResponse
from services.gateway.flow import Advisor, Question, resolve
from services.gateway.rest.auth import Caller
from services.gateway.rest.errors import ApiError
from services.gateway.rest.protocol import (
    AdviceRequest,
    FeedbackRequest,
    JsonReply,
    advice_json,
    advice_tokens,
)
from services.gateway.rest.sse import named_event
from tiermesh.gateway.v1 import gateway_pb2


class AdviceServing:
    """The advice and feedback routes' work, over the Advisor flow and the feedback store."""

    def __init__(self, config: GatewayConfig, advisor: Advisor, feedback: FeedbackStore | None) -> None:
        self.config = config
        self.advisor = advisor
        self.feedback = feedback

    def question_of(self, body: AdviceRequest) -> Question:
        """The request's question with every option resolved (InvalidArgument when out of bounds)."""
        return resolve(
            self.config,
            body.question,
            user_id=body.user_id,
            top_k=body.options.top_k,
            max_tokens=body.options.max_tokens,
            temperature=body.options.temperature,
            seed=body.options.seed,
            metadata_filter=body.filters,
        )

    async def advise(self, body: AdviceRequest) -> JsonReply:
        """The complete answer as one JSON body."""
        question = self.question_of(body)
        answer = await self.advisor.advise(question, self.advisor.deadline(None))
        return JsonReply(advice_json(answer), advice_tokens(answer))

    def advice_events(self, body: AdviceRequest, caller: Caller) -> AsyncGenerator[str]:
        """The answer as SSE: a `chunk` event per piece of text, then the `advice` event; the
        answer's tokens are charged to `caller` once it is complete. Bad options raise at once."""
        question = self.question_of(body)
        return self._events(self.advisor.advise_stream(question, self.advisor.deadline(None)), caller)

    @staticmethod
    async def _events(items: AsyncGenerator[str | gateway_pb2.Advice], caller: Caller) -> AsyncGenerator[str]:
        async with contextlib.aclosing(items):
            async for item in items:
                if isinstance(item, str):
                    yield named_event("chunk", {"text": item})
                else:
                    yield named_event("advice", advice_json(item))
                    await caller.charge(advice_tokens(item))

    async def add_feedback(self, body: FeedbackRequest, caller: Caller) -> dict[str, str]:
        """Record feedback on an answer (a chat completion's id names its answer too)."""
        if self.feedback is None:
            raise ApiError(503, "store_unavailable", "feedback needs the store (GATEWAY_STORE_URL)")
        response_id = body.response_id.removeprefix("chatcmpl-")
        try:
            feedback_id = await self.feedback.add(
                response_id,
                rating=body.rating,
                outcome=body.outcome,
                comment=body.comment,
                key_id=caller.key_id,
            )
        except UnknownResponse:
            raise ApiError(
                404,
                "response_not_found",
                f"response_id: no answer {body.response_id!r} (or it expired)",
                param="response_id",
            ) from None
        return {"feedback_id": feedback_id, "response_id": response_id}
