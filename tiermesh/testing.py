"""Helpers for tests and benchmarks: free ports, a tier in-process on port 0, a whole mesh on
free loopback ports as real processes."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

from tiermesh.registry import models_root
from tiermesh.runner import TIERS, Mesh
from tiermesh.server import ServerConfig, Tier, TierServer


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def mesh_environ(home: Path, **overrides: str) -> dict[str, str]:
    """Environment for a mesh whose every port is free and whose state lives under `home`.

    The model registry stays the developer's (`TIERMESH_MODELS`), so tests need no re-export.
    """
    environ = {
        **os.environ,
        "TIERMESH_HOME": str(home),
        "TIERMESH_MODELS": str(models_root()),
        "ENVOY_GRPC_PORT": str(free_port()),
        "ENVOY_ADMIN_PORT": str(free_port()),
        "STORE_PORT": str(free_port()),
        "HF_HUB_OFFLINE": "1",
    }
    environ.pop("REDIS_URL", None)
    for tier in TIERS:
        environ[f"{tier.prefix}GRPC_PORT"] = str(free_port())
        environ[f"{tier.prefix}METRICS_PORT"] = str(free_port())
    environ.update(overrides)
    return environ


@contextlib.contextmanager
def running_mesh(home: Path, **overrides: str) -> Iterator[tuple[Mesh, dict[str, Any]]]:
    """Start a mesh on free ports; yields it and its status; always stops it."""
    mesh = Mesh(mesh_environ(home, **overrides))
    try:
        yield mesh, mesh.up(progress=lambda _line: None)
    finally:
        mesh.down(progress=lambda _line: None)


@contextlib.asynccontextmanager
async def serving_in_process(tier: Tier, config: ServerConfig) -> AsyncIterator[TierServer]:
    """A tier served in this process (use port 0 in `config`), loaded and SERVING."""
    server = TierServer(tier, config)
    await server.start()
    try:
        await server.load()
        yield server
    finally:
        await server.stop(grace=1.0)


def tier_config(config_class: type, **values: Any) -> Any:
    """A tier config with free-port defaults for tests; keyword arguments override fields."""
    defaults: Mapping[str, Any] = {"grpc_port": 0, "metrics_port": 0}
    return config_class(**{**defaults, **values})
