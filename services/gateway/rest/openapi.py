"""The REST API's OpenAPI document, with this gateway's limits in it: they come from its
configuration (the cap on passages, on tokens, on a question's length, ...), so the pydantic
models cannot carry them; requests outside them are refused with 422.
"""

from typing import Any

from fastapi import FastAPI

from services.gateway.config import GatewayConfig
from services.gateway.feedback import OUTCOMES


def install_openapi(app: FastAPI, config: GatewayConfig) -> None:
    """Make `app`'s OpenAPI document (built once, on first use) state `config`'s limits."""
    document = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = with_limits(document(), config)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def with_limits(schema: dict[str, Any], config: GatewayConfig) -> dict[str, Any]:
    """`schema` with `config`'s limits on the request models' fields (changed in place)."""
    models = schema["components"]["schemas"]
    for model, fields in documented_limits(config).items():
        properties = models[model]["properties"]
        for name, bounds in fields.items():
            # an optional field is anyOf [<its type>, null]: the bounds belong to its type
            for branch in properties[name].get("anyOf", [properties[name]]):
                if branch.get("type") != "null":
                    branch.update(bounds)
    return schema


def documented_limits(config: GatewayConfig) -> dict[str, dict[str, dict[str, Any]]]:
    """The JSON-schema bounds of each request model's fields, by model and field name."""
    int64 = {"minimum": -(2**63), "maximum": 2**63 - 1}
    user = {"maxLength": 128, "pattern": "^[\\x20-\\x7e]*$"}
    temperature = {"minimum": 0, "maximum": 2}
    tokens = {"minimum": 1, "maximum": config.max_tokens_cap}
    return {
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
