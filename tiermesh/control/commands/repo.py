"""`tiermesh protos|envoy|docs`: files generated from the repository's sources of truth.

The stubs come from `protos/`, Envoy's configuration from `envoy/*.tmpl` and the mesh's topology,
the configuration page from the settings' own declarations. Each has a check that fails when the
committed file is stale.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_commands(sub: Any) -> None:
    """Register `protos`, `envoy` and `docs` on the root parser's subparsers."""
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

    docs = sub.add_parser("docs", help="documentation generated from the code")
    docs_sub = docs.add_subparsers(dest="docs_command", required=True, metavar="ACTION")
    config = docs_sub.add_parser(
        "config", help="write docs/configuration.md from every tier's settings and the ports file"
    )
    config.add_argument("--check", action="store_true", help="exit 1 when the committed page is stale")
    docs.set_defaults(run=cmd_docs)


def cmd_protos(args: argparse.Namespace) -> int:
    from tiermesh.kit import contract

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
    from tiermesh.control.envoy_config import render_envoy
    from tiermesh.kit.topology import read_settings

    config = render_envoy(read_settings())
    if args.output:
        Path(args.output).write_text(config)
    else:
        print(config)
    return 0


def cmd_docs(args: argparse.Namespace) -> int:
    from tiermesh.control.docs import CONFIGURATION_PAGE, render_configuration

    page = render_configuration()
    if args.check:
        current = CONFIGURATION_PAGE.read_text() if CONFIGURATION_PAGE.is_file() else ""
        if current != page:
            print(f"{CONFIGURATION_PAGE} is stale (run: tiermesh docs config)")
            return 1
        print(f"{CONFIGURATION_PAGE} is up to date")
        return 0
    CONFIGURATION_PAGE.write_text(page)
    print(CONFIGURATION_PAGE)
    return 0
