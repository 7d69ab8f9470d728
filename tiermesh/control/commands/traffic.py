"""`tiermesh traffic|experiment|rollout`: A/B traffic, experiments and rollouts from the terminal."""

from __future__ import annotations

import argparse
import json
import time

TRAFFIC_EPILOG = """examples:
  tiermesh traffic show                      the weights Envoy uses now, per tier
  tiermesh traffic set llm treatment=10      10% of users (by x-tiermesh-user) to llm's treatment
  tiermesh traffic set llm control=100       everyone back to the control"""

EXPERIMENT_EPILOG = """examples:
  tiermesh experiment start llm --treatment 20   send 20% of users to the treatment and measure
  tiermesh experiment status                     running experiments and their counts so far
  tiermesh experiment report llm                 per-arm figures, Bayesian + frequentist read-out
  tiermesh experiment stop llm                   freeze the window (traffic stays as it is)"""

ROLLOUT_EPILOG = """example:
  tiermesh rollout llm --steps 5,20,50,100 --hold 5m
rolls back to 0% by itself when the treatment's error rate exceeds 2x the control's or its p95
latency 1.5x (--max-error-ratio, --max-p95-ratio); exit status 1 after a rollback."""


def _admin():
    from tiermesh.control.traffic import EnvoyAdmin, admin_address

    return EnvoyAdmin(admin_address())


def _experiments():
    import redis

    from tiermesh.control.experiment import Experiments
    from tiermesh.control.runner import Mesh, store_url

    return Experiments(redis.Redis.from_url(store_url(), socket_timeout=5), _admin(), Mesh().state())


def cmd_traffic(args: argparse.Namespace) -> int:
    from tiermesh.control.traffic import parse_assignment, set_treatment, splits

    admin = _admin()
    if args.traffic_command == "show":
        current = splits(admin)
        if args.json:
            print(json.dumps({tier: split.shares() for tier, split in current.items()}))
        else:
            print("\n".join(split.describe() for split in current.values()))
        return 0
    percent = parse_assignment(args.weight)
    before, after, elapsed = set_treatment(admin, args.tier, percent)
    print(
        f"{args.tier}: treatment {before.percent('treatment'):.2f}% -> {after.percent('treatment'):.2f}% "
        f"(control {after.percent('control'):.2f}%), applied by Envoy in {elapsed * 1000:.0f} ms"
    )
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from tiermesh.control.experiment import render

    experiments = _experiments()
    action = args.experiment_command
    if action == "start":
        experiment = experiments.start(args.tier, name=args.name, treatment_percent=args.treatment)
        print(
            f"experiment {experiment.name} started on {args.tier}: treatment serves "
            f"{experiment.treatment_percent:g}% of users; tiermesh experiment report {args.tier} reads it out"
        )
        return 0
    if action == "status":
        rows = [experiments.get(args.tier)] if args.tier else experiments.all()
        if not rows:
            print("no experiments (tiermesh experiment start <tier>)")
        for experiment in rows:
            counts = experiments.traffic(experiment)
            state = "running" if experiment.running else "stopped"
            age = (experiment.stopped_at or time.time()) - experiment.started_at
            arms = ", ".join(f"{arm} {c.requests} calls/{c.failures} errors" for arm, c in counts.items())
            print(f"{experiment.tier:<12} {experiment.name}  {state} {age:.0f}s  {arms}")
        return 0
    if action == "stop":
        experiment = experiments.stop(args.tier)
        print(
            f"experiment {experiment.name} on {args.tier} stopped; "
            "traffic is left as it is (tiermesh traffic show)"
        )
        return 0
    report = experiments.report(
        args.tier,
        confidence=args.confidence,
        min_feedback=args.min_feedback,
        max_p95_ratio=args.max_p95_ratio,
    )
    print(json.dumps(report.to_dict(), indent=2, default=str) if args.json else render(report))
    return 0


def cmd_rollout(args: argparse.Namespace) -> int:
    from tiermesh.control.rollout import Guard, parse_duration, parse_steps, rollout

    steps, hold = parse_steps(args.steps), parse_duration(args.hold)
    guard = Guard(args.max_error_ratio, args.max_p95_ratio, args.min_requests)

    def log(line: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)

    try:
        outcome = rollout(_admin(), args.tier, steps, hold, guard, interval_s=args.interval, log=log)
    except KeyboardInterrupt:
        from tiermesh.control.traffic import split_of

        share = split_of(_admin(), args.tier).percent("treatment")
        log(
            f"{args.tier}: rollout interrupted; treatment left at {share:g}% "
            "(tiermesh traffic set changes it)"
        )
        return 130
    return 0 if outcome.completed else 1


def add_commands(sub: argparse._SubParsersAction) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    traffic = sub.add_parser(
        "traffic",
        help="A/B weights per tier, live through Envoy's admin",
        epilog=TRAFFIC_EPILOG,
        formatter_class=raw,
    )
    actions = traffic.add_subparsers(dest="traffic_command", required=True, metavar="ACTION")
    show = actions.add_parser("show", help="the weights Envoy is using now")
    show.add_argument("--json", action="store_true", help="print a JSON object")
    set_ = actions.add_parser("set", help="move users between a tier's arms (sticky per user id)")
    set_.add_argument("tier", help="embedder, retriever, llm, classifiers, bias or gateway")
    set_.add_argument("weight", metavar="ARM=PERCENT", help="treatment=<0-100> or control=<0-100>")
    traffic.set_defaults(run=cmd_traffic)

    experiment = sub.add_parser(
        "experiment",
        help="measure a tier's treatment against its control",
        epilog=EXPERIMENT_EPILOG,
        formatter_class=raw,
    )
    actions = experiment.add_subparsers(dest="experiment_command", required=True, metavar="ACTION")
    start = actions.add_parser("start", help="open a measurement window (optionally setting the weight)")
    start.add_argument("tier")
    start.add_argument("--treatment", type=float, metavar="PERCENT", help="set the treatment's share first")
    start.add_argument("--name", default="", help="a name for the records (default: <tier>-<time>)")
    status = actions.add_parser("status", help="experiments and their traffic so far")
    status.add_argument("tier", nargs="?")
    stop = actions.add_parser("stop", help="close the window (weights are left as they are)")
    stop.add_argument("tier")
    report = actions.add_parser("report", help="per-arm figures, read-outs and a recommendation")
    report.add_argument("tier")
    report.add_argument("--json", action="store_true", help="print a JSON object")
    report.add_argument("--confidence", type=float, default=0.95, help="P needed to decide (default 0.95)")
    report.add_argument("--min-feedback", type=int, default=30, help="rated answers per arm before deciding")
    report.add_argument("--max-p95-ratio", type=float, default=1.5, help="latency guardrail (default 1.5)")
    experiment.set_defaults(run=cmd_experiment)

    roll = sub.add_parser(
        "rollout",
        help="move a treatment up step by step; roll back on errors or latency",
        epilog=ROLLOUT_EPILOG,
        formatter_class=raw,
    )
    roll.add_argument("tier")
    roll.add_argument("--steps", default="5,20,50,100", help="treatment percentages (default 5,20,50,100)")
    roll.add_argument("--hold", default="60s", help="time at each step: 90s, 5m, 1h (default 60s)")
    roll.add_argument(
        "--max-error-ratio", type=float, default=2.0, help="roll back above this x control's error rate"
    )
    roll.add_argument("--max-p95-ratio", type=float, default=1.5, help="roll back above this x control's p95")
    roll.add_argument(
        "--min-requests", type=int, default=20, help="calls per arm before judging (default 20)"
    )
    roll.add_argument("--interval", type=float, default=1.0, help="seconds between checks (default 1)")
    roll.set_defaults(run=cmd_rollout)
