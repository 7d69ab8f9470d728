"""EndpointSlices -> Envoy endpoints (tiermesh/control/kubernetes.py), on recorded-looking API objects.

tests/unit/data/endpointslices.json is an EndpointSliceList as `GET /apis/discovery.k8s.io/v1/
namespaces/tiermesh/endpointslices` answers it: a Service split over two slices (one endpoint in
both), ready, not-ready, terminating endpoints and one with no `ready` condition, an IPv6 slice,
a treatment, a placeholder slice of a Service without pods, the store's and Envoy's slices, an
unrelated Service and a tier this control plane does not know.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from kubernetes_validate import utils as kubernetes_validate

from tiermesh.control.envoy_config import render_envoy
from tiermesh.control.kubernetes import ARM_LABEL, TIER_LABEL, endpoints_from_slices, labels
from tiermesh.kit.topology import TIERS, read_settings, tier_named

SLICES = json.loads((Path(__file__).parent / "data" / "endpointslices.json").read_text())["items"]


def named(name: str) -> dict:
    [found] = [s for s in SLICES if s["metadata"]["name"] == name]
    return copy.deepcopy(found)


def with_conditions(conditions: dict | None) -> dict:
    """The llm's slice with its one endpoint's conditions replaced (None: no conditions at all)."""
    llm = named("llm-x4k9p")
    if conditions is None:
        del llm["endpoints"][0]["conditions"]
    else:
        llm["endpoints"][0]["conditions"] = conditions
    return llm


def test_the_recorded_slices_give_each_tier_arm_its_ready_endpoints():
    assert endpoints_from_slices(SLICES) == {
        # two slices merged; 10.244.3.21 is in both, 10.244.2.9 is loading, 10.244.1.4 draining
        "retriever": [("10.244.1.17", 50061), ("10.244.2.30", 50061), ("10.244.3.21", 50061)],
        # 10.244.1.23 has no `ready` condition (ready), 10.244.3.8 is terminating
        "gateway": [("10.244.1.23", 50101), ("10.244.2.14", 50101)],
        "gateway_rest": [("10.244.1.23", 50111), ("10.244.2.14", 50111)],
        "llm": [("10.244.3.40", 50071)],
        "llm_treatment": [("10.244.2.41", 50076)],
        # its only replica is not ready: the cluster is known, with no endpoint
        "embedder": [],
    }


def test_the_fixtures_are_valid_endpoint_slices():
    """The recorded objects pass the API's own schema, so the tests above read real shapes."""
    for endpoint_slice in SLICES:
        kubernetes_validate.validate(endpoint_slice, "1.37.0", strict=True)
    # and a mangled one would not
    broken = named("llm-x4k9p")
    broken["endpoints"][0]["addresses"] = "10.244.3.40"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.37.0", strict=True)


@pytest.mark.parametrize(
    ("conditions", "takes_calls"),
    [
        ({"ready": True, "serving": True, "terminating": False}, True),
        ({"serving": True}, True),  # the API: an unset `ready` means ready
        ({"ready": None}, True),
        ({}, True),
        (None, True),
        ({"ready": False, "serving": False, "terminating": False}, False),  # still loading
        ({"ready": False}, False),
        ({"ready": False, "serving": True, "terminating": True}, False),  # draining
        # ready and terminating: what a Service with publishNotReadyAddresses reports while a pod stops
        ({"ready": True, "serving": True, "terminating": True}, False),
    ],
)
def test_an_endpoint_takes_calls_when_ready_and_not_terminating(conditions, takes_calls):
    expected = [("10.244.3.40", 50071)] if takes_calls else []
    assert endpoints_from_slices([with_conditions(conditions)]) == {"llm": expected}


def test_slices_of_one_service_merge_in_any_order_and_an_endpoint_counts_once():
    forward = endpoints_from_slices([named("retriever-7x2kq"), named("retriever-m5vdt")])
    backward = endpoints_from_slices([named("retriever-m5vdt"), named("retriever-7x2kq")])
    assert forward == backward
    assert [address for address, _ in forward["retriever"]].count("10.244.3.21") == 1
    # each slice alone gives its own part
    assert endpoints_from_slices([named("retriever-7x2kq")])["retriever"] == [
        ("10.244.1.17", 50061),
        ("10.244.3.21", 50061),
    ]


def test_only_the_tiers_ipv4_slices_count():
    result = endpoints_from_slices(SLICES)
    addresses = {address for endpoints in result.values() for address, _ in endpoints}
    assert not any(":" in address for address in addresses)  # the IPv6 slice
    # the store, Envoy, an unrelated Service with a `grpc` port, and an unknown tier
    assert not addresses & {"10.244.1.5", "10.244.2.3", "10.244.3.77", "10.244.1.90"}
    assert endpoints_from_slices([named("retriever-v6-9qbwz")]) == {}
    for name in ("store-8cz4n", "envoy-d2lrf", "billing-api-6kq8s", "auditor-p9k2w"):
        assert endpoints_from_slices([named(name)]) == {}, name


@pytest.mark.parametrize("label", [TIER_LABEL, ARM_LABEL])
def test_a_slice_without_the_tier_or_arm_label_is_ignored(label):
    llm = named("llm-x4k9p")
    del llm["metadata"]["labels"][label]
    assert endpoints_from_slices([llm]) == {}
    llm["metadata"]["labels"][label] = "canary" if label == ARM_LABEL else "auditor"
    assert endpoints_from_slices([llm]) == {}
    del llm["metadata"]["labels"]
    assert endpoints_from_slices([llm]) == {}


def test_only_the_grpc_and_http_ports_feed_clusters():
    gateway = named("gateway-jw8hc")
    assert set(endpoints_from_slices([gateway])) == {"gateway", "gateway_rest"}  # not metrics
    gateway["ports"] = [p for p in gateway["ports"] if p["name"] != "http"]
    assert set(endpoints_from_slices([gateway])) == {"gateway"}
    gateway["ports"] = [{"name": "grpc", "protocol": "TCP"}]  # no number: nothing to dial
    assert endpoints_from_slices([gateway]) == {}


def test_a_service_without_pods_gives_no_cluster():
    assert endpoints_from_slices([named("classifiers-5tw2c")]) == {}
    assert endpoints_from_slices([]) == {}


def test_any_iterable_of_slices_is_read_once():
    assert endpoints_from_slices(s for s in SLICES) == endpoints_from_slices(SLICES)


def test_the_cluster_names_are_envoys():
    """Every name is a cluster of the Envoy configuration rendered for the same tiers and arms."""
    settings = read_settings({**{f"{tier.prefix}TREATMENT": "same" for tier in TIERS}})
    clusters = {c["name"] for c in yaml.safe_load(render_envoy(settings))["static_resources"]["clusters"]}
    assert set(endpoints_from_slices(SLICES)) <= clusters
    # and each tier arm's Service labels name its cluster
    for tier in TIERS:
        for arm in ("control", "treatment"):
            endpoint_slice = named("llm-x4k9p")
            endpoint_slice["metadata"]["labels"] = labels(tier, arm)
            endpoint_slice["ports"] = [{"name": "grpc", "port": 1}, {"name": "http", "port": 2}]
            names = set(endpoints_from_slices([endpoint_slice]))
            # a port named http feeds a REST cluster only where the tier has a REST API
            assert names <= clusters and len(names) == (2 if tier.rest else 1), (tier.name, arm)


def test_labels_name_the_tier_and_arm():
    assert labels(tier_named("llm"), "treatment") == {
        "app.kubernetes.io/name": "tiermesh-llm",
        "app.kubernetes.io/part-of": "tiermesh",
        "tiermesh.dev/tier": "llm",
        "tiermesh.dev/arm": "treatment",
    }
