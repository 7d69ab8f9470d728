"""Structured JSON logs that carry the current trace and span ids, with PII redacted."""

from __future__ import annotations

import json
import logging
import re
import sys
import time

from opentelemetry import trace

# Questions reach logs through error messages; raw emails, phone and account numbers must not.
_REDACTIONS = (
    (re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+"), "[email]"),
    (re.compile(r"\b(?:\d[ -]?){8,19}\b"), "[number]"),
    (re.compile(r"\+?\(?\d{3}\)?[ .-]\d{3}[ .-]\d{4}\b"), "[phone]"),
)


def redact(text: str) -> str:
    """Mask emails, phone numbers and long digit runs (account and card numbers)."""
    for pattern, mask in _REDACTIONS:
        text = pattern.sub(mask, text)
    return text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, trace/span ids and extras."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            entry["trace_id"] = format(context.trace_id, "032x")
            entry["span_id"] = format(context.span_id, "016x")
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(service: str, level: str = "info") -> None:
    """Route every logger to stderr as JSON lines; call once at process start."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # grpc and urllib3 are chatty at info level and say nothing an operator acts on.
    for noisy in ("grpc", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
