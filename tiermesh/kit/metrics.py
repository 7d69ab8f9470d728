"""Prometheus metrics shared by every tier: RPC counts, latency and errors by status code.

Metric names are part of the operator contract (dashboards and alerts use them):
  tiermesh_rpc_requests_total{tier,arm,method,code,model_version}
  tiermesh_rpc_latency_seconds{tier,arm,method,model_version}     (histogram)
  tiermesh_rpc_in_flight{tier,method}
  tiermesh_rpc_refused_total{tier,method}                      (over MAX_CONCURRENT_RPCS)
  tiermesh_model_info{tier,name,version,digest}                (always 1)
  tiermesh_model_swaps_total{tier,name,outcome}                 (hot swaps: success / failed)
  tiermesh_model_swap_seconds{tier,name}                        (load + check of a new version)
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

# `arm` is the A/B deployment the process belongs to (TIERMESH_ARM); Prometheus also labels every
# series of a target with its tier and arm (observability/prometheus.yml).
RPC_REQUESTS = Counter(
    "tiermesh_rpc_requests",
    "RPCs handled, by final status code",
    ["tier", "arm", "method", "code", "model_version"],
)
RPC_LATENCY = Histogram(
    "tiermesh_rpc_latency_seconds",
    "Server-side RPC latency",
    ["tier", "arm", "method", "model_version"],
    buckets=LATENCY_BUCKETS,
)
RPC_IN_FLIGHT = Gauge("tiermesh_rpc_in_flight", "RPCs being handled now", ["tier", "method"])
RPC_REFUSED = Counter(
    "tiermesh_rpc_refused",
    "RPCs refused with RESOURCE_EXHAUSTED: the tier was at its limit",
    ["tier", "method"],
)
MODEL_INFO = Gauge(
    "tiermesh_model_info", "The model version a tier serves", ["tier", "name", "version", "digest"]
)

SWAPS = Counter("tiermesh_model_swaps", "Hot swaps to a new version, by outcome", ["tier", "name", "outcome"])
SWAP_SECONDS = Histogram(
    "tiermesh_model_swap_seconds",
    "Time to load and check a new version before swapping it in",
    ["tier", "name"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)


_arm = "control"


def set_arm(arm: str) -> None:
    """The A/B arm this process serves, for the `arm` label (set once at start-up)."""
    global _arm
    _arm = arm


def arm() -> str:
    return _arm


def serve_metrics(host: str, port: int) -> tuple[WSGIServer, threading.Thread]:
    """Start the /metrics HTTP endpoint in a daemon thread; port 0 picks a free port."""
    return start_http_server(port, addr=host)


def set_model_info(tier: str, name: str, version: str, digest: str) -> None:
    """Record the version of `name` a tier serves, forgetting the one it served before (hot swaps)."""
    samples = next(iter(MODEL_INFO.collect())).samples
    for labels in [s.labels for s in samples if s.labels["tier"] == tier and s.labels["name"] == name]:
        MODEL_INFO.remove(labels["tier"], labels["name"], labels["version"], labels["digest"])
    MODEL_INFO.labels(tier, name, version, digest).set(1)
