"""Is it up? One probe per kind of component the control plane runs, each answering in a word.

gRPC tiers and the trace sink speak the standard health protocol; Envoy answers `/ready` on its
admin; the store answers PING. A probe never raises: a component that does not answer is DOWN
(or the gRPC status it failed with), so callers can poll it in a loop.
"""

from __future__ import annotations

import urllib.error
import urllib.request

from tiermesh.kit.topology import TIER_HEADER


def grpc_health(address: str, service: str = "", *, tier: str | None = None, timeout: float = 1.0) -> str:
    """The health status name of `service` at `address` (SERVING, NOT_SERVING, UNAVAILABLE, ...).
    `tier` names the cluster a call through Envoy means (the `x-tiermesh-tier` header)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    metadata = [(TIER_HEADER, tier)] if tier else None
    with grpc.insecure_channel(address) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout, metadata=metadata
            )
        except grpc.RpcError as error:
            return error.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def envoy_ready(admin: str) -> str:
    """Envoy's /ready answer (LIVE once its listeners are up), or DOWN."""
    try:
        with urllib.request.urlopen(f"http://{admin}/ready", timeout=1) as response:
            return response.read().decode().strip()
    except OSError:
        return "DOWN"


def http_status(url: str) -> int:
    """The HTTP status of a GET of `url`, or 0 when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


def store_ping(url: str) -> str:
    """SERVING when the Redis-compatible store at `url` answers PING, else DOWN."""
    import redis

    try:
        return "SERVING" if redis.Redis.from_url(url, socket_timeout=1).ping() else "DOWN"
    except (redis.RedisError, OSError):
        return "DOWN"


def envoy_host_health(admin: str, cluster: str, address: str) -> str:
    """How Envoy sees one host of a cluster: `healthy`, its failure flags (e.g.
    `/failed_active_hc`), or DOWN when Envoy does not answer or has no such host."""
    try:
        with urllib.request.urlopen(f"http://{admin}/clusters", timeout=1) as response:
            lines = response.read().decode().splitlines()
    except OSError:
        return "DOWN"
    wanted = f"{cluster}::{address}::health_flags::"
    return next((line.removeprefix(wanted) for line in lines if line.startswith(wanted)), "DOWN")


def envoy_clusters(admin: str) -> set[str] | None:
    """The names of the clusters Envoy has now, or None when it does not answer."""
    try:
        with urllib.request.urlopen(f"http://{admin}/clusters", timeout=1) as response:
            lines = response.read().decode().splitlines()
    except OSError:
        return None
    return {line.split("::", 1)[0] for line in lines if "::" in line}
