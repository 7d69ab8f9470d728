"""A tiny OTLP/gRPC trace receiver that appends spans to tiermesh's JSON-lines trace file.

Envoy's OpenTelemetry tracer can only export over OTLP, while every tier writes its spans to one
shared file (`TIERMESH_TRACES_FILE`, see `tiermesh.kit.telemetry`) that `tiermesh trace` reads. This
sink receives Envoy's spans and writes them there in exactly the form of `telemetry.span_to_dict`,
so Envoy's hops show up in the same trace tree as the tiers'.

Run it as its own process: `python -m tiermesh.control.otlp_sink --port N --file PATH`. It also answers
the standard gRPC health check, so a runner can wait for it before starting Envoy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import threading
from collections.abc import Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from tiermesh.kit import logs

log = logging.getLogger("tiermesh.control.otlp_sink")  # not "__main__" under python -m

SERVICE = trace_service_pb2.DESCRIPTOR.services_by_name["TraceService"].full_name

_KINDS = {
    trace_pb2.Span.SPAN_KIND_UNSPECIFIED: "INTERNAL",  # what the SDK would have called it
    trace_pb2.Span.SPAN_KIND_INTERNAL: "INTERNAL",
    trace_pb2.Span.SPAN_KIND_SERVER: "SERVER",
    trace_pb2.Span.SPAN_KIND_CLIENT: "CLIENT",
    trace_pb2.Span.SPAN_KIND_PRODUCER: "PRODUCER",
    trace_pb2.Span.SPAN_KIND_CONSUMER: "CONSUMER",
}
_STATUSES = {
    trace_pb2.Status.STATUS_CODE_UNSET: "UNSET",
    trace_pb2.Status.STATUS_CODE_OK: "OK",
    trace_pb2.Status.STATUS_CODE_ERROR: "ERROR",
}


class InvalidSpan(ValueError):
    """A span that cannot be written (its ids would not match any other span in the file)."""


def any_value(value: common_pb2.AnyValue) -> Any:
    """An OTLP attribute value as plain JSON data; bytes become hex, an empty value None."""
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [any_value(item) for item in value.array_value.values]
    if which == "kvlist_value":
        return attributes(value.kvlist_value.values)
    if which == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, which)  # string, bool, int or double


def attributes(pairs: Sequence[common_pb2.KeyValue]) -> dict[str, Any]:
    """Key-value pairs as a dict (a repeated key keeps its last value, as the SDK would)."""
    return {pair.key: any_value(pair.value) for pair in pairs}


def _hex_id(raw: bytes, size: int, what: str) -> str:
    # A wrong-length or all-zero id is invalid in W3C trace context: it could never be joined to
    # its trace, so the span is refused rather than written half-broken.
    if len(raw) != size or not any(raw):
        raise InvalidSpan(f"{what} has {len(raw)} bytes, expected {size} non-zero")
    return raw.hex()


def span_dict(span: trace_pb2.Span, service: str) -> dict[str, Any]:
    """One OTLP span as the same dict `tiermesh.kit.telemetry.span_to_dict` makes of an SDK span."""
    return {
        "service": service,
        "name": span.name,
        "kind": _KINDS.get(span.kind, "INTERNAL"),  # an enum value from a newer OTLP
        "trace_id": _hex_id(span.trace_id, 16, "trace_id"),
        "span_id": _hex_id(span.span_id, 8, "span_id"),
        "parent_span_id": _hex_id(span.parent_span_id, 8, "parent_span_id") if span.parent_span_id else None,
        "start_ns": span.start_time_unix_nano,
        "end_ns": span.end_time_unix_nano,
        "status": _STATUSES.get(span.status.code, "UNSET"),
        "attributes": attributes(span.attributes),
    }


def request_dicts(
    request: trace_service_pb2.ExportTraceServiceRequest,
) -> tuple[list[dict[str, Any]], list[str]]:
    """The request's spans as dicts, and why each span that could not be converted was skipped."""
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    for resource_spans in request.resource_spans:
        found = attributes(resource_spans.resource.attributes).get("service.name")
        service = "" if found is None else str(found)  # `traces.render` needs a string
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                try:
                    rows.append(span_dict(span, service))
                except Exception as error:  # one odd span must not lose the rest of the batch
                    skipped.append(f"{span.name!r}: {error}")
    return rows, skipped


class JsonLinesFile:
    """Appends lines to the shared trace file, one write per batch.

    The tiers write the same file (`telemetry.JsonLinesSpanExporter`); an O_APPEND write of whole
    lines never interleaves with theirs on one host, and the lock keeps this process's own
    Export calls (one per pool thread) from splitting each other's batches.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        if not rows:
            return
        data = "".join(json.dumps(row) + "\n" for row in rows).encode()
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                written = 0
                while written < len(data):  # a short write is rare on a local file, not impossible
                    written += os.write(fd, data[written:])
            finally:
                os.close(fd)


@dataclasses.dataclass(frozen=True)
class Undecodable:
    """Request bytes that are not an ExportTraceServiceRequest. The deserializer returns this
    instead of raising (or None, which gRPC also treats as a failure), so that `export` can log it
    and answer with an empty response rather than gRPC's INTERNAL error."""

    size: int


def _parse_request(data: bytes) -> trace_service_pb2.ExportTraceServiceRequest | Undecodable:
    try:
        return trace_service_pb2.ExportTraceServiceRequest.FromString(data)
    except DecodeError:
        return Undecodable(len(data))


class TraceSink:
    """The TraceService: converts each Export's spans and appends them to the file."""

    def __init__(self, path: Path) -> None:
        self.file = JsonLinesFile(path)

    def export(
        self,
        request: trace_service_pb2.ExportTraceServiceRequest | Undecodable,
        context: grpc.ServicerContext,
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        response = trace_service_pb2.ExportTraceServiceResponse()
        if isinstance(request, Undecodable):  # nothing to keep, and resending it would not help
            log.warning(
                "otlp sink: ignored an Export request of %d bytes that is not an ExportTraceServiceRequest",
                request.size,
            )
            return response
        rows, skipped = request_dicts(request)
        if skipped:
            log.warning("otlp sink: skipped %d span(s): %s", len(skipped), "; ".join(skipped[:5]))
            response.partial_success.rejected_spans = len(skipped)
            response.partial_success.error_message = f"{len(skipped)} invalid span(s): {skipped[0]}"
        try:
            self.file.append(rows)
        except OSError as error:
            log.error("otlp sink: could not write %d span(s) to %s: %s", len(rows), self.file.path, error)
            response.partial_success.rejected_spans += len(rows)
            response.partial_success.error_message = f"could not write the trace file: {error}"
        return response


def _handler(sink: TraceSink) -> grpc.GenericRpcHandler:
    export = grpc.unary_unary_rpc_method_handler(
        sink.export,
        request_deserializer=_parse_request,
        response_serializer=trace_service_pb2.ExportTraceServiceResponse.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(SERVICE, {"Export": export})


def _start(host: str, port: int, path: Path) -> tuple[grpc.Server, health.HealthServicer]:
    # so_reuseport off: a second sink on a taken port must fail, not silently share it.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((_handler(TraceSink(path)),))
    checks = health.HealthServicer()
    for name in ("", SERVICE):
        checks.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    server.add_insecure_port(address)  # raises when the address cannot be bound
    server.start()
    return server, checks


def serve(host: str, port: int, path: Path) -> grpc.Server:
    """Start the sink on host:port, writing to `path`; the caller stops the returned server."""
    return _start(host, port, path)[0]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tiermesh.control.otlp_sink",
        description="Receives OTLP/gRPC spans (from Envoy's OpenTelemetry tracer) and appends them to "
        "tiermesh's JSON-lines trace file, in the same format the tiers write, so `tiermesh trace` "
        "shows Envoy's spans with theirs. Answers the gRPC health check; stops on SIGTERM/SIGINT.",
    )
    parser.add_argument("--port", type=int, required=True, help="port to listen on")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument(
        "--file", type=Path, required=True, help="the JSON-lines trace file (TIERMESH_TRACES_FILE)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGTERM or SIGINT, then stop gracefully so an in-flight Export is written."""
    args = _parser().parse_args(argv)
    logs.configure("tiermesh-otlp-sink")
    # The signals are blocked before gRPC starts any thread (threads inherit the mask) and taken
    # with sigwait: no Python handler runs at an arbitrary point, so none can deadlock a lock.
    stop_on = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_on)
    try:
        server, checks = _start(args.host, args.port, args.file)
    except (RuntimeError, OSError) as error:  # a taken port; a trace file directory it cannot make
        log.error(
            "otlp sink: cannot start on %s:%s writing to %s: %s", args.host, args.port, args.file, error
        )
        return 1
    log.info("otlp sink: listening on %s:%d, writing to %s", args.host, args.port, args.file)
    received = signal.sigwait(stop_on)
    log.info("otlp sink: %s received, stopping", signal.Signals(received).name)
    checks.enter_graceful_shutdown()
    server.stop(grace=1).wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
