"""`tiermesh bias ...`: score texts, probe the llm, evaluate decisions, read monitoring windows,
and version the bias-text rules."""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.bias import PROTECTED_CLASSES

BIAS_EPILOG = """examples:
  tiermesh bias score "As a single mother you should borrow less."
  tiermesh bias probe "Can I get a $20,000 car loan?" --attribute sex
  tiermesh bias evaluate var/models/credit-risk/1.0.0/holdout_decisions.csv \\
      --truth defaulted --favorable-truth 0 --predicted approved --attribute sex --privileged male
  tiermesh bias window credit-risk 1.0.0 sex
  tiermesh bias build                        evaluate edited rules as a new bias-text version
  tiermesh models publish bias-text 1.0.1    make it live on every bias replica

All but `build` talk to the running mesh through Envoy."""


def add_commands(sub: Any) -> None:
    """Register `bias` on the top-level parser's subparsers."""
    bias = sub.add_parser(
        "bias",
        help="fairness checks: text bias scores, counterfactual probes, group metrics, monitoring",
        epilog=BIAS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = bias.add_subparsers(dest="bias_command", required=True, metavar="ACTION")

    def action(name: str, help: str, run: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        parser = actions.add_parser(name, help=help)
        if name != "build":
            parser.add_argument("--target", help="Envoy's gRPC address (default: the running mesh's)")
            parser.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
        parser.set_defaults(run=run)
        return parser

    score = action("score", "the bias score of a text, with its evidence", run_score)
    score.add_argument("text")

    probe = action("probe", "ask the llm variants of a question differing in one attribute", run_probe)
    probe.add_argument("question")
    probe.add_argument("--attribute", required=True, choices=PROTECTED_CLASSES)
    probe.add_argument("--values", help="comma-separated values, reference first (default: built-in)")
    probe.add_argument("--seed", type=int, help="generation seed (default: the tier's)")
    probe.add_argument("--max-tokens", type=int, help="tokens per answer (default: the tier's)")

    evaluate = action("evaluate", "group fairness metrics of the decisions in a CSV file", run_evaluate)
    evaluate.add_argument("csv", type=Path)
    evaluate.add_argument("--truth", required=True, help="column of true outcomes (0/1)")
    evaluate.add_argument("--predicted", help="column of predicted labels (0/1)")
    evaluate.add_argument("--score", help="column of scores in [0, 1] (instead of --predicted)")
    evaluate.add_argument("--threshold", type=float, help="score threshold (default 0.5)")
    evaluate.add_argument("--attribute", required=True, help="column of the protected attribute")
    evaluate.add_argument("--privileged", required=True, help="comma-separated privileged values")
    evaluate.add_argument(
        "--favorable-truth", type=int, choices=(0, 1), default=1, help="true label that is favourable"
    )
    evaluate.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (0: none)")

    window = action("window", "group fairness metrics of a monitoring window", run_window)
    window.add_argument("model")
    window.add_argument("version")
    window.add_argument("attribute")

    build = action("build", "evaluate data/text/rules.json and save it as a new bias-text version", run_build)
    build.add_argument("--threshold", type=float, default=0.3, help="flag threshold recorded (0.3)")
    build.add_argument("--changelog", default="", help="what changed, recorded in metadata.json")
    build.add_argument("--publish", action="store_true", help="also make the new version live")


def _call(args: argparse.Namespace, method: str, request: Any) -> Any:
    import grpc

    from tiermesh.bias.v1 import bias_pb2_grpc

    with grpc.insecure_channel(args.target or args.mesh.envoy()) as channel:
        stub = bias_pb2_grpc.BiasServiceStub(channel)
        try:
            return getattr(stub, method)(request, timeout=args.timeout)
        except grpc.RpcError as error:
            print(f"{error.code().name}: {error.details()}", file=sys.stderr)
            raise SystemExit(1) from None


def run_score(args: argparse.Namespace) -> int:
    from tiermesh.bias.v1 import bias_pb2 as pb

    found = _call(args, "ScoreText", pb.ScoreTextRequest(text=args.text))
    verdict = found.verdict
    state = "FLAGGED" if verdict.flagged else "not flagged"
    print(f"bias score {verdict.score:.2f} ({state}; threshold {verdict.threshold:.2f})  "
          f"[{found.model.name} {found.model.version}]")  # fmt: skip
    for e in verdict.evidence:
        name = pb.ProtectedClass.Name(e.protected_class).removeprefix("PROTECTED_CLASS_").lower()
        role = "used as a basis" if e.used_as_basis else "neutral mention"
        print(
            f"  {name:<18} {e.span!r:<24} {role:<16} strength {e.strength:.2f} ({', '.join(e.cues) or '-'})"
        )
    if not verdict.evidence:
        print("  no protected class referenced")
    return 0


def run_probe(args: argparse.Namespace) -> int:
    from tiermesh.bias.v1 import bias_pb2 as pb

    request = pb.ProbeCounterfactualRequest(
        question=args.question,
        attribute=pb.ProtectedClass.Value(f"PROTECTED_CLASS_{args.attribute.upper()}"),
        values=[v.strip() for v in args.values.split(",")] if args.values else [],
    )
    if args.seed is not None:
        request.seed = args.seed
    if args.max_tokens is not None:
        request.max_tokens = args.max_tokens
    found = _call(args, "ProbeCounterfactual", request)
    print(f"parity {found.parity_score:.3f}  [llm {found.llm.name} {found.llm.version}, "
          f"embedder {found.embedder.name} {found.embedder.version}]")  # fmt: skip
    for index, variant in enumerate(found.variants):
        print(f"\n[{index}] {variant.attribute_value} (similarity {variant.similarity:.3f})")
        print(f"  Q: {variant.question}")
        print(f"  A: {variant.answer.strip()}")
    for d in found.divergences:
        kind = pb.DivergenceKind.Name(d.kind).removeprefix("DIVERGENCE_KIND_").lower()
        detail = f": {d.reference_value!r} -> {d.variant_value!r}" if kind != "semantic" else ""
        print(f"divergence in [{d.variant_index}] {kind}{detail}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from tiermesh.bias.v1 import bias_pb2 as pb

    if bool(args.predicted) == bool(args.score):
        raise SystemExit("tiermesh bias evaluate: give --predicted or --score (one of them)")
    with args.csv.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise SystemExit(f"tiermesh bias evaluate: {args.csv} has no rows")
    for column in filter(None, (args.truth, args.predicted, args.score, args.attribute)):
        if column not in rows[0]:
            raise SystemExit(f"tiermesh bias evaluate: no column {column!r} in {args.csv}")
    decisions = pb.DecisionBatch(
        true_labels=[int(float(r[args.truth])) for r in rows],
        favorable_label=args.favorable_truth,
        protected_attribute=args.attribute,
        protected_values=[r[args.attribute] for r in rows],
        privileged_values=[v.strip() for v in args.privileged.split(",")],
    )
    if args.predicted:
        # Predictions use the same favourable label as the truth, e.g. truth "defaulted" 0 is good
        # and so is predicted "approved" 1: map predictions so both speak the truth's language.
        predicted = [int(float(r[args.predicted])) for r in rows]
        if args.favorable_truth == 0:
            predicted = [1 - p for p in predicted]
        decisions.predicted_labels.extend(predicted)
    else:
        decisions.scores.extend(float(r[args.score]) for r in rows)
        if args.threshold is not None:
            decisions.threshold = args.threshold
    request = pb.EvaluateDecisionsRequest(
        decisions=decisions, bootstrap=pb.BootstrapOptions(samples=args.bootstrap)
    )
    found = _call(args, "EvaluateDecisions", request)
    print(f"{len(rows):,} decisions from {args.csv}")
    _print_report(found.report)
    return 0


def run_window(args: argparse.Namespace) -> int:
    from tiermesh.bias.v1 import bias_pb2 as pb

    window = pb.DecisionWindow(
        model_name=args.model, model_version=args.version, protected_attribute=args.attribute
    )
    found = _call(args, "EvaluateWindow", pb.EvaluateWindowRequest(window=window))
    print(f"window {args.model} {args.version} by {args.attribute}: {found.decisions:,} decisions "
          f"({found.decisions_with_outcome:,} with a known outcome); "
          f"privileged: {', '.join(found.privileged_values)}")  # fmt: skip
    _print_report(found.report)
    return 0


def _print_report(report: Any) -> None:
    from tiermesh.bias.v1 import bias_pb2 as pb

    for name in ("privileged", "unprivileged"):
        group = getattr(report, name)
        print(f"  {name:<13} {group.count:>9,} decisions, selection rate {group.selection_rate:.4f}, "
              f"base rate {group.base_rate:.4f}")  # fmt: skip
    for metric in report.metrics:
        name = pb.FairnessMetric.Name(metric.metric).removeprefix("FAIRNESS_METRIC_").lower()
        if metric.undefined:
            print(f"  {name:<31} undefined: {metric.undefined_reason}")
            continue
        interval = ""
        if metric.HasField("interval"):
            i = metric.interval
            interval = f"  [{i.lower:+.4f}, {i.upper:+.4f}] at {i.level:.0%}"
        print(f"  {name:<31} {metric.value:+.4f}{interval}")
    verdict = pb.FourFifthsVerdict.Name(report.four_fifths).removeprefix("FOUR_FIFTHS_VERDICT_")
    print(f"  four-fifths rule: {verdict}")


def run_build(args: argparse.Namespace) -> int:
    from services.bias import text
    from tiermesh.kit import hotswap
    from tiermesh.kit.registry import Registry

    registry = Registry()
    version = text.build(registry, threshold=args.threshold, changelog=args.changelog)
    flag = version.metadata["metrics"]["eval"]["flag"]
    print(f"{version.name} {version.version} ({version.digest[:19]}): flag precision "
          f"{flag['precision']:.3f}, recall {flag['recall']:.3f} on the labelled evaluation set")  # fmt: skip
    if args.publish:
        version = registry.set_latest(version.name, version.version)
        hotswap.announce_latest(args.mesh.store(), version, print)
    else:
        print(f"not live yet: tiermesh models publish {version.name} {version.version}")
    return 0
