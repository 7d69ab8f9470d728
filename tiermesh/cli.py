"""`tiermesh`: run the local mesh, manage the model registry, regenerate the contract's stubs."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EPILOG = """examples:
  tiermesh up                      start store, tiers and Envoy; wait until all are SERVING
  tiermesh status --json           addresses and health of every component
  tiermesh embed "What is APR?"    embed a text through Envoy
  tiermesh logs embedder -f        follow a tier's JSON log
  tiermesh search "Can I repay my car loan early?"   ask the retriever through Envoy
  tiermesh index build             build a new index version of the knowledge base
  tiermesh index publish VERSION   make it live on every retriever replica (hot swap)
  tiermesh models list             published model versions
  tiermesh train intent            retrain a classifier model (a new version, not live yet)
  tiermesh models publish loan-intent 1.0.1   make it live on every classifiers replica
  tiermesh traffic set llm treatment=10       10% of users to llm's treatment (sticky per user)
  tiermesh experiment report llm              how the treatment does against the control
  tiermesh rollout llm --steps 5,20,50,100 --hold 5m   step up, roll back on errors/latency
  tiermesh down                    stop everything gracefully

environment: TIERMESH_HOME (default ./var) holds models, run state and logs; ports come from .env
and can be overridden by variables of the same name; REDIS_URL uses an existing Redis/Valkey."""


def _print_status(report: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
        return
    if not report:
        print("nothing is running (tiermesh up starts the mesh)")
        return
    for name, entry in report.items():
        addresses = "  ".join(
            f"{k}={v}" for k, v in entry.items() if k in ("grpc", "http", "admin", "metrics", "url")
        )
        print(f"{name:<10} {entry['health']:<12} {addresses}")


def cmd_up(args: argparse.Namespace) -> int:
    from tiermesh.runner import Mesh

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
    from tiermesh.runner import Mesh

    Mesh().down(progress=lambda line: print(f"  {line}"), timeout=args.timeout)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from tiermesh.runner import Mesh

    report = Mesh().status()
    _print_status(report, args.json)
    healthy = {"SERVING", "LIVE"}
    return 0 if report and all(e["health"] in healthy for e in report.values()) else 1


def cmd_trace(args: argparse.Namespace) -> int:
    from tiermesh.runner import Mesh
    from tiermesh.traces import render, spans_of

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
    from tiermesh.runner import Mesh

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


def cmd_embed(args: argparse.Namespace) -> int:
    import grpc

    from tiermesh.embedder.v1 import embedder_pb2, embedder_pb2_grpc
    from tiermesh.runner import envoy_address

    target = args.target or envoy_address()
    with grpc.insecure_channel(target) as channel:
        stub = embedder_pb2_grpc.EmbedderServiceStub(channel)
        try:
            response = stub.EmbedBatch(embedder_pb2.EmbedBatchRequest(texts=args.texts), timeout=args.timeout)
        except grpc.RpcError as error:
            print(f"{error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    model = response.model
    print(f"model {model.name} {model.version} ({model.digest[:19]}), dimension {response.dimension}")
    print(f"via {target}")
    for text, embedding in zip(args.texts, response.embeddings, strict=True):
        head = ", ".join(f"{v:+.4f}" for v in embedding.values[:5])
        print(f"  [{head}, ...] tokens={embedding.token_count} cached={embedding.cached}  {text[:60]!r}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from tiermesh.registry import Registry

    registry = Registry()
    if args.models_command == "prepare":
        from services.embedder.export import prepare

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        published = prepare(registry, force=args.force)
        print(f"{published.name} {published.version} {published.digest} at {published.path}")
        from services.retriever import manage

        index = manage.prepare(registry)
        print(f"{index.name} {index.version} {index.digest} at {index.path}")
        from services.llm.convert import prepare as prepare_llm

        llm = prepare_llm(registry, force=args.force)
        print(f"{llm.name} {llm.version} {llm.digest} at {llm.path}")
        from services.bias import text
        from services.classifiers import training

        for model in [*training.prepare(registry), text.prepare(registry)]:
            print(f"{model.name} {model.version} {model.digest} at {model.path}")
        return 0
    if args.models_command in ("publish", "rollback"):
        return _publish(registry, args)
    if args.models_command == "show":
        version = registry.get(args.name, args.version)
        print(json.dumps(version.metadata, indent=2))
        return 0
    rows = []
    for name in registry.names():
        latest = registry.latest(name)
        for version in registry.versions(name):
            mark = "*" if latest and latest.version == version.version else " "
            rows.append(
                (name, mark + version.version, version.metadata.get("created", ""), version.digest[:19])
            )
    if not rows:
        print(f"no models under {registry.root} (tiermesh models prepare publishes them)")
        return 0
    print(f"{'NAME':<22}{'VERSION':<15}{'CREATED':<31}DIGEST   (* = latest)")
    for name, version, created, digest in rows:
        print(f"{name:<22}{version:<15}{created:<31}{digest}")
    return 0


def _publish(registry: Any, args: argparse.Namespace) -> int:
    from tiermesh import hotswap, runner
    from tiermesh.registry import RegistryError

    def trained(name: str) -> bool:
        return any("trainer" in v.metadata.get("source", {}) for v in registry.versions(name))

    # Only trained models go live this way: an index needs its recall check (`tiermesh index
    # publish`), and the embedder and llm versions come from `tiermesh models prepare`.
    if not trained(args.name):
        known = [name for name in registry.names() if trained(name)]
        raise RegistryError(
            f"{args.name!r} is not a trained model ({', '.join(known) or 'none published'}); "
            "publish indexes with `tiermesh index publish`"
        )
    if args.models_command == "publish":
        version = registry.set_latest(args.name, args.version)
    else:
        version = registry.rollback(args.name)
    hotswap.announce_latest(runner.store_url(), version, print)
    return 0


def cmd_protos(args: argparse.Namespace) -> int:
    from tiermesh import contract

    if args.protos_command == "check":
        stale = contract.stale()
        if stale:
            print("generated stubs are stale (run: tiermesh protos generate):\n  " + "\n  ".join(stale))
            return 1
        print("generated stubs are up to date")
        return 0
    for path in contract.generate():
        print(path)
    return 0


def cmd_envoy(args: argparse.Namespace) -> int:
    from tiermesh.envoy_config import render_envoy
    from tiermesh.runner import read_settings

    config = render_envoy(read_settings())
    if args.output:
        Path(args.output).write_text(config)
    else:
        print(config)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tiermesh",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
    down.add_argument("--timeout", type=float, default=20.0, help="seconds before a process is killed")
    down.set_defaults(run=cmd_down)

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

    embed = sub.add_parser("embed", help="embed texts through Envoy and print the vectors' first values")
    embed.add_argument("texts", nargs="+", help="texts to embed")
    embed.add_argument("--target", help="host:port to call (default: the running mesh's Envoy)")
    embed.add_argument("--timeout", type=float, default=10.0, help="deadline in seconds")
    embed.set_defaults(run=cmd_embed)

    models = sub.add_parser("models", help="the local model registry")
    models_sub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    models_sub.add_parser("list", help="every published version (* marks latest)")
    show = models_sub.add_parser("show", help="a version's metadata.json")
    show.add_argument("name")
    show.add_argument("version", nargs="?", default="latest")
    prepare = models_sub.add_parser(
        "prepare", help="convert packaged models, build the demo index, publish them (idempotent)"
    )
    prepare.add_argument("--force", action="store_true", help="export again even if already published")
    publish = models_sub.add_parser(
        "publish", help="make a trained version live on every replica (hot swap, announced on the store)"
    )
    publish.add_argument("name", help="e.g. loan-intent, financial-ner, credit-risk, transaction-anomaly")
    publish.add_argument("version")
    rollback = models_sub.add_parser(
        "rollback", help="make the version published before the live one live again"
    )
    rollback.add_argument("name")
    models.set_defaults(run=cmd_models)

    from services.bias.cli import add_commands as add_bias_commands
    from services.classifiers.cli import add_commands as add_classifier_commands
    from services.gateway.cli import add_commands as add_ask_commands
    from services.gateway.keys_cli import add_commands as add_keys_commands
    from services.retriever.cli import add_commands as add_retriever_commands

    add_retriever_commands(sub)
    add_classifier_commands(sub)
    add_bias_commands(sub)
    add_keys_commands(sub)
    add_ask_commands(sub)

    from tiermesh.traffic_cli import add_commands as add_traffic_commands

    add_traffic_commands(sub)

    protos = sub.add_parser("protos", help="the generated Python stubs of protos/")
    protos_sub = protos.add_subparsers(dest="protos_command", required=True, metavar="ACTION")
    protos_sub.add_parser("generate", help="regenerate tiermesh/<tier>/v1/*_pb2*.py from protos/")
    protos_sub.add_parser("check", help="exit 1 when the stubs differ from a fresh generation")
    protos.set_defaults(run=cmd_protos)

    envoy = sub.add_parser("envoy", help="Envoy configuration")
    envoy_sub = envoy.add_subparsers(dest="envoy_command", required=True, metavar="ACTION")
    render = envoy_sub.add_parser(
        "render", help="render envoy/*.tmpl with the ports from .env and the environment"
    )
    render.add_argument("-o", "--output", help="write to this file instead of stdout")
    envoy.set_defaults(run=cmd_envoy)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tiermesh.registry import RegistryError
    from tiermesh.runner import RunnerError
    from tiermesh.traffic import TrafficError

    try:
        return args.run(args)
    except (RunnerError, RegistryError, TrafficError) as error:
        print(f"tiermesh {args.command}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
