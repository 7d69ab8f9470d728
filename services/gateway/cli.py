"""`tiermesh ask`: one question through the whole mesh (the gateway's AdvisorService via Envoy)."""

from __future__ import annotations

import argparse
import sys
import textwrap
from typing import Any

DEMO_QUESTION = "Can I afford a $25,000 car loan on $4,000 a month?"


def add_commands(sub: Any) -> None:
    """Register `ask` on the top-level parser's subparsers."""
    ask = sub.add_parser(
        "ask",
        help="ask the advisor a loan question through the whole mesh",
        epilog='example:\n  tiermesh ask "Can I afford a $25,000 car loan on $4,000 a month?" --stream',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ask.add_argument("question", help="the question")
    ask.add_argument("--user", default="cli", help="end-user id (keeps A/B arms sticky; default: cli)")
    ask.add_argument("--max-tokens", type=int, help="most tokens of advice (default: the gateway's, 200)")
    ask.add_argument("--top-k", type=int, help="passages used as context (default: the gateway's, 4)")
    ask.add_argument("--seed", type=int, help="generation seed, for a reproducible answer")
    ask.add_argument("--stream", action="store_true", help="print the advice as it is generated")
    ask.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the answer")
    ask.add_argument("--target", help="Envoy's gRPC address (default: the running mesh's)")
    ask.set_defaults(run=cmd_ask)


def cmd_ask(args: argparse.Namespace) -> int:
    import grpc

    from tiermesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

    options = gateway_pb2.AdviseOptions()
    for name in ("max_tokens", "top_k", "seed"):
        if getattr(args, name) is not None:
            setattr(options, name, getattr(args, name))
    request = {"question": args.question, "user_id": args.user, "options": options}
    with grpc.insecure_channel(args.target or args.mesh.envoy()) as channel:
        stub = gateway_pb2_grpc.AdvisorServiceStub(channel)
        try:
            if args.stream:
                advice = None
                for message in stub.AdviseStream(
                    gateway_pb2.AdviseStreamRequest(**request), timeout=args.timeout
                ):
                    if message.HasField("chunk"):
                        print(message.chunk.text, end="", flush=True)
                    else:
                        advice = message.advice
                print()
            else:
                advice = stub.Advise(gateway_pb2.AdviseRequest(**request), timeout=args.timeout).advice
        except grpc.RpcError as error:
            print(f"{error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    if advice is None:
        print("the answer stream ended without its final message", file=sys.stderr)
        return 1
    print(describe(advice, with_text=not args.stream))
    return 0


def _enum(enum: Any, value: int, prefix: str) -> str:
    return enum.Name(value).removeprefix(prefix).lower()


def describe(advice: Any, *, with_text: bool = True) -> str:
    """A terminal rendering of an Advice: text, sources, intent, bias, versions, timings, trace."""
    from tiermesh.gateway.v1 import gateway_pb2

    lines = []
    if with_text:
        lines += [textwrap.fill(advice.text, 100), ""]
    if advice.out_of_scope:
        lines.append("out of scope: the question is not about loans or credit; the llm was not asked")
    if advice.sources:
        lines.append("sources:")
        lines += [f"  [{n}] {s.doc_id}  {s.title} ({s.score:.3f})" for n, s in enumerate(advice.sources, 1)]
    if advice.HasField("intent"):
        lines.append(f"intent: {advice.intent.label} ({advice.intent.probability:.2f})")
    if advice.entities:
        lines.append("entities: " + ", ".join(f"{e.text} ({_label(e.label)})" for e in advice.entities))
    bias = advice.bias
    if bias.status == gateway_pb2.BIAS_CHECK_STATUS_CHECKED:
        verdict = bias.verdict
        flag = "FLAGGED" if verdict.flagged else "not flagged"
        lines.append(f"bias: score {verdict.score:.2f} ({flag}, threshold {verdict.threshold:.2f})")
    else:
        lines.append(f"bias: UNCHECKED ({bias.unchecked_reason}); do not treat this advice as checked")
    if advice.degraded_modes:
        modes = ", ".join(_enum(gateway_pb2.DegradedMode, m, "DEGRADED_MODE_") for m in advice.degraded_modes)
        lines.append(f"degraded: {modes}")
    lines.append("versions:")
    lines += [
        f"  {_enum(gateway_pb2.Tier, v.tier, 'TIER_'):<12} {v.model.name} {v.model.version}"
        + (f"  (arm {_enum(gateway_pb2.Arm, v.arm, 'ARM_')})" if v.arm else "")
        for v in advice.versions
    ]
    hops = ", ".join(
        f"{t.rpc} {t.duration.ToNanoseconds() / 1e6:.0f} ms"
        + ("" if t.status_code == "OK" else f" {t.status_code}")
        for t in advice.timings
    )
    total = advice.total_duration.ToNanoseconds() / 1e6
    lines.append(f"timings: {hops}; total {total:.0f} ms" + (" (cached answer)" if advice.cached else ""))
    lines.append(f"trace: {advice.trace_id}  (tiermesh trace {advice.trace_id} draws it)")
    lines.append(f"response: {advice.response_id}  (rate it with POST /v1/feedback)")
    return "\n".join(lines)


def _label(value: int) -> str:
    from tiermesh.classifiers.v1 import classifiers_pb2

    return _enum(classifiers_pb2.EntityLabel, value, "ENTITY_LABEL_")
