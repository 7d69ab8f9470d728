"""Server-Sent Events: the framing of events (`event:`/`data:` lines) and the streaming response
that holds back its status until the first event exists, so that errors before any text still
answer with their own status and JSON body, and errors after it end the stream with an `error`
event.
"""

import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

from services.gateway.rest.errors import api_error_from_flow
from tiermesh.kit.errors import RpcError

# The end of an OpenAI-compatible stream.
DONE = "data: [DONE]\n\n"


def named_event(name: str, data: dict[str, Any]) -> str:
    """An event with a name (`event: <name>`) and JSON data: the advice stream's framing."""
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


def data_event(data: dict[str, Any]) -> str:
    """An unnamed event of JSON data: the OpenAI-compatible stream's framing."""
    return f"data: {json.dumps(data)}\n\n"


async def stream_response(events: AsyncGenerator[str]) -> StreamingResponse:
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
                yield named_event("error", api_error_from_flow(error).body())

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
