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

    classify = sub.add_parser(
        "classify", help="the intent and the financial entities of a text, through Envoy"
    )
    classify.add_argument("text")
    classify.add_argument("--target", help="Envoy's gRPC address (default: the running mesh's)")
    classify.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    classify.set_defaults(run=run_classify)


def run_train(args: argparse.Namespace) -> int:
    from services.classifiers import training
    from tiermesh.kit import hotswap
    from tiermesh.kit.registry import Registry

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
        hotswap.announce_latest(args.mesh.store(), version, print)
    else:
        print(f"not live yet: tiermesh models publish {version.name} {version.version}")
    return 0


def run_classify(args: argparse.Namespace) -> int:
    import sys

    import grpc

    from tiermesh.classifiers.v1 import classifiers_pb2 as pb
    from tiermesh.classifiers.v1 import classifiers_pb2_grpc

    target = args.target or args.mesh.envoy()
    with grpc.insecure_channel(target) as channel:
        stub = classifiers_pb2_grpc.ClassifiersServiceStub(channel)
        try:
            found = stub.ClassifyIntent(pb.ClassifyIntentRequest(text=args.text), timeout=args.timeout)
            entities = stub.ExtractEntities(pb.ExtractEntitiesRequest(text=args.text), timeout=args.timeout)
        except grpc.RpcError as error:
            print(f"{error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    intent = found.intent
    note = f" (below the {intent.threshold:.2f} threshold)" if intent.low_confidence else ""
    print(f"intent {intent.label} {intent.probability:.2f}{note}  [{found.model.name} {found.model.version}]")
    print("  top 3: " + ", ".join(f"{c.label} {c.probability:.2f}" for c in intent.candidates))
    print(f"entities  [{entities.model.name} {entities.model.version}]")
    for entity in entities.entities:
        money = f" = {entity.money.amount:g} {entity.money.currency_code}" if entity.HasField("money") else ""
        label = pb.EntityLabel.Name(entity.label).removeprefix("ENTITY_LABEL_")
        print(f"  {label:<9} {entity.text!r}{money}")
    if not entities.entities:
        print("  none found")
    return 0
