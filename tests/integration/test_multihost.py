"""A mesh across hosts: two hosts made of network namespaces on one bridge (`ip netns` + veth), the
embedder on one, retriever replicas spread over both, and Envoy, the xDS control plane and the
store on this host's bridge address. Calls cross hosts (client → Envoy → a retriever on another
host → Envoy → the embedder on a third), scaling places a replica on another host, and a host cut
off the network leaves Envoy's pool with no failed Search (idempotent: retried elsewhere)."""

import json
import re
import time
import urllib.request
from collections.abc import Callable

import pytest
import redis

from tests.integration.load import Load, calls_to, search
from tiermesh.control.scale import scale
from tiermesh.control.testing import can_make_hosts, cut_off, spread_mesh
from tiermesh.kit.membership import REPLICA_KEY_PREFIX
from tiermesh.kit.topology import tier_named

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(bool(can_make_hosts()), reason=can_make_hosts() or "hosts can be made"),
]


@pytest.fixture(scope="module")
def spread(tmp_path_factory, embedding_model, knowledge_index):
    with spread_mesh(tmp_path_factory.mktemp("multihost")) as running:
        yield running


def envoy_hosts(admin: str, cluster: str) -> set[str]:
    """The addresses Envoy has in one cluster."""
    with urllib.request.urlopen(f"http://{admin}/clusters", timeout=2) as response:
        text = response.read().decode()
    return set(re.findall(rf"^{cluster}::([0-9.]+:[0-9]+)::cx_total::", text, re.M))


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout:.0f}s")


def registered(status: dict) -> set[str]:
    store = redis.Redis.from_url(status["store"]["url"])
    return {json.loads(store.get(key))["grpc"] for key in store.keys(f"{REPLICA_KEY_PREFIX}retriever:*")}


def test_calls_cross_hosts_through_envoy_and_replicas_register_from_theirs(spread):
    _mesh, status, hosts = spread
    first, second = hosts.values()
    assert status["embedder"]["grpc"].startswith(f"{first}:")
    assert status["retriever"]["grpc"].startswith(f"{first}:")
    assert status["retriever-2"]["grpc"].startswith(f"{second}:")
    replicas = {status["retriever"]["grpc"], status["retriever-2"]["grpc"]}
    assert registered(status) == replicas
    assert envoy_hosts(status["envoy"]["admin"], "retriever") == replicas
    with Load(status["envoy"]["grpc"], search) as load:
        wait_for(
            lambda: all(calls_to(status["envoy"]["admin"], address) > 5 for address in replicas),
            20,
            "calls on both hosts' replicas",
        )
    # every Search embedded its question on the embedder's host, through Envoy on this one
    assert load.failures == [] and load.calls > 10, (load.failures[:5], load.calls)
    assert calls_to(status["envoy"]["admin"], status["embedder"]["grpc"], "embedder") >= load.calls


def test_scaling_places_the_new_replica_on_the_next_host_without_a_failed_call(spread):
    mesh, status, hosts = spread
    first = next(iter(hosts.values()))
    lines: list[str] = []
    with Load(status["envoy"]["grpc"], search) as load:
        scale(mesh, tier_named("retriever"), 3, progress=lines.append)
        third = mesh.state()["retriever-3"]["grpc"]
        assert third.startswith(f"{first}:")  # replica index 2 of placement (first, second)
        wait_for(lambda: calls_to(status["envoy"]["admin"], third) > 5, 20, "calls on the new replica")
    assert load.failures == [], load.failures[:5]
    assert any("retriever-3: started on " in line for line in lines), lines


def test_a_host_cut_off_leaves_envoy_and_no_search_fails(spread):
    mesh, status, hosts = spread
    name, address = list(hosts.items())[1]
    lost = {c["grpc"] for c in mesh.state().values() if c.get("host") == name}
    assert lost and all(a.startswith(f"{address}:") for a in lost)
    with Load(status["envoy"]["grpc"], search, clients=6) as load:
        time.sleep(1.0)
        cut_off(name)  # silence, no reset
        cut = time.monotonic()
        # its entries expire from the registry (no refresh gets through), so the control plane
        # drops its endpoints; Envoy's health checks fail meanwhile
        wait_for(lambda: not lost & registered(status), 15, "the lost host's replicas leaving the registry")
        wait_for(
            lambda: not lost & envoy_hosts(status["envoy"]["admin"], "retriever"), 30, "them leaving Envoy"
        )
        gone_after = time.monotonic() - cut
        time.sleep(1.0)
    assert load.failures == [], (load.failures[:5], len(load.failures), load.calls)
    assert load.calls > 50 and gone_after < 30
