"""The REST API's outermost layer, a pure ASGI middleware: every HTTP request gets a server span
(continuing a W3C `traceparent`), an `X-Trace-Id` header, the concurrency limit (503 `overloaded`
with `Retry-After`), the body size limit (413), a JSON 500 in place of any stack trace, a
Prometheus count by route and status, and an access log line.
"""

import logging
import time
from collections.abc import Callable
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from prometheus_client import Counter

from services.gateway.rest.errors import ApiError, overloaded

# The REST API logs under one name, the one it had as a single module.
logger = logging.getLogger("services.gateway.rest")

REST_REQUESTS = Counter(
    "tiermesh_gateway_http_requests_total", "REST requests by route and status", ["route", "status"]
)


class AccessMiddleware:
    """Pure ASGI middleware: a span per request (W3C traceparent in), body size limit, access log."""

    def __init__(self, app: Any, *, max_body_bytes: int, max_in_flight: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_in_flight = max_in_flight
        self.in_flight = 0  # API requests being answered (one event loop: no lock needed)

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

        admitted = False
        try:
            if scope["path"].startswith("/v1/"):  # health and docs are never refused
                if self.in_flight >= self.max_in_flight:
                    await self._refuse(scope, receive, traced_send)
                    return
                self.in_flight, admitted = self.in_flight + 1, True
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
            self.in_flight -= admitted
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(trace.Status(trace.StatusCode.ERROR, str(status)))
            span.end()
            otel_context.detach(token)
            REST_REQUESTS.labels(route_label(scope), str(status)).inc()
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

    async def _refuse(self, scope: dict, receive: Callable, send: Callable) -> None:
        message = (
            f"the gateway is at its limit of {self.max_in_flight} concurrent requests "
            "(GATEWAY_MAX_CONCURRENT_RPCS); retry later"
        )
        await overloaded(message).response()(scope, receive, send)

    def _too_large(self) -> str:
        return f"request body: larger than the limit of {self.max_body_bytes} bytes"


def route_label(scope: dict) -> str:
    """The path template of the route that answered (a bounded metric label), or "unmatched"."""
    route = scope.get("route")
    return getattr(route, "path", "unmatched")
