"""OpenTelemetry tracing for every tier: provider set-up, exporters, W3C propagation over gRPC.

The exporter is chosen by `TIERMESH_TRACES_EXPORTER`: `otlp` (to `OTEL_EXPORTER_OTLP_ENDPOINT`),
`file` (JSON lines to `TIERMESH_TRACES_FILE`, what the local runner uses), `console` or `none`;
`auto` picks otlp when an endpoint is set, else file when a path is set, else none.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

from tiermesh.kit.config import setting

EXPORTERS = ("auto", "otlp", "file", "console", "none")


@dataclasses.dataclass(frozen=True)
class TelemetryConfig:
    """Settings read with the `TIERMESH_` prefix."""

    log_level: str = setting(
        "LOG_LEVEL", "info", help="log level", choices=("debug", "info", "warning", "error")
    )
    traces_exporter: str = setting("TRACES_EXPORTER", "auto", help="where spans go", choices=EXPORTERS)
    traces_file: Path | None = setting("TRACES_FILE", None, help="JSON-lines span file for the file exporter")
    arm: str = setting(
        "ARM",
        "control",
        help="the A/B arm this process serves (the runner sets it)",
        choices=("control", "treatment"),
    )


class JsonLinesSpanExporter(SpanExporter):
    """Appends one JSON object per finished span to a file; several processes may share it."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(json.dumps(span_to_dict(span)) + "\n" for span in spans)
        # O_APPEND writes of one line are atomic enough for concurrent writers on one host.
        with self._lock, open(self._path, "a", encoding="utf-8") as handle:
            handle.write(lines)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def span_to_dict(span: ReadableSpan) -> dict[str, Any]:
    """A flat, stable JSON form of a finished span."""
    parent = span.parent
    return {
        "service": span.resource.attributes.get("service.name", ""),
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": format(span.context.trace_id, "032x"),
        "span_id": format(span.context.span_id, "016x"),
        "parent_span_id": format(parent.span_id, "016x") if parent else None,
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": span.status.status_code.name,
        "attributes": dict(span.attributes or {}),
    }


def configure(service: str, config: TelemetryConfig) -> TracerProvider:
    """Install the global tracer provider for this process and return it."""
    provider = TracerProvider(resource=Resource.create({"service.name": service, "tiermesh.arm": config.arm}))
    choice = config.traces_exporter
    if choice == "auto":
        if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
            choice = "otlp"
        elif config.traces_file:
            choice = "file"
        else:
            choice = "none"
    if choice == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    elif choice == "file":
        if config.traces_file is None:
            from tiermesh.kit.config import ConfigError

            raise ConfigError("TIERMESH_TRACES_FILE: required when TIERMESH_TRACES_EXPORTER=file")
        # Batched: one file append per ~0.2 s instead of per span (per-span writes cost cheap RPCs
        # ~0.15 ms of CPU each, measured by bench/traffic.py); flushed at exit.
        provider.add_span_processor(
            BatchSpanProcessor(JsonLinesSpanExporter(config.traces_file), schedule_delay_millis=200)
        )
    elif choice == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider


def extract_context(metadata: Sequence[tuple[str, str | bytes]] | None) -> otel_context.Context:
    """The trace context a caller sent in gRPC metadata (W3C traceparent/tracestate)."""
    carrier = {key: value for key, value in (metadata or ()) if isinstance(value, str)}
    return propagate.extract(carrier)


def outgoing_metadata(metadata: Sequence[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    """Metadata for an outgoing call with the current trace context injected."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return [*(metadata or ()), *carrier.items()]


class _TracingClientInterceptor(grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    """Opens a CLIENT span per call and sends its context downstream."""

    def _details(self, details: grpc.aio.ClientCallDetails, span: trace.Span) -> grpc.aio.ClientCallDetails:
        with trace.use_span(span, end_on_exit=False):
            metadata = outgoing_metadata(list(details.metadata or ()))
        return grpc.aio.ClientCallDetails(
            details.method,
            details.timeout,
            grpc.aio.Metadata(*metadata),
            details.credentials,
            details.wait_for_ready,
        )

    async def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[override]
        method = _method_name(client_call_details.method)
        tracer = trace.get_tracer("tiermesh.client")
        with tracer.start_as_current_span(method, kind=trace.SpanKind.CLIENT) as span:
            span.set_attribute("rpc.system", "grpc")
            call = await continuation(self._details(client_call_details, span), request)
            code = await call.code()
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code != grpc.StatusCode.OK:
                span.set_status(trace.Status(trace.StatusCode.ERROR, code.name))
            return call

    async def intercept_unary_stream(self, continuation, client_call_details, request):  # type: ignore[override]
        method = _method_name(client_call_details.method)
        tracer = trace.get_tracer("tiermesh.client")
        # A stream outlives this call; the span covers establishing it.
        with tracer.start_as_current_span(method, kind=trace.SpanKind.CLIENT) as span:
            span.set_attribute("rpc.system", "grpc")
            return await continuation(self._details(client_call_details, span), request)


@contextlib.contextmanager
def client_call(method: str, metadata: Sequence[tuple[str, str]] = ()) -> Iterator[list[tuple[str, str]]]:
    """A CLIENT span around one call on a plain channel; yields the metadata to send (the trace
    context injected). The same spans as `channel`'s interceptor, for hot paths: grpc.aio's
    intercepted calls cost ~0.35 ms each (measured by bench/e2e.py's author on 2 cores)."""
    tracer = trace.get_tracer("tiermesh.client")
    with tracer.start_as_current_span(
        method, kind=trace.SpanKind.CLIENT, record_exception=False, set_status_on_exception=False
    ) as span:
        span.set_attribute("rpc.system", "grpc")
        try:
            yield outgoing_metadata(metadata)
        except grpc.RpcError as error:
            code = error.code()  # type: ignore[attr-defined]
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            span.set_status(trace.Status(trace.StatusCode.ERROR, code.name))
            raise
        span.set_attribute("rpc.grpc.status_code", 0)


def _method_name(method: str | bytes) -> str:
    return (method.decode() if isinstance(method, bytes) else method).lstrip("/")


def channel(target: str, *, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
    """An insecure aio channel whose calls carry the caller's trace context."""
    return grpc.aio.insecure_channel(
        target, options=list(options), interceptors=[_TracingClientInterceptor()]
    )
