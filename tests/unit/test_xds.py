"""The control plane's resources and its ADS bookkeeping (versions, nonces, ACK/NACK), without Envoy
(tests/integration/test_xds.py drives a real one)."""

import importlib

import pytest
from google.rpc import status_pb2

from tiermesh.control.xds import protos
from tiermesh.control.xds.resources import (
    RUNTIME_LAYER,
    TYPE_CLUSTER,
    TYPE_ENDPOINTS,
    TYPE_ROUTES,
    TYPE_RUNTIME,
    LiveConfig,
    mesh_config,
)
from tiermesh.control.xds.server import AggregatedDiscovery, Snapshots, _Stream, pack
from tiermesh.kit.topology import only, read_settings

discovery_pb2, _ = protos.discovery()
base_pb2 = importlib.import_module("envoy.config.core.v3.base_pb2")
SETTINGS = read_settings({"RETRIEVER_REPLICAS": "2", "RETRIEVER_TREATMENT": "same"})
CONFIG = mesh_config(SETTINGS, only("retriever", "gateway"), ("127.0.0.1", 18000))


def resources(endpoints=None, weights=None):
    return CONFIG.resources(endpoints or {"retriever": [("127.0.0.1", 7001)]}, weights or {})


def request(type_url, *, names=(), nonce="", version="", error=""):
    message = discovery_pb2.DiscoveryRequest(
        type_url=type_url, resource_names=list(names), response_nonce=nonce, version_info=version,
        node=base_pb2.Node(id="envoy-1"),
    )  # fmt: skip
    if error:
        message.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return message


def stream(snapshots):
    return _Stream(AggregatedDiscovery(snapshots))


def test_tier_clusters_come_over_eds_and_keep_their_limits_and_health_checks():
    cluster = CONFIG.clusters["retriever"]
    assert cluster["type"] == "EDS" and "load_assignment" not in cluster
    assert (
        cluster["health_checks"][0]["grpc_health_check"]["service_name"]
        == "tiermesh.retriever.v1.RetrieverService"
    )
    assert cluster["circuit_breakers"]["thresholds"][0]["max_requests"] == 2 * 256
    assert set(CONFIG.clusters) == {"retriever", "retriever_treatment", "gateway", "gateway_rest"}
    assert set(CONFIG.routes) == {"tiers", "rest"}


def test_weights_are_a_runtime_layer_that_always_sums_to_the_scale():
    layer = resources(weights={"retriever": 2500})[TYPE_RUNTIME][RUNTIME_LAYER]["layer"]
    assert layer == {
        "tiermesh.weights.retriever.retriever": 7500,
        "tiermesh.weights.retriever.retriever_treatment": 2500,
    }
    clamped = resources(weights={"retriever": 99_999})[TYPE_RUNTIME][RUNTIME_LAYER]["layer"]
    assert clamped["tiermesh.weights.retriever.retriever_treatment"] == 10_000


def test_a_cluster_without_replicas_has_no_endpoints_and_a_bad_resource_is_named():
    assert resources(endpoints={"x": []})[TYPE_ENDPOINTS]["retriever_treatment"]["endpoints"] == []
    with pytest.raises(ValueError, match="ClusterLoadAssignment retriever: "):
        pack(TYPE_ENDPOINTS, {"retriever": {"cluster_name": "retriever", "endpoints": "many"}})


def breakers(resources, cluster):
    layer = resources[TYPE_RUNTIME][RUNTIME_LAYER]["layer"]
    return {
        k.rsplit(".", 1)[1]: v
        for k, v in layer.items()
        if k.startswith(f"circuit_breakers.{cluster}.default.")
    }


def test_circuit_breakers_follow_the_live_replica_count_through_the_runtime():
    live = LiveConfig(SETTINGS, only("retriever", "gateway"), ("127.0.0.1", 18000))
    three = {"retriever": [("127.0.0.1", 7001), ("127.0.0.1", 7002), ("127.0.0.1", 7003)]}
    scaled = live.resources(three, {}, {})
    assert breakers(scaled, "retriever") == dict.fromkeys(
        ("max_connections", "max_pending_requests", "max_requests", "max_retries"), 3 * 256
    )
    # none running (all restarting): the configured count, never a breaker of 0
    assert breakers(live.resources({}, {}, {}), "retriever")["max_requests"] == 2 * 256
    assert breakers(scaled, "gateway_rest")["max_requests"] == breakers(scaled, "gateway")["max_requests"]
    # the clusters themselves do not change: Envoy re-creates none of them
    assert scaled[TYPE_CLUSTER] == live.resources({}, {}, {})[TYPE_CLUSTER]


def test_a_treatment_deployed_live_adds_its_cluster_and_weighted_route_and_removal_drops_them():
    plain = read_settings({})
    live = LiveConfig(plain, only("embedder"), ("127.0.0.1", 18000))
    before = live.resources({}, {}, {})
    assert set(before[TYPE_CLUSTER]) == {"embedder"}
    deployed = live.resources({}, {"embedder": 1000}, {"embedder": "EMBEDDER_MAX_BATCH=8"})
    assert set(deployed[TYPE_CLUSTER]) == {"embedder", "embedder_treatment"}
    assert "embedder_treatment" in repr(deployed[TYPE_ROUTES])
    assert (
        deployed[TYPE_RUNTIME][RUNTIME_LAYER]["layer"]["tiermesh.weights.embedder.embedder_treatment"] == 1000
    )
    # removed ("") also hides a treatment the settings configured
    removed = LiveConfig(SETTINGS, only("retriever"), ("127.0.0.1", 18000)).resources(
        {}, {}, {"retriever": ""}
    )
    assert set(removed[TYPE_CLUSTER]) == {"retriever"} and "retriever_treatment" not in repr(removed)


def test_versions_change_only_with_content():
    snapshots = Snapshots()
    assert snapshots.update(resources()) == [TYPE_CLUSTER, TYPE_ENDPOINTS, TYPE_ROUTES, TYPE_RUNTIME]
    assert snapshots.update(resources()) == []
    assert snapshots.update(resources(endpoints={"retriever": [("127.0.0.1", 7002)]})) == [TYPE_ENDPOINTS]
    assert snapshots.generation == 2


def test_first_request_is_answered_an_ack_is_not_and_a_stale_nonce_is_ignored():
    snapshots = Snapshots()
    snapshots.update(resources())
    envoy = stream(snapshots)
    (first,) = envoy.on_request(request(TYPE_CLUSTER))
    assert len(first.resources) == 4 and first.version_info == snapshots.types[TYPE_CLUSTER].version
    assert envoy.on_request(request(TYPE_CLUSTER, nonce=first.nonce, version=first.version_info)) == []
    assert snapshots.acks[("envoy-1", TYPE_CLUSTER)] == first.version_info
    (eds,) = envoy.on_request(request(TYPE_ENDPOINTS, names=["retriever"]))
    assert [r.type_url for r in eds.resources] == [TYPE_ENDPOINTS] and len(eds.resources) == 1
    assert envoy.on_request(request(TYPE_ENDPOINTS, names=["retriever"], nonce="stale")) == []


def test_a_nack_is_recorded_and_the_same_version_not_resent():
    snapshots = Snapshots()
    snapshots.update(resources())
    envoy = stream(snapshots)
    (sent,) = envoy.on_request(request(TYPE_ENDPOINTS, names=["retriever"]))
    answer = request(TYPE_ENDPOINTS, names=["retriever"], nonce=sent.nonce, version="", error="bad address")
    assert envoy.on_request(answer) == []
    (rejection,) = snapshots.rejections
    assert (rejection.node, rejection.version, rejection.message) == (
        "envoy-1",
        sent.version_info,
        "bad address",
    )


def test_a_change_reaches_subscribed_types_and_changed_clusters_bring_their_endpoints():
    snapshots = Snapshots()
    snapshots.update(resources())
    envoy = stream(snapshots)
    for type_url, names in (
        (TYPE_CLUSTER, ()),
        (TYPE_ENDPOINTS, ["retriever"]),
        (TYPE_RUNTIME, [RUNTIME_LAYER]),
    ):
        (sent,) = envoy.on_request(request(type_url, names=names))
        envoy.on_request(request(type_url, names=names, nonce=sent.nonce, version=sent.version_info))
    snapshots.update(resources(weights={"retriever": 100}))
    assert [r.type_url for r in envoy.on_change()] == [TYPE_RUNTIME]
    more = read_settings({"RETRIEVER_REPLICAS": "3", "RETRIEVER_TREATMENT": "same"})
    bigger = mesh_config(more, only("retriever", "gateway"), ("127.0.0.1", 18000))
    snapshots.update(bigger.resources({"retriever": [("127.0.0.1", 7001)]}, {"retriever": 100}))
    assert [r.type_url for r in envoy.on_change()] == [TYPE_CLUSTER, TYPE_ENDPOINTS]  # re-warm
