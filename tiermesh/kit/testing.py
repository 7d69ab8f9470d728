"""Helpers for the tests and benchmarks of any tier: free ports, a tier served in-process on port 0,
a registry of a test's own, and the `tiermesh` command run as a user runs it."""

from __future__ import annotations

import contextlib
import random
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from tiermesh.kit.config import ServerConfig
from tiermesh.kit.registry import ModelVersion, Registry
from tiermesh.kit.server import Tier, TierServer

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


def run_cli(env: Mapping[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """`tiermesh ARGS...` in a subprocess with `env`, as a user runs it (the installed console
    script beside this interpreter); output captured as text, never raises."""
    return subprocess.run(
        [str(Path(sys.executable).parent / "tiermesh"), *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


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


async def health_while(channel: Any, service: str, pending: list[Any]) -> list[int]:
    """`service`'s health on `channel`, checked with a 1 s deadline each time, until every call in
    `pending` is done: a tier busy with a costly call must still answer (DEADLINE_EXCEEDED raises)."""
    import asyncio

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(channel)
    statuses = []
    while True:
        request = health_pb2.HealthCheckRequest(service=service)
        statuses.append((await health.Check(request, timeout=1.0)).status)
        if all(call.done() for call in pending):
            return statuses
        await asyncio.sleep(0.05)
