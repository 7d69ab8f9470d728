"""The tiers' replicas in Kubernetes, as Envoy's clusters see them: EndpointSlices -> endpoints.

Every tier Service (deploy/k8s/) carries the labels of `labels(tier, arm)` and names its ports
`grpc`, `metrics` and (the gateway's) `http`. Kubernetes copies a Service's labels onto its
EndpointSlices (beside `kubernetes.io/service-name`), so the control plane lists the slices
matching `SELECTOR` in its namespace and turns them into endpoints with `endpoints_from_slices`:
the `grpc` port of a tier's arm feeds the cluster `cluster_name(tier, arm)`, and the `http` port
of a tier with a REST API the REST cluster `<that name>_rest` (as in tiermesh/control/envoy_config.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from tiermesh.kit.topology import ARMS, TierSpec, TopologyError, cluster_name, tier_named

PART_OF_LABEL = "app.kubernetes.io/part-of"
NAME_LABEL = "app.kubernetes.io/name"
TIER_LABEL = "tiermesh.dev/tier"
ARM_LABEL = "tiermesh.dev/arm"
# The label selector of the mesh's objects (its Services, so their EndpointSlices too).
SELECTOR = f"{PART_OF_LABEL}=tiermesh"
# Which Envoy cluster a named Service port feeds: the tier arm's own, or its REST twin.
CLUSTER_SUFFIX = {"grpc": "", "http": "_rest"}


def labels(tier: TierSpec, arm: str = "control") -> dict[str, str]:
    """The labels of a tier arm's Service and pods (and so of the Service's EndpointSlices)."""
    return {
        NAME_LABEL: f"tiermesh-{tier.name}",
        PART_OF_LABEL: "tiermesh",
        TIER_LABEL: tier.name,
        ARM_LABEL: arm,
    }


def endpoints_from_slices(slices: Iterable[Mapping[str, Any]]) -> dict[str, list[tuple[str, int]]]:
    """Envoy cluster name -> sorted (address, port) of the endpoints that may take calls now.

    `slices` are discovery.k8s.io/v1 EndpointSlice objects as the API returns them (JSON decoded;
    the `items` of a list). An endpoint counts when it is ready (a missing `ready` means ready, as
    the API specifies) and not terminating; its first address is used (the API says an
    endpoint's addresses are fungible). Slices of one Service are merged and an endpoint listed
    twice (the controller may briefly do so while it rebalances slices) counts once. A cluster
    with no such endpoint maps to an empty list. Skipped: slices without the tier and arm labels,
    or naming a tier or arm the mesh does not have (so a newer tier cannot stop an older control
    plane), slices of addresses other than IPv4, ports other than `grpc` (and `http` of a tier
    with a REST API) and ports without a number.
    """
    found: dict[str, set[tuple[str, int]]] = {}
    for endpoint_slice in slices:
        owner = _tier_arm(endpoint_slice)
        if owner is None or endpoint_slice.get("addressType") != "IPv4":
            continue
        tier, arm = owner
        cluster = cluster_name(tier, arm)
        kinds = ("grpc", "http") if tier.rest else ("grpc",)
        ports = {
            port["name"]: port["port"]
            for port in endpoint_slice.get("ports") or ()
            if port.get("name") in kinds and isinstance(port.get("port"), int)
        }
        addresses = [
            endpoint["addresses"][0]
            for endpoint in endpoint_slice.get("endpoints") or ()
            if endpoint.get("addresses") and _takes_calls(endpoint.get("conditions") or {})
        ]
        for name, number in ports.items():
            found.setdefault(cluster + CLUSTER_SUFFIX[name], set()).update((a, number) for a in addresses)
    return {name: sorted(endpoints) for name, endpoints in sorted(found.items())}


def _tier_arm(endpoint_slice: Mapping[str, Any]) -> tuple[TierSpec, str] | None:
    """The tier and arm a slice belongs to, or None when it is not a tier's."""
    slice_labels = (endpoint_slice.get("metadata") or {}).get("labels") or {}
    arm = slice_labels.get(ARM_LABEL)
    if arm not in ARMS:
        return None
    try:
        return tier_named(slice_labels.get(TIER_LABEL, "")), arm
    except TopologyError:
        return None


def _takes_calls(conditions: Mapping[str, Any]) -> bool:
    """Ready (unset means ready) and not terminating (unset means not)."""
    return conditions.get("ready") is not False and conditions.get("terminating") is not True
