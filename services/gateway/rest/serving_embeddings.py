"""What `POST /v1/embeddings` does: OpenAI-compatible embeddings of one text or a list of texts
from the embedder tier (through the Advisor's hop, so the call is traced and timed), as floats or
base64 little-endian float32.
"""

import base64
from typing import Any

import numpy as np

from services.gateway.config import GatewayConfig
from services.gateway.flow import Advisor, check_unicode, check_user_id
from services.gateway.rest.errors import ApiError
from services.gateway.rest.protocol import EmbeddingsRequest, JsonReply
from tiermesh.embedder.v1 import embedder_pb2
from tiermesh.kit.errors import InvalidArgument


class EmbeddingsServing:
    """The embeddings route's work, over the embedder tier."""

    def __init__(self, config: GatewayConfig, advisor: Advisor) -> None:
        self.config = config
        self.advisor = advisor

    def texts_of(self, body: EmbeddingsRequest) -> list[str]:
        """The texts to embed (ApiError or InvalidArgument when the request cannot be answered)."""
        if body.model != self.config.embedding_model:
            raise ApiError(
                404,
                "model_not_found",
                f"model: {body.model!r} is not served here; use {self.config.embedding_model!r}",
                param="model",
            )
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        if not 1 <= len(texts) <= self.config.max_embed_inputs:
            raise ApiError(
                422,
                "invalid_request",
                f"input: 1 to {self.config.max_embed_inputs} texts, got {len(texts)}",
                param="input",
            )
        for index, text in enumerate(texts):
            field = "input" if isinstance(body.input, str) else f"input[{index}]"
            if not text.strip():
                raise ApiError(422, "invalid_request", f"{field}: must not be empty", param=field)
            check_unicode(text, field)
        check_user_id(body.user or "", "user")
        return texts

    async def embeddings(self, body: EmbeddingsRequest) -> JsonReply:
        """The OpenAI `list` of embeddings, charged by the tokens the texts held."""
        texts = self.texts_of(body)
        reply = await self._embed(body, texts)
        if body.dimensions is not None and body.dimensions != reply.dimension:
            raise ApiError(
                422,
                "invalid_request",
                f"dimensions: this model has {reply.dimension}, got {body.dimensions}",
                param="dimensions",
            )
        tokens = sum(item.token_count for item in reply.embeddings)
        data = [
            {
                "object": "embedding",
                "index": index,
                "embedding": _encoded(list(item.values), body.encoding_format),
            }
            for index, item in enumerate(reply.embeddings)
        ]
        body_out = {
            "object": "list",
            "data": data,
            "model": reply.model.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return JsonReply(body_out, tokens)

    async def _embed(self, body: EmbeddingsRequest, texts: list[str]) -> embedder_pb2.EmbedBatchResponse:
        """The embedder's reply; a refused text is named as the caller wrote it (`input` for one)."""
        try:
            reply, _arm = await self.advisor.embed(
                texts, user_id=body.user or "", deadline=self.advisor.deadline(None)
            )
        except InvalidArgument as error:
            if isinstance(body.input, str) and error.field.startswith("input[0]"):  # one text: "input"
                raise InvalidArgument("input" + error.field[8:], str(error).split(": ", 1)[1]) from None
            raise
        return reply


def _encoded(values: list[float], encoding_format: str) -> Any:
    """An embedding as the request asked: a list of floats, or base64 of little-endian float32."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode()
    return values
