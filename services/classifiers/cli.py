"""`tiermesh train ...`: rebuild a classifier model from the data in the repo, as a new version."""

from __future__ import annotations

import argparse
from typing import Any

from services.classifiers.config import MODELS

TRAIN_EPILOG = """A trained version is not live until published:
  tiermesh train intent                      train, evaluate, print the metrics and the version
  tiermesh models show loan-intent 1.0.1     its metadata.json (metrics, changelog, parameters)
  tiermesh models publish loan-intent 1.0.1  make it live on every replica (hot swap)
  tiermesh models rollback loan-intent       back to the version before

models: """ + ", ".join(f"{kind} = {name}" for kind, name in MODELS.items())


def add_commands(sub: Any) -> None:
    """Register `train` on the top-level parser's subparsers."""
    train = sub.add_parser(
        "train",
        help="train a classifier model from the repo's data and save it as a new version",
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("model", choices=tuple(MODELS), help="which model to train")
    train.add_argument("--seed", type=int, help="random seed (intent, credit, anomaly; default: the model's)")
    train.add_argument("--changelog", default="", help="what changed, recorded in metadata.json")
    train.add_argument("--publish", action="store_true", help="also make the new version live right away")
    train.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> int:
    from services.classifiers import training
    from tiermesh import hotswap, runner
    from tiermesh.registry import Registry

    registry = Registry()
    options: dict[str, Any] = {"changelog": args.changelog}
    if args.seed is not None:
        if args.model == "ner":
            raise SystemExit("tiermesh train ner: --seed does not apply (the NER model has no random part)")
        options["seed"] = args.seed
    version = training.train(args.model, registry, **options)
    print(
        f"{version.name} {version.version} ({version.digest[:19]}): {training.headline(args.model, version)}"
    )
    if args.publish:
        version = registry.set_latest(version.name, version.version)
        hotswap.announce_latest(runner.store_url(), version, print)
    else:
        print(f"not live yet: tiermesh models publish {version.name} {version.version}")
    return 0
