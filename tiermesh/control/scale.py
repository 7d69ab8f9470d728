"""`tiermesh scale <tier>=<n>`: add or remove replicas of a running mesh without a restart.

Needs the mesh on its xDS control plane (`ENVOY_CONFIG=xds`, the default): a replica registers in
the store once SERVING, and the control plane serves the registered replicas to Envoy over EDS. A
new replica takes calls once Envoy's health check agrees too; a removed one (the highest-numbered
first) drains before it goes: SIGTERM → NOT_SERVING and out of the registry while it still serves,
Envoy takes it out of the pool, in-flight calls finish, then it stops. The control arm is scaled;
replica ports are the arm's base ports + the replica's index, its host the next of
`<TIER>_PLACEMENT` when the tier is spread over several.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from tiermesh.control.probes import envoy_host_health, grpc_health
from tiermesh.control.runner import Mesh, RunnerError, stop_process, wait_until
from tiermesh.kit.topology import MAX_REPLICAS, TierSpec, cluster_name, replica_name


def require_xds(state: dict, what: str) -> None:
    """RunnerError unless the running mesh's Envoy is served by the xDS control plane."""
    if "xds" not in state:
        raise RunnerError(
            f"{what} a running mesh needs Envoy on the xDS control plane: set ENVOY_CONFIG=xds and "
            "start the mesh again"
        )


def scale(mesh: Mesh, tier: TierSpec, count: int, *, progress: Callable[[str], None] = print) -> list[str]:
    """Run `count` replicas of `tier`'s control arm; returns the names started or stopped."""
    state = mesh.state()
    require_xds(state, "scaling")
    if not 1 <= count <= MAX_REPLICAS:
        raise RunnerError(f"{tier.name}: a replica count must be from 1 to {MAX_REPLICAS}, got {count}")
    running = running_replicas(state, tier)
    if not running:
        raise RunnerError(f"{tier.name} is not running in this mesh (tiermesh status)")
    # new replicas take the lowest free indices (a gap left by hand is filled first)
    free = [i for i in range(MAX_REPLICAS) if i not in running][: max(count - len(running), 0)]
    changed = [add_replica(mesh, tier, "control", index, state, progress) for index in free]
    changed += [
        remove_replica(mesh, tier, "control", index, state, progress)
        for index in sorted(running[count:], reverse=True)
    ]
    return changed


def running_replicas(state: dict, tier: TierSpec, arm: str = "control") -> list[int]:
    """The indices of `tier`'s replicas of `arm` the state file lists."""
    return [i for i in range(MAX_REPLICAS) if replica_name(tier, i, arm) in state]


def add_replica(
    mesh: Mesh, tier: TierSpec, arm: str, index: int, state: dict, progress: Callable[[str], None]
) -> str:
    """Start one replica and wait until it is SERVING and healthy in Envoy's pool."""
    started = time.monotonic()
    store_url = state["store"]["url"]
    name = mesh.start_replica(state, tier, arm, index, mesh.tier_environment(), store_url, progress)
    component, watch = state[name], mesh.watch(state, name)
    wait_until(
        lambda: grpc_health(component["grpc"], tier.service) == "SERVING",
        timeout=tier.load_timeout_s + 60,
        what=name,
        **watch,
    )
    admin, cluster = state["envoy"]["admin"], cluster_name(tier, arm)
    wait_until(
        lambda: envoy_host_health(admin, cluster, component["grpc"]) == "healthy",
        timeout=30,
        what=f"{name} in Envoy's pool",
        **watch,
    )
    progress(f"{name}: SERVING and in Envoy's pool {time.monotonic() - started:.1f}s after it started")
    return name


def remove_replica(
    mesh: Mesh, tier: TierSpec, arm: str, index: int, state: dict, progress: Callable[[str], None]
) -> str:
    """Drain and stop one replica, then take it off the list the control plane serves."""
    started = time.monotonic()
    name = replica_name(tier, index, arm)
    grace = float(mesh.settings.get(f"{tier.prefix}SHUTDOWN_GRACE_S", 10)) + 30
    stop_process(state[name], timeout=grace)
    del state[name]
    mesh.save(state)
    progress(f"{name}: drained and stopped in {time.monotonic() - started:.1f}s, removed from Envoy's pool")
    return name
