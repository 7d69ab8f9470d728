"""`tiermesh trace <trace id>`: one request's spans, from the JSON-lines trace file, as a tree.

Every process of the local mesh appends its finished spans to one file (`TIERMESH_TRACES_FILE`,
by default `$TIERMESH_HOME/run/traces.jsonl`), so a request's whole path — the gateway's REST
span, its calls, each tier's server span — can be read back by its trace id.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def spans_of(path: Path, trace_id: str) -> list[dict[str, Any]]:
    """Every span of `trace_id` in the file (lines that are not spans are skipped)."""
    found = []
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            if trace_id not in line:  # cheap filter before parsing
                continue
            try:
                span = json.loads(line)
            except ValueError:
                continue
            if span.get("trace_id") == trace_id:
                found.append(span)
    return found


def render(spans: Iterable[dict[str, Any]]) -> str:
    """The spans as an indented tree, children in start order, with durations and start offsets."""
    spans = sorted(spans, key=lambda span: span["start_ns"])
    if not spans:
        return ""
    ids = {span["span_id"] for span in spans}
    children: dict[str | None, list[dict[str, Any]]] = defaultdict(list)
    for span in spans:
        # a parent outside the file (e.g. the caller's own span) makes the span a root
        children[span["parent_span_id"] if span["parent_span_id"] in ids else None].append(span)
    start = spans[0]["start_ns"]
    width = max(len(span["service"]) for span in spans)
    lines: list[str] = []

    def walk(span: dict[str, Any], depth: int) -> None:
        took = (span["end_ns"] - span["start_ns"]) / 1e6
        at = (span["start_ns"] - start) / 1e6
        status = "" if span.get("status") != "ERROR" else "  ERROR"
        kind = span.get("kind", "").lower()
        lines.append(
            f"{at:>9.1f} ms  {took:>9.1f} ms  {span['service']:<{width}}  "
            f"{'  ' * depth}{span['name']} ({kind}){status}"
        )
        for child in children.get(span["span_id"], []):
            walk(child, depth + 1)

    for root in children[None]:
        walk(root, 0)
    header = f"{'start':>12}  {'duration':>12}  {'service':<{width}}  span"
    return "\n".join([header, *lines])
