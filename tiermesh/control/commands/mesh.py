"""`tiermesh up|down|status|logs|trace`: the local mesh's lifecycle and what it shows."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def add_commands(sub: Any) -> None:
    """Register the mesh's lifecycle commands on the root parser's subparsers."""
    up = sub.add_parser("up", help="start the store, every tier and Envoy; wait until all serve")
    up.add_argument("--json", action="store_true", help="print the final status as JSON")
    up.add_argument(
        "--no-ask", dest="ask", action="store_false", help="skip the demo question asked once all tiers serve"
    )
    up.add_argument(
        "--replicas",
        action="append",
        default=[],
        metavar="TIER=N",
        help="processes for a tier, e.g. retriever=2 (default: <TIER>_REPLICAS in .env)",
    )
    up.set_defaults(run=cmd_up)

    down = sub.add_parser("down", help="stop everything `up` started (tiers drain first)")
    down.add_argument(
        "--timeout", type=float, default=120.0, help="seconds a component gets to drain before it is killed"
    )
    down.set_defaults(run=cmd_down)

    restart = sub.add_parser(
        "restart",
        help="rolling restart of a tier: one replica at a time, each back in Envoy's pool before the next",
    )
    restart.add_argument("tier", help="the tier to restart, e.g. retriever")
    restart.set_defaults(run=cmd_restart)

    scale = sub.add_parser(
        "scale",
        help="add or remove replicas of a running tier (needs ENVOY_CONFIG=xds); removed ones drain first",
    )
    scale.add_argument("assignment", metavar="TIER=N", help="a tier and its replica count, e.g. retriever=3")
    scale.set_defaults(run=cmd_scale)

    deploy = sub.add_parser(
        "deploy",
        help="start (or --remove) a tier's treatment deployment on a running mesh (needs ENVOY_CONFIG=xds)",
        description="Start a treatment deployment beside a tier's control on the running mesh: it gets "
        "no calls until `tiermesh traffic set TIER treatment=N`. --remove stops it once its weight is 0.",
    )
    deploy.add_argument("tier", help="the tier, e.g. retriever")
    what = deploy.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--treatment",
        nargs="*",
        metavar="KEY=VALUE",
        help="the settings the treatment differs in, e.g. RETRIEVER_NPROBE=16 (none: an A/A test)",
    )
    what.add_argument(
        "--remove", action="store_true", help="stop the tier's treatment (its weight must be 0)"
    )
    deploy.add_argument("--replicas", type=int, default=1, help="treatment replicas to start (default 1)")
    deploy.set_defaults(run=cmd_deploy)

    status = sub.add_parser(
        "status", help="addresses and health of every component (exit 1 if any is unwell)"
    )
    status.add_argument("--json", action="store_true", help="print a JSON object")
    status.set_defaults(run=cmd_status)

    logs = sub.add_parser("logs", help="print (or follow) component logs")
    logs.add_argument("component", nargs="?", help="store, envoy or a tier name (default: all)")
    logs.add_argument("-n", "--lines", type=int, default=40, help="lines of history to print")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.set_defaults(run=cmd_logs)

    trace = sub.add_parser("trace", help="one request's spans across every process, as a tree with timings")
    trace.add_argument("trace_id", help="the 32-hex-digit trace id (an answer's trace_id, a log line's)")
    trace.add_argument("--file", help="the JSON-lines trace file (default: the running mesh's)")
    trace.set_defaults(run=cmd_trace)


def _print_status(report: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
        return
    if not report:
        print("nothing is running (tiermesh up starts the mesh)")
        return
    for name, entry in report.items():
        addresses = "  ".join(
            f"{k}={v}" for k, v in entry.items() if k in ("host", "grpc", "http", "admin", "metrics", "url")
        )
        print(f"{name:<14} {entry['health']:<12} {_supervision(entry):<34} {addresses}")
        if entry.get("log_tail"):
            print("  " + entry["log_tail"].replace("\n", "\n  "))
        if entry.get("rejected"):
            print(f"  Envoy refused {entry['rejected']} configuration(s); last: {entry['last_rejection']}")


def _supervision(entry: dict) -> str:
    """'pid 123 up 5m 2s, 1 restart (last: signal SIGKILL)': how a component has been doing."""
    parts = [f"pid {entry['pid']}" if entry.get("pid") else "no process"]
    if "uptime_s" in entry:
        minutes, seconds = divmod(int(entry["uptime_s"]), 60)
        parts[0] += f" up {minutes}m {seconds}s" if minutes else f" up {seconds}s"
    if entry.get("restarts"):
        parts.append(f"{entry['restarts']} restart{'s' * (entry['restarts'] != 1)}")
    if entry.get("last_exit"):
        parts.append(f"last: {entry['last_exit']}")
    return ", ".join(parts)


def cmd_up(args: argparse.Namespace) -> int:
    from tiermesh.control.runner import Mesh

    for item in args.replicas:
        tier, _, count = item.partition("=")
        os.environ[f"{tier.strip().upper()}_REPLICAS"] = count.strip()
    started = time.perf_counter()
    mesh = Mesh()
    fresh = not mesh.running()
    report = mesh.up(progress=lambda line: print(f"  {line}", flush=True))
    print(f"mesh is up in {time.perf_counter() - started:.1f}s:")
    _print_status(report, args.json)
    envoy = report["envoy"]["grpc"]
    if args.ask and fresh and "gateway" in report:
        from services.gateway.cli import DEMO_QUESTION, cmd_ask

        print(f"\ndemo question, answered through every tier: {DEMO_QUESTION}\n")
        ask = argparse.Namespace(
            question=DEMO_QUESTION,
            user="demo",
            max_tokens=None,
            top_k=None,
            seed=7,
            stream=True,
            timeout=300.0,
            target=envoy,
        )
        if cmd_ask(ask) != 0:
            return 1
    print('\ntry: tiermesh ask "How does refinancing a car loan work?"')
    print(f"     buf curl --protocol grpc --http2-prior-knowledge --list-services http://{envoy}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from tiermesh.control.runner import Mesh

    Mesh().down(progress=lambda line: print(f"  {line}"), timeout=args.timeout)
    return 0


def cmd_restart(args: argparse.Namespace) -> int:
    from tiermesh.control.restart import rolling_restart
    from tiermesh.control.runner import Mesh
    from tiermesh.kit.topology import tier_named

    rolling_restart(Mesh(), tier_named(args.tier), progress=lambda line: print(f"  {line}", flush=True))
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    from tiermesh.control.runner import Mesh
    from tiermesh.control.scale import scale
    from tiermesh.kit.topology import tier_named

    tier, _, count = args.assignment.partition("=")
    if not count.strip().isdigit():
        print(f"error: expected TIER=N, e.g. retriever=3, got {args.assignment!r}", file=sys.stderr)
        return 2
    scale(Mesh(), tier_named(tier.strip()), int(count), progress=lambda line: print(f"  {line}", flush=True))
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from tiermesh.control.deploy import deploy, remove
    from tiermesh.control.runner import Mesh
    from tiermesh.kit.topology import tier_named

    tier, progress = tier_named(args.tier), lambda line: print(f"  {line}", flush=True)
    if args.remove:
        remove(Mesh(), tier, progress=progress)
    else:
        deploy(Mesh(), tier, args.treatment, replicas=args.replicas, progress=progress)
        print(f"{tier.name}'s treatment takes no calls yet: tiermesh traffic set {tier.name} treatment=10")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from tiermesh.control.runner import Mesh

    report = Mesh().status()
    _print_status(report, args.json)
    healthy = {"SERVING", "LIVE"}
    return 0 if report and all(e["health"] in healthy for e in report.values()) else 1


def cmd_trace(args: argparse.Namespace) -> int:
    from tiermesh.control.runner import Mesh
    from tiermesh.control.traces import render, spans_of

    path = Path(args.file or os.environ.get("TIERMESH_TRACES_FILE") or Mesh().run_dir / "traces.jsonl")
    if not path.is_file():
        print(
            f"no trace file at {path} (TIERMESH_TRACES_EXPORTER=otlp sends spans elsewhere)", file=sys.stderr
        )
        return 1
    spans = spans_of(path, args.trace_id.strip().lower())
    if not spans:
        print(f"no spans of trace {args.trace_id} in {path}", file=sys.stderr)
        return 1
    print(render(spans))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from tiermesh.control.runner import Mesh

    mesh = Mesh()
    names = [args.component] if args.component else sorted(p.stem for p in mesh.log_dir.glob("*.log"))
    paths = [mesh.log_dir / f"{name}.log" for name in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        print(f"no log at {', '.join(missing)}", file=sys.stderr)
        return 1
    for path in paths:
        lines = path.read_text(errors="replace").splitlines()[-args.lines :]
        prefix = f"{path.stem:<9}| " if len(paths) > 1 else ""
        for line in lines:
            print(prefix + line)
    if args.follow:
        with contextlib.ExitStack() as stack:
            handles = [(p.stem, stack.enter_context(open(p, errors="replace"))) for p in paths]
            for _, handle in handles:
                handle.seek(0, os.SEEK_END)
            try:
                while True:
                    for name, handle in handles:
                        for line in handle.readlines():
                            print((f"{name:<9}| " if len(handles) > 1 else "") + line, end="", flush=True)
                    time.sleep(0.3)
            except KeyboardInterrupt:
                return 0
    return 0
