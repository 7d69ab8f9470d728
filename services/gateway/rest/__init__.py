"""The REST/JSON API for external apps: advice (JSON or Server-Sent Events), OpenAI-compatible
chat completions and embeddings, feedback, health, and the OpenAPI document with interactive docs.

Every route but health and the docs needs an API key (`Authorization: Bearer <key>`, as the
`openai` client sends it, or `X-API-Key`) and passes its key's rate limits. Every error is a JSON
body `{"error": {"code", "message", "param", "type"}}` whose `code` is stable; nothing answers
with a stack trace.

The package is split the way vLLM splits its OpenAI server:
- `app.py`: `create_app`, which wires the parts below together (the public entry, re-exported here);
- `routes.py`: the routes, thin (parse, call the serving object, answer);
- `serving_advice.py`, `serving_chat.py`, `serving_embeddings.py`, `serving_health.py`: what the
  routes do, over the Advisor flow, the embedder tier, the feedback store and the tiers' health;
- `protocol.py`: the request and response models, and the JSON form of an answer;
- `sse.py`: Server-Sent Events framing and the streaming response;
- `auth.py`: API keys and rate limits (the `Authorized` dependency) and token charging;
- `errors.py`: JSON error bodies and the exception handlers;
- `middleware.py`: tracing, the body size limit, the last-resort 500 and the access log;
- `openapi.py`: the OpenAPI document with this gateway's configured limits.
"""

from services.gateway.rest.app import create_app

__all__ = ["create_app"]
