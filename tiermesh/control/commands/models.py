"""`tiermesh models ...`: the local model registry (list, show, prepare, publish, roll back)."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any


def add_commands(sub: Any) -> None:
    """Register `models` on the root parser's subparsers."""
    models = sub.add_parser("models", help="the local model registry")
    actions = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    actions.add_parser("list", help="every published version (* marks latest)").set_defaults(run=cmd_list)
    show = actions.add_parser("show", help="a version's metadata.json")
    show.add_argument("name")
    show.add_argument("version", nargs="?", default="latest")
    show.set_defaults(run=cmd_show)
    prepare = actions.add_parser(
        "prepare", help="convert packaged models, build the demo index, publish them (idempotent)"
    )
    prepare.add_argument("--force", action="store_true", help="export again even if already published")
    prepare.set_defaults(run=cmd_prepare)
    publish = actions.add_parser(
        "publish", help="make a trained version live on every replica (hot swap, announced on the store)"
    )
    publish.add_argument("name", help="e.g. loan-intent, financial-ner, credit-risk, transaction-anomaly")
    publish.add_argument("version")
    publish.set_defaults(run=cmd_publish)
    rollback = actions.add_parser(
        "rollback", help="make the version published before the live one live again"
    )
    rollback.add_argument("name")
    rollback.set_defaults(run=cmd_publish)


def cmd_prepare(args: argparse.Namespace) -> int:
    """Every tier's set-up, in dependency order: MiniLM first (the index and the intent head
    embed with it), then the index, the llm, the classifiers and the bias rules."""
    from services.bias import text
    from services.classifiers import training
    from services.embedder.export import prepare as prepare_embedder
    from services.llm.convert import prepare as prepare_llm
    from services.retriever import manage
    from tiermesh.kit.registry import Registry

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    registry = Registry()
    prepared = [prepare_embedder(registry, force=args.force), manage.prepare(registry)]
    prepared.append(prepare_llm(registry, force=args.force))
    for model in [*prepared, *training.prepare(registry), text.prepare(registry)]:
        print(f"{model.name} {model.version} {model.digest} at {model.path}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from tiermesh.kit.registry import Registry

    print(json.dumps(Registry().get(args.name, args.version).metadata, indent=2))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from tiermesh.kit.registry import Registry

    registry = Registry()
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


def cmd_publish(args: argparse.Namespace) -> int:
    """`publish` or `rollback` a trained model, then announce the new `latest` on the store."""
    from tiermesh.kit import hotswap
    from tiermesh.kit.registry import Registry, RegistryError

    registry = Registry()

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
    hotswap.announce_latest(args.mesh.store(), version, print)
    return 0
