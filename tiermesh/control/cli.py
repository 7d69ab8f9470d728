"""`tiermesh`: run the local mesh, manage the model registry, steer traffic, regenerate the contract.

The root of the CLI sits above everything: it registers the control plane's commands and every
tier's own (`services/<tier>/cli.py`), and hands each command where the mesh is (`args.mesh`), so
tiers never import the control plane. Command modules keep heavy imports inside their functions,
so `tiermesh --help` and `tiermesh envoy render` need no model stack.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from services.bias import cli as bias_cli
from services.classifiers import cli as classifiers_cli
from services.embedder import cli as embedder_cli
from services.gateway import cli as gateway_cli
from services.gateway import keys_cli
from services.retriever import cli as retriever_cli
from tiermesh.control.commands import mesh, models, repo, traffic
from tiermesh.control.envoy_config import EnvoyConfigError
from tiermesh.control.runner import LocalAddresses, RunnerError
from tiermesh.control.traffic import TrafficError
from tiermesh.kit.commands import MeshAddresses
from tiermesh.kit.registry import RegistryError
from tiermesh.kit.topology import TopologyError

# In the order `tiermesh --help` lists them: the mesh, its users' commands, its operators'.
COMMAND_MODULES = (
    mesh,
    embedder_cli,
    retriever_cli,
    gateway_cli,
    models,
    classifiers_cli,
    bias_cli,
    keys_cli,
    traffic,
    repo,
)
# What a command may fail with that is the user's to fix: one line on stderr, exit status 1.
USER_ERRORS = (RunnerError, TopologyError, EnvoyConfigError, RegistryError, TrafficError)

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tiermesh",
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mesh: MeshAddresses = LocalAddresses()  # what every command finds as args.mesh
    parser.set_defaults(mesh=mesh)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except USER_ERRORS as error:
        print(f"tiermesh {args.command}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
