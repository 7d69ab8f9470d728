import json
import logging

from opentelemetry.sdk.trace import TracerProvider

from tiermesh.kit.logs import JsonFormatter, redact


def test_redacts_emails_phones_and_account_numbers():
    text = "mail jane.doe@example.com, call 415-555-0134, card 4111 1111 1111 1111, acct 123456789012"
    cleaned = redact(text)
    for secret in ("jane.doe@example.com", "415-555-0134", "4111 1111 1111 1111", "123456789012"):
        assert secret not in cleaned
    assert "[email]" in cleaned


def test_keeps_ordinary_amounts():
    assert redact("a $25,000 loan over 60 months at 6.5%") == "a $25,000 loan over 60 months at 6.5%"


def test_json_line_carries_trace_and_span_ids():
    tracer = TracerProvider().get_tracer("test")
    record = logging.LogRecord("tiermesh.test", logging.INFO, __file__, 1, "hello %s", ("world",), None)
    record.fields = {"port": 1}
    with tracer.start_as_current_span("work") as span:
        entry = json.loads(JsonFormatter("svc").format(record))
        context = span.get_span_context()
    assert entry["msg"] == "hello world" and entry["service"] == "svc" and entry["port"] == 1
    assert entry["trace_id"] == format(context.trace_id, "032x")
    assert entry["span_id"] == format(context.span_id, "016x")


def test_json_line_without_a_span_has_no_trace_id():
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "plain", (), None)
    entry = json.loads(JsonFormatter("svc").format(record))
    assert "trace_id" not in entry and entry["level"] == "warning"
