"""The OTLP sink: spans exported by the OpenTelemetry SDK's own OTLP exporter land in the JSON-lines
trace file exactly as the tiers' file exporter would have written them."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tiermesh.control.otlp_sink import SERVICE, serve
from tiermesh.control.traces import render, spans_of
from tiermesh.kit.telemetry import span_to_dict
from tiermesh.kit.testing import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def sink(tmp_path):
    port = free_port()
    path = tmp_path / "run" / "traces.jsonl"  # the directory is made by the sink
    server = serve("127.0.0.1", port, path)
    yield port, path
    server.stop(grace=None).wait()


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def provider_to(port):
    """A provider exporting over OTLP to the sink, and a copy of every span kept in memory."""
    provider = TracerProvider(resource=Resource.create({"service.name": "envoy-test"}))
    provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=f"127.0.0.1:{port}", insecure=True, timeout=10))
    )
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    return provider, memory


def hexes(span):
    return format(span.context.trace_id, "032x"), format(span.context.span_id, "016x")


def test_sdk_spans_are_written_exactly_as_the_tiers_file_exporter_writes_them(sink):
    port, path = sink
    provider, memory = provider_to(port)
    tracer = provider.get_tracer("test")
    with (
        tracer.start_as_current_span("ingress", kind=trace.SpanKind.SERVER) as parent,
        tracer.start_as_current_span("egress tiermesh-llm", kind=trace.SpanKind.CLIENT) as child,
    ):
        child.set_attributes(
            {"upstream": "llm", "retry": True, "status_code": 503, "ratio": 0.25, "hosts": ["a", "b"]}
        )
        child.set_status(trace.Status(trace.StatusCode.ERROR, "upstream reset"))
    assert provider.force_flush(10_000)
    provider.shutdown()

    trace_id, parent_id = hexes(parent)
    _, child_id = hexes(child)
    written = lines(path)
    assert written == [
        {
            "service": "envoy-test",
            "name": "egress tiermesh-llm",
            "kind": "CLIENT",
            "trace_id": trace_id,
            "span_id": child_id,
            "parent_span_id": parent_id,
            "start_ns": child.start_time,
            "end_ns": child.end_time,
            "status": "ERROR",
            "attributes": {
                "upstream": "llm",
                "retry": True,
                "status_code": 503,
                "ratio": 0.25,
                "hosts": ["a", "b"],
            },
        },
        {
            "service": "envoy-test",
            "name": "ingress",
            "kind": "SERVER",
            "trace_id": trace_id,
            "span_id": parent_id,
            "parent_span_id": None,
            "start_ns": parent.start_time,
            "end_ns": parent.end_time,
            "status": "UNSET",
            "attributes": {},
        },
    ]
    # the same lines `telemetry.JsonLinesSpanExporter` writes for the same SDK spans
    assert written == [json.loads(json.dumps(span_to_dict(span))) for span in memory.get_finished_spans()]

    found = spans_of(path, trace_id)
    assert len(found) == 2
    tree = render(found).splitlines()[1:]
    assert tree[0].endswith("envoy-test  ingress (server)")
    assert tree[1].endswith("envoy-test    egress tiermesh-llm (client)  ERROR")  # a child: indented


def otlp_span(name, span_id, *, trace_id=b"\x0a" * 16, **fields):
    return trace_pb2.Span(name=name, trace_id=trace_id, span_id=span_id, **fields)


def export(port, request, raw=False):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        if raw:  # bytes as they are, not necessarily a valid message
            call = channel.unary_unary(
                f"/{SERVICE}/Export",
                response_deserializer=trace_service_pb2.ExportTraceServiceResponse.FromString,
            )
            return call(request, timeout=10)
        return trace_service_pb2_grpc.TraceServiceStub(channel).Export(request, timeout=10)


def request_of(*spans, resource_attributes=()):
    return trace_service_pb2.ExportTraceServiceRequest(
        resource_spans=[
            trace_pb2.ResourceSpans(
                resource=resource_pb2.Resource(attributes=list(resource_attributes)),
                scope_spans=[trace_pb2.ScopeSpans(spans=list(spans))],
            )
        ]
    )


def test_a_span_with_a_bad_id_is_rejected_and_the_rest_of_the_request_written(sink, caplog):
    port, path = sink
    good = otlp_span("good", b"\x01" * 8, parent_span_id=b"\x02" * 8)
    bad = otlp_span("short id", b"\x01" * 7)
    zero_trace = otlp_span("zero trace id", b"\x03" * 8, trace_id=bytes(16))
    response = export(port, request_of(bad, good, zero_trace))
    assert response.partial_success.rejected_spans == 2
    assert "span_id has 7 bytes" in response.partial_success.error_message
    assert [(span["name"], span["span_id"], span["parent_span_id"]) for span in lines(path)] == [
        ("good", "01" * 8, "02" * 8)
    ]
    assert "skipped 2 span(s)" in caplog.text and "'short id'" in caplog.text

    bad_parent = otlp_span("bad parent", b"\x04" * 8, parent_span_id=b"\x02" * 9)
    assert export(port, request_of(bad_parent)).partial_success.rejected_spans == 1
    assert len(lines(path)) == 1


def test_every_attribute_type_kind_and_status_and_the_missing_service_name(sink):
    port, path = sink
    value = common_pb2.AnyValue
    attributes = {
        "text": value(string_value="x"),
        "flag": value(bool_value=False),
        "count": value(int_value=-(2**62)),
        "ratio": value(double_value=1.5),
        "raw": value(bytes_value=b"\x00\xff"),
        "list": value(
            array_value=common_pb2.ArrayValue(values=[value(int_value=1), value(string_value="b")])
        ),
        "map": value(
            kvlist_value=common_pb2.KeyValueList(
                values=[common_pb2.KeyValue(key="inner", value=value(array_value=common_pb2.ArrayValue()))]
            )
        ),
        "empty": value(),
    }
    spans = [
        otlp_span(
            "attrs",
            b"\x01" * 8,
            kind=trace_pb2.Span.SPAN_KIND_UNSPECIFIED,
            start_time_unix_nano=5,
            end_time_unix_nano=9,
            status=trace_pb2.Status(code=trace_pb2.Status.STATUS_CODE_OK),
            attributes=[common_pb2.KeyValue(key=key, value=item) for key, item in attributes.items()],
        ),
        *(
            otlp_span(str(kind), bytes([kind + 2]) * 8, kind=kind)
            for kind in (
                trace_pb2.Span.SPAN_KIND_INTERNAL,
                trace_pb2.Span.SPAN_KIND_PRODUCER,
                trace_pb2.Span.SPAN_KIND_CONSUMER,
                99,  # an enum value this sink does not know
            )
        ),
    ]
    response = export(port, request_of(*spans))
    assert response == trace_service_pb2.ExportTraceServiceResponse()
    first, *others = lines(path)
    assert first == {
        "service": "",
        "name": "attrs",
        "kind": "INTERNAL",
        "trace_id": "0a" * 16,
        "span_id": "01" * 8,
        "parent_span_id": None,
        "start_ns": 5,
        "end_ns": 9,
        "status": "OK",
        "attributes": {
            "text": "x",
            "flag": False,
            "count": -(2**62),
            "ratio": 1.5,
            "raw": "00ff",
            "list": [1, "b"],
            "map": {"inner": []},
            "empty": None,
        },
    }
    assert [(span["kind"], span["status"]) for span in others] == [
        ("INTERNAL", "UNSET"),
        ("PRODUCER", "UNSET"),
        ("CONSUMER", "UNSET"),
        ("INTERNAL", "UNSET"),
    ]


def test_empty_and_undecodable_requests_get_an_empty_response(sink, caplog):
    port, path = sink
    empty = trace_service_pb2.ExportTraceServiceResponse()
    assert export(port, trace_service_pb2.ExportTraceServiceRequest()) == empty
    assert export(port, request_of()) == empty  # a resource with no spans
    assert export(port, b"\xff\xff\xff not protobuf", raw=True) == empty
    assert "not an ExportTraceServiceRequest" in caplog.text
    assert not path.exists()  # nothing to write: the file is not even created

    # and the sink still serves afterwards
    assert export(port, request_of(otlp_span("after", b"\x01" * 8))) == empty
    assert [span["name"] for span in lines(path)] == ["after"]


def health_of(port, service, timeout=10.0):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout, wait_for_ready=True
        )


def test_health_check_is_serving_for_the_server_and_the_trace_service(sink):
    port, _ = sink
    for service in ("", "opentelemetry.proto.collector.trace.v1.TraceService"):
        assert health_of(port, service).status == health_pb2.HealthCheckResponse.SERVING


def test_a_taken_port_is_an_error_not_a_shared_socket(sink, tmp_path):
    port, _ = sink
    with pytest.raises(RuntimeError, match="Failed to bind"):
        serve("127.0.0.1", port, tmp_path / "other.jsonl")


def test_help_says_what_the_sink_is_for():
    done = subprocess.run(
        [sys.executable, "-m", "tiermesh.control.otlp_sink", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())  # argparse wraps the description
    assert (
        "receives otlp/grpc spans (from envoy's opentelemetry tracer) and appends them to tiermesh's "
        "json-lines trace file" in text.lower()
    )
    assert "--port" in text and "--host" in text and "--file" in text


@pytest.mark.integration
def test_the_sink_process_writes_an_exported_span_and_exits_cleanly_on_sigterm(tmp_path):
    port = free_port()
    path = tmp_path / "traces.jsonl"
    process = subprocess.Popen(
        [sys.executable, "-m", "tiermesh.control.otlp_sink", "--port", str(port), "--file", str(path)],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert health_of(port, "", timeout=60).status == health_pb2.HealthCheckResponse.SERVING
        provider, _ = provider_to(port)
        with provider.get_tracer("test").start_as_current_span("one", kind=trace.SpanKind.SERVER) as span:
            pass
        assert provider.force_flush(10_000)
        provider.shutdown()

        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        _, stderr = process.communicate(timeout=30)
        assert process.returncode == 0, stderr
        assert time.monotonic() - started < 10
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    trace_id, span_id = hexes(span)
    assert [(line["trace_id"], line["span_id"], line["service"]) for line in lines(path)] == [
        (trace_id, span_id, "envoy-test")
    ]
    assert f"otlp sink: listening on 127.0.0.1:{port}, writing to {path}" in stderr
    assert "SIGTERM received, stopping" in stderr
