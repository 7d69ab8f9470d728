"""`tiermesh trace`: a request's spans read back from the JSON-lines file and drawn as a tree."""

import json

from tiermesh.control.traces import render, spans_of

TRACE = "0af7651916cd43dd8448eb211c80319c"


def span(name, span_id, parent, start_ms, end_ms, *, kind="CLIENT", service="tiermesh-gateway", **extra):
    return {
        "service": service,
        "name": name,
        "kind": kind,
        "trace_id": TRACE,
        "span_id": span_id,
        "parent_span_id": parent,
        "start_ns": int(start_ms * 1e6),
        "end_ns": int(end_ms * 1e6),
        "status": "UNSET",
        "attributes": {},
        **extra,
    }


def test_spans_are_drawn_as_a_tree_in_start_order_with_offsets_and_durations(tmp_path):
    path = tmp_path / "traces.jsonl"
    spans = [
        span("LlmService/Generate", "c2", "root", 30, 2030),  # ended last, so written last
        span("POST /v1/advice", "root", "caller-outside-the-file", 0, 2050, kind="SERVER"),
        span("EmbedderService/Embed", "c1", "root", 2, 20),
        span("EmbedderService/Embed", "s1", "c1", 4, 18, kind="SERVER", service="tiermesh-embedder"),
        span("BiasService/ScoreText", "c3", "root", 2031, 2040, status="ERROR"),
        span("another request", "x", None, 0, 1, trace_id="f" * 32),
    ]
    path.write_text("".join(json.dumps(item) + "\n" for item in spans) + "not json " + TRACE + "\n")

    found = spans_of(path, TRACE)
    assert len(found) == 5  # the other trace and the broken line are left out
    lines = render(found).splitlines()[1:]
    assert [line.split("  ")[-1].strip() for line in lines] == [
        "POST /v1/advice (server)",  # its parent is not in the file: a root
        "EmbedderService/Embed (client)",
        "EmbedderService/Embed (server)",
        "LlmService/Generate (client)",
        "ERROR",  # the last column of the failed call
    ]
    assert lines[2].split()[4] == "tiermesh-embedder" and "      EmbedderService" in lines[2]  # depth 2
    assert lines[3].split()[:4] == ["30.0", "ms", "2000.0", "ms"]  # start offset, duration
    assert lines[4].endswith("ScoreText (client)  ERROR")


def test_nothing_to_draw_for_an_unknown_trace(tmp_path):
    path = tmp_path / "traces.jsonl"
    path.write_text(json.dumps(span("x", "a", None, 0, 1)) + "\n")
    assert spans_of(path, "1" * 32) == [] and render([]) == ""
