"""`tiermesh deploy <tier> --treatment KEY=VALUE ...`: start a treatment deployment on a running
mesh, and `tiermesh deploy <tier> --remove` to stop it, without a restart.

The deployment is recorded in the store (`tiermesh:deployments`, tier -> its `<TIER>_TREATMENT`
value), where the xDS control plane reads it: the tier gets a treatment cluster and its routes
become a weighted split, the treatment at weight 0 until `tiermesh traffic` (an experiment, a
rollout) gives it calls. Then the treatment's replicas start with the overrides, and the command
returns once they are SERVING and in Envoy's pool. `--remove` refuses while the treatment still has
weight; otherwise the tier's routes go back to its control alone and the treatment's replicas drain
and stop. `tiermesh up` on the same mesh restarts a deployed treatment that died; a new mesh starts
from the settings alone.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence
from typing import Any

import redis

from tiermesh.control.probes import envoy_clusters
from tiermesh.control.runner import Mesh, RunnerError, wait_until
from tiermesh.control.scale import add_replica, remove_replica, require_xds, running_replicas
from tiermesh.kit.topology import (
    DEPLOYMENTS_KEY,
    MAX_REPLICAS,
    WEIGHTS_KEY,
    TierSpec,
    TopologyError,
    cluster_name,
    treatment_overrides,
)


def deploy(
    mesh: Mesh,
    tier: TierSpec,
    overrides: Sequence[str],
    *,
    replicas: int = 1,
    progress: Callable[[str], None] = print,
) -> list[str]:
    """Start `tier`'s treatment (KEY=VALUE `overrides`; none: an A/A test); returns its replicas."""
    state = _running(mesh, tier, "deploying a treatment on")
    if running_replicas(state, tier, "treatment"):
        raise RunnerError(
            f"{tier.name} already has a treatment deployment (tiermesh deploy {tier.name} --remove stops it)"
        )
    if not 1 <= replicas <= MAX_REPLICAS:
        raise RunnerError(f"{tier.name}: a replica count must be from 1 to {MAX_REPLICAS}, got {replicas}")
    value = shlex.join(overrides) or "same"
    try:
        treatment_overrides({f"{tier.prefix}TREATMENT": value}, tier)
    except TopologyError as error:
        raise RunnerError(f"--treatment: {error}") from None
    _store(state, lambda client: client.hset(DEPLOYMENTS_KEY, tier.name, value))
    mesh.settings[f"{tier.prefix}TREATMENT"] = value
    progress(f"{tier.name} treatment: {value if overrides else 'the control settings (an A/A test)'}")
    return [add_replica(mesh, tier, "treatment", index, state, progress) for index in range(replicas)]


def remove(mesh: Mesh, tier: TierSpec, *, progress: Callable[[str], None] = print) -> list[str]:
    """Stop `tier`'s treatment once it has no weight: its routes first, then its replicas."""
    state = _running(mesh, tier, "removing a treatment from")
    indices = running_replicas(state, tier, "treatment")
    if not indices:
        raise RunnerError(f"{tier.name} has no treatment deployment to remove")
    weight = _store(state, lambda client: client.hget(WEIGHTS_KEY, tier.name))
    if int(weight or 0):
        raise RunnerError(
            f"{tier.name}'s treatment still takes {int(weight) / 100:g}% of the calls: move them back "
            f"first (tiermesh traffic set {tier.name} treatment=0), then remove it"
        )
    _store(state, lambda client: client.hset(DEPLOYMENTS_KEY, tier.name, ""))
    mesh.settings.pop(f"{tier.prefix}TREATMENT", None)
    _await_cluster_gone(state, tier)
    progress(f"{tier.name} treatment: out of Envoy's routes")
    return [
        remove_replica(mesh, tier, "treatment", i, state, progress) for i in sorted(indices, reverse=True)
    ]


def _running(mesh: Mesh, tier: TierSpec, what: str) -> dict[str, Any]:
    state = mesh.state()
    require_xds(state, what)
    if not running_replicas(state, tier):
        raise RunnerError(f"{tier.name} is not running in this mesh (tiermesh status)")
    return state


def _store(state: dict[str, Any], command: Callable[[redis.Redis], Any]) -> Any:
    url = state["store"]["url"]
    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2, decode_responses=True)
    try:
        return command(client)
    except (redis.RedisError, OSError) as error:
        raise RunnerError(f"store at {url}: {error}") from None
    finally:
        client.close()


def _await_cluster_gone(state: dict[str, Any], tier: TierSpec) -> None:
    """Wait until the control plane has taken the treatment out of Envoy (its cluster gone, its
    weight 0 meanwhile: no call is sent there) before its replicas stop."""
    admin, cluster = state["envoy"]["admin"], cluster_name(tier, "treatment")
    wait_until(
        lambda: cluster not in (envoy_clusters(admin) or {cluster}),
        timeout=30,
        what=f"{cluster} leaving Envoy",
        alive=lambda: True,
    )
