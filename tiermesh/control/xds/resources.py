"""Envoy's configuration split into what Envoy boots with and what the control plane serves.

The mesh's Envoy configuration is rendered once from the templates in envoy/ (`render_envoy`), as
for a static Envoy. Here it is split: the tiers' clusters become CDS resources whose endpoints come
over EDS from the live replicas, the gRPC and REST route tables become RDS resources, and the A/B
weights an RTDS layer. What is left — listeners (pointing at RDS), the admin, metrics and trace
clusters, and the control plane's own cluster — is the bootstrap Envoy starts from. One source of
truth for every retry policy, circuit breaker and health check, whichever way Envoy gets it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from tiermesh.control.envoy_config import render_envoy
from tiermesh.kit.topology import (
    MAX_REPLICAS,
    WEIGHT_SCALE,
    TierSpec,
    arms,
    cluster_name,
    max_concurrency,
    replicas,
    runtime_prefix,
    with_deployments,
)

TYPE_CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
TYPE_ENDPOINTS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
TYPE_ROUTES = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
TYPE_RUNTIME = "type.googleapis.com/envoy.service.runtime.v3.Runtime"
# Envoy asks for these in this order (clusters before their endpoints, routes before runtime).
TYPES = (TYPE_CLUSTER, TYPE_ENDPOINTS, TYPE_ROUTES, TYPE_RUNTIME)

XDS_CLUSTER = "tiermesh_xds"
RUNTIME_LAYER = "tiermesh-weights"
ADS = {"ads": {}, "resource_api_version": "V3"}
# The circuit breaker thresholds of envoy/cluster.yaml.tmpl, all set to one limit.
BREAKER_THRESHOLDS = ("max_connections", "max_pending_requests", "max_requests", "max_retries")

# Live replicas: Envoy cluster name -> (host, port) of each.
Endpoints = Mapping[str, Sequence[tuple[str, int]]]


@dataclass(frozen=True)
class MeshConfig:
    """The rendered configuration of one mesh, split (see the module's docstring)."""

    bootstrap: dict[str, Any]
    clusters: dict[str, dict[str, Any]]
    routes: dict[str, dict[str, Any]]
    weighted_tiers: tuple[TierSpec, ...]

    def bootstrap_naming(self, store_url: str) -> dict[str, Any]:
        """The bootstrap, its node metadata naming the store the weights live in (where `tiermesh
        traffic` finds it: EnvoyAdmin.weights_store)."""
        bootstrap = copy.deepcopy(self.bootstrap)
        if store_url:
            bootstrap["node"]["metadata"] = {"tiermesh_store": store_url}
        return bootstrap

    def resources(
        self, endpoints: Endpoints, weights: Mapping[str, int], breakers: Mapping[str, int] | None = None
    ) -> dict[str, dict[str, dict]]:
        """Every resource by type URL and name, as dicts in Envoy's JSON form; `breakers` are
        runtime keys overriding circuit breaker thresholds (`breaker_limits`)."""
        layer = runtime_layer(self.weighted_tiers, weights)
        layer["layer"].update(breakers or {})
        return {
            TYPE_CLUSTER: self.clusters,
            TYPE_ENDPOINTS: {name: load_assignment(name, endpoints.get(name, ())) for name in self.clusters},
            TYPE_ROUTES: self.routes,
            TYPE_RUNTIME: {RUNTIME_LAYER: layer},
        }


def mesh_config(
    settings: Mapping[str, str], tiers: tuple[TierSpec, ...], xds_address: tuple[str, int]
) -> MeshConfig:
    """Render the mesh's Envoy configuration and split it for a control plane at `xds_address`."""
    static = yaml.safe_load(render_envoy(settings, tiers))
    names = served_clusters(settings, tiers)
    resources = static["static_resources"]
    clusters = {c["name"]: eds_cluster(c) for c in resources["clusters"] if c["name"] in names}
    resources["clusters"] = [c for c in resources["clusters"] if c["name"] not in names]
    resources["clusters"].append(xds_cluster(*xds_address))
    routes = {}
    for listener in resources["listeners"]:
        manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
        table = manager.get("route_config", {})
        if any(_routes_to(table, name) for name in names):
            routes[table["name"]] = manager.pop("route_config")
            manager["rds"] = {"route_config_name": table["name"], "config_source": ADS}
    static["dynamic_resources"] = {
        "ads_config": {
            "api_type": "GRPC",
            "transport_api_version": "V3",
            "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}],
            "set_node_on_first_message_only": True,
        },
        "cds_config": ADS,
    }
    static["node"] = {"id": settings.get("ENVOY_NODE_ID", "tiermesh-envoy"), "cluster": "tiermesh"}
    static["layered_runtime"] = {"layers": runtime_layers()}
    weighted = tuple(t for t in tiers if len(arms(settings, t)) > 1)
    return MeshConfig(static, clusters, routes, weighted)


def breaker_limits(
    settings: Mapping[str, str], tiers: tuple[TierSpec, ...], endpoints: Endpoints
) -> dict[str, int]:
    """Runtime overrides of each served cluster's circuit breakers: the calls its replicas running
    now take at once (none running: the configured count). Over RTDS, a new replica count changes
    no cluster, so Envoy re-creates and re-warms none."""
    limits = {}
    for tier in tiers:
        for arm in arms(settings, tier):
            cluster = cluster_name(tier, arm)
            running = len(endpoints.get(cluster, ())) or replicas(settings, tier, arm)
            limit = max_concurrency(settings, tier, arm) * min(running, MAX_REPLICAS)
            for name in (cluster, f"{cluster}_rest") if tier.rest else (cluster,):
                for threshold in BREAKER_THRESHOLDS:
                    limits[f"circuit_breakers.{name}.default.{threshold}"] = limit
    return limits


class LiveConfig:
    """The mesh's configuration as its live state shapes it: rendered again only when a treatment
    is deployed or removed; replica counts size the circuit breakers through the runtime."""

    def __init__(
        self, settings: Mapping[str, str], tiers: tuple[TierSpec, ...], xds_address: tuple[str, int]
    ) -> None:
        self.settings, self.tiers, self.xds_address = dict(settings), tiers, xds_address
        self._rendered: tuple[dict[str, str], MeshConfig] | None = None

    def resources(
        self, endpoints: Endpoints, weights: Mapping[str, int], deployments: Mapping[str, str]
    ) -> dict[str, dict[str, dict]]:
        live = with_deployments(self.settings, deployments)  # treatments deployed or removed live
        if self._rendered is None or self._rendered[0] != live:
            self._rendered = (live, mesh_config(live, self.tiers, self.xds_address))
        breakers = breaker_limits(live, self.tiers, endpoints)
        return self._rendered[1].resources(endpoints, weights, breakers)


def served_clusters(settings: Mapping[str, str], tiers: tuple[TierSpec, ...]) -> set[str]:
    """The clusters whose endpoints are replicas: one per tier and arm (and its REST twin)."""
    names = set()
    for tier in tiers:
        for arm in arms(settings, tier):
            names.add(cluster_name(tier, arm))
            if tier.rest:
                names.add(cluster_name(tier, arm) + "_rest")
    return names


def _routes_to(table: Mapping[str, Any], cluster: str) -> bool:
    return f"'{cluster}'" in repr(table)


def eds_cluster(cluster: Mapping[str, Any]) -> dict[str, Any]:
    """A static cluster turned into one whose endpoints come over EDS (everything else kept)."""
    served = copy.deepcopy(dict(cluster))
    served.pop("load_assignment", None)
    served.pop("dns_lookup_family", None)
    served["type"] = "EDS"
    served["eds_cluster_config"] = {"eds_config": ADS}
    return served


def load_assignment(cluster: str, endpoints: Sequence[tuple[str, int]]) -> dict[str, Any]:
    lb_endpoints = [
        {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
        for host, port in sorted(endpoints)
    ]
    return {"cluster_name": cluster, "endpoints": [{"lb_endpoints": lb_endpoints}] if lb_endpoints else []}


def runtime_layer(weighted_tiers: Sequence[TierSpec], weights: Mapping[str, int]) -> dict[str, Any]:
    """The RTDS layer: each weighted tier's control and treatment weights (treatment 0 unless set),
    under the keys its weighted route reads (`<runtime prefix>.<cluster>`)."""
    layer: dict[str, int] = {}
    for tier in weighted_tiers:
        treatment = min(max(int(weights.get(tier.name, 0)), 0), WEIGHT_SCALE)
        prefix = runtime_prefix(tier.name)
        for suffix in ("", "_rest") if tier.rest else ("",):  # the REST route moves with the gRPC one
            layer[f"{prefix}.{cluster_name(tier, 'control')}{suffix}"] = WEIGHT_SCALE - treatment
            layer[f"{prefix}.{cluster_name(tier, 'treatment')}{suffix}"] = treatment
    return {"name": RUNTIME_LAYER, "layer": layer}


def runtime_layers() -> list[dict[str, Any]]:
    """Static defaults, the weights from the control plane, then the admin's (an operator's
    override through /runtime_modify still wins, as before)."""
    return [
        {"name": "static", "static_layer": {}},
        {"name": "weights", "rtds_layer": {"name": RUNTIME_LAYER, "rtds_config": ADS}},
        {"name": "admin", "admin_layer": {}},
    ]


def xds_cluster(host: str, port: int) -> dict[str, Any]:
    """The control plane, over HTTP/2; Envoy keeps its last configuration while it is away."""
    return {
        "name": XDS_CLUSTER,
        "type": "STRICT_DNS",
        "dns_lookup_family": "V4_ONLY",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": XDS_CLUSTER,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
                    ]
                }
            ],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
    }
