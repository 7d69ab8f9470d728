"""The mesh's xDS control plane: serves Envoy its clusters, endpoints, routes and A/B weights.

    python -m tiermesh.control.xds --port 18000 --store redis://...
    python -m tiermesh.control.xds --bootstrap envoy.yaml ...   # write Envoy's bootstrap and exit

Endpoints are the replicas registered in the store while SERVING (`--source registry`: each keeps
a key alive, `tiermesh.kit.membership`, from whatever host it runs on), or, in Kubernetes
(`--source kubernetes`), the ready endpoints of the tiers' EndpointSlices in this pod's namespace
(deploy/k8s/); Envoy health-checks them either way. From the store come the A/B weights
(`tiermesh:weights`: tier -> treatment weight in hundredths of a percent) and the treatments
deployed on the running mesh (`tiermesh:deployments`: tier -> its `<TIER>_TREATMENT` value, ""
once removed), which add or drop a tier's treatment cluster and weighted routes. All are re-read
every `--interval` seconds and pushed when they change; each arm's circuit breakers follow its
live replica count. A store outage keeps the last weights and deployments. If this process dies,
Envoy keeps its last configuration; restarted, it serves the same resources again (they are
derived, not remembered).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import yaml
from grpc_health.v1 import health, health_pb2_grpc

from tiermesh.control.xds import protos
from tiermesh.control.xds.resources import LiveConfig, mesh_config
from tiermesh.control.xds.server import AggregatedDiscovery, Snapshots
from tiermesh.control.xds.sources import (
    EndpointSource,
    KubernetesEndpoints,
    LiveState,
    RegistryEndpoints,
    StoreState,
)
from tiermesh.kit.logs import configure
from tiermesh.kit.topology import TIERS, TopologyError, only, read_settings

logger = logging.getLogger("tiermesh.control.xds")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tiermesh.control.xds",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to serve ADS on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=18000, help="ADS port (default 18000)")
    parser.add_argument(
        "--address",
        default="",
        help="the name or address Envoy reaches this control plane at, for --bootstrap (default: --host)",
    )
    parser.add_argument(
        "--tiers", default=",".join(t.name for t in TIERS), help="the tiers the mesh runs (default: all)"
    )
    parser.add_argument(
        "--source",
        choices=("registry", "kubernetes"),
        default="registry",
        help="where the replicas are listed: the store's registry (default) or EndpointSlices",
    )
    parser.add_argument("--store", default="", help="redis:// URL of the store holding the weights")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between re-reads (default 0.2)")
    parser.add_argument("--status", type=Path, help="write what Envoy accepted and refused here (JSON)")
    parser.add_argument("--bootstrap", type=Path, help="write Envoy's bootstrap (YAML) here and exit")
    return parser.parse_args(argv)


async def refresh(
    live: LiveConfig,
    snapshots: Snapshots,
    endpoints: EndpointSource,
    store: StoreState | None,
    state: LiveState,
) -> LiveState:
    """Read the replicas, weights and deployments once and push what changed; returns the state read."""
    if store is not None:
        state = await store.read(state)
    changed = snapshots.update(live.resources(await endpoints.read(), state.weights, state.deployments))
    if changed:
        logger.info("xds: new %s", ", ".join(t.rsplit(".", 1)[-1] for t in changed))
    return state


async def follow(
    live: LiveConfig,
    snapshots: Snapshots,
    endpoints: EndpointSource,
    store: StoreState | None,
    state: LiveState,
    args: argparse.Namespace,
) -> None:
    """Refresh every `--interval` seconds and keep the status file current."""
    while True:
        await asyncio.sleep(args.interval)
        try:
            state = await refresh(live, snapshots, endpoints, store, state)
            if args.status:
                write_status(args.status, snapshots)
        except Exception as error:  # Envoy keeps the last good snapshot; keep following
            logger.error(
                "xds: could not build a new snapshot (%r); serving the last one", error, exc_info=error
            )


def write_status(path: Path, snapshots: Snapshots) -> None:
    status = {
        "pid": os.getpid(),
        "at": time.time(),
        "versions": {t.rsplit(".", 1)[-1]: s.version for t, s in snapshots.types.items()},
        "acked": [
            {"node": n, "type": t.rsplit(".", 1)[-1], "version": v} for (n, t), v in snapshots.acks.items()
        ],
        "rejected": [vars(r) for r in snapshots.rejections],
    }
    scratch = path.with_suffix(".tmp")
    scratch.write_text(json.dumps(status))
    scratch.replace(path)


async def serve(args: argparse.Namespace, live: LiveConfig, endpoints: EndpointSource) -> None:
    snapshots = Snapshots()
    store = StoreState(args.store) if args.store else None
    # the first snapshot is built before the port opens
    state = await refresh(live, snapshots, endpoints, store, LiveState())
    server = grpc.aio.server()
    AggregatedDiscovery(snapshots).register(server)
    # SERVING (the empty service) from the start: there is a snapshot to serve
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    server.add_insecure_port(f"{args.host}:{args.port}")
    await server.start()
    logger.info("xds: serving ADS on %s:%d", args.host, args.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    following = asyncio.create_task(follow(live, snapshots, endpoints, store, state, args))
    await stop.wait()
    following.cancel()
    await server.stop(grace=1.0)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure("xds")
    try:
        tiers = only(*args.tiers.split(","))
        settings = read_settings()
        config = mesh_config(settings, tiers, (args.address or args.host, args.port))
    except TopologyError as error:
        logger.error("xds: %s", error)
        return 2
    if args.bootstrap:
        args.bootstrap.write_text(yaml.safe_dump(config.bootstrap_naming(args.store), sort_keys=False))
        return 0
    try:
        protos.load()
    except protos.ProtosMissing as error:
        logger.error("xds: %s", error)
        return 2
    if args.source == "registry":
        if not args.store:
            logger.error("xds: --source registry needs --store (the store replicas register in)")
            return 2
        endpoints: EndpointSource = RegistryEndpoints(args.store)
    else:
        try:
            endpoints = KubernetesEndpoints.in_cluster()
        except (KeyError, OSError) as error:
            logger.error("xds: --source kubernetes needs to run in a pod (missing %s)", error)
            return 2
    asyncio.run(serve(args, LiveConfig(settings, tiers, (args.host, args.port)), endpoints))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
