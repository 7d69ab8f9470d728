"""`tiermesh restart <tier>`: a rolling restart, one replica at a time, without failing a call.

Each replica is sent SIGTERM (it drains: NOT_SERVING while it still serves, until Envoy has taken
it out of the pool, then finishes its in-flight calls), its supervisor starts it again, and the
next replica is only touched once this one is SERVING and Envoy routes to it again. A deployment
of one replica cannot restart without a gap: calls fail while its only process starts (Envoy's
panic mode keeps sending to it); the command says so before it starts.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

from tiermesh.control.probes import envoy_host_health, grpc_health
from tiermesh.control.runner import Mesh, RunnerError, supervisor_status, wait_until
from tiermesh.kit.topology import TierSpec, cluster_name


def rolling_restart(mesh: Mesh, tier: TierSpec, *, progress: Callable[[str], None] = print) -> list[str]:
    """Restart every replica of `tier` (both arms), one by one; returns their names."""
    state = mesh.state()
    names = [name for name, component in state.items() if component.get("tier") == tier.name]
    if not names:
        raise RunnerError(f"{tier.name} is not running in this mesh (tiermesh status)")
    for arm in {state[name]["arm"] for name in names}:
        if sum(state[name]["arm"] == arm for name in names) == 1:
            progress(
                f"warning: {tier.name} {arm} has one replica: its calls fail while it restarts "
                f"(run it with {tier.prefix}REPLICAS=2 or more for a restart without errors)"
            )
    for name in names:
        started = time.monotonic()
        _restart_one(mesh, tier, name, state)
        progress(f"{name}: restarted and back in Envoy's pool in {time.monotonic() - started:.1f}s")
    return names


def _restart_one(mesh: Mesh, tier: TierSpec, name: str, state: dict[str, Any]) -> None:
    component = state[name]
    old = supervisor_status(component).get("pid")
    if not old or not mesh.alive(component):
        raise RunnerError(f"{name} is not running (tiermesh status; tiermesh up starts it again)")
    os.kill(old, signal.SIGTERM)
    watch = mesh.watch(state, name)

    def replaced_and_serving() -> bool:
        pid = supervisor_status(component).get("pid")
        return bool(pid) and pid != old and grpc_health(component["grpc"], tier.service) == "SERVING"

    wait_until(replaced_and_serving, timeout=tier.load_timeout_s + 120, what=name, **watch)
    admin, cluster = state["envoy"]["admin"], cluster_name(tier, component["arm"])
    wait_until(
        lambda: envoy_host_health(admin, cluster, component["grpc"]) == "healthy",
        timeout=30,
        what=f"{name} in Envoy's pool",
        **watch,
    )
