"""The xDS control plane driving a real Envoy: clusters, endpoints and routes from the control
plane only, replicas added and removed live, weights over RTDS, a refused configuration reported,
and Envoy serving on while the control plane is away.

Replicas are gRPC servers in this process (health + a Search that names its replica); the
control plane and Envoy are real processes on free loopback ports."""

import concurrent.futures
import contextlib
import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import redis
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tiermesh.control.envoy_config import envoy_binary
from tiermesh.control.testing import mesh_environ
from tiermesh.kit.membership import REPLICA_KEY_PREFIX, replica_key
from tiermesh.kit.testing import free_port
from tiermesh.retriever.v1 import retriever_pb2, retriever_pb2_grpc

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SERVICE = "tiermesh.retriever.v1.RetrieverService"


class Replica(retriever_pb2_grpc.RetrieverServiceServicer):
    """A retriever replica in a thread of its own: answers Search with its own name as doc_id."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = free_port()
        # Envoy's keepalive PINGs (every 2 s) allowed, as the kit's servers allow them
        options = [
            ("grpc.http2.min_ping_interval_without_data_ms", 1_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
        self.server = grpc.server(concurrent.futures.ThreadPoolExecutor(8), options=options)
        retriever_pb2_grpc.add_RetrieverServiceServicer_to_server(self, self.server)
        checks = health.HealthServicer()
        checks.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(checks, self.server)
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        self.server.start()

    def Search(self, request, context):
        return retriever_pb2.SearchResponse(passages=[retriever_pb2.Passage(doc_id=self.name)])


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if condition():
                return
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout:.0f}s")


class Plane:
    """The control plane and Envoy of a one-tier mesh (the retriever) under `home`."""

    def __init__(self, home: Path, store_url: str) -> None:
        self.home = home
        self.environ = mesh_environ(home, OTLP_SINK_PORT="", RETRIEVER_TREATMENT="same")
        self.port = free_port()
        self.status = home / "xds.json"
        self.store_url = store_url
        self.replicas: dict[str, Replica] = {}
        self.registry = redis.Redis.from_url(store_url)
        self.write_state()
        self.xds = self.start_xds()
        bootstrap = home / "envoy.yaml"
        self.run_xds("--bootstrap", str(bootstrap))
        argv = [envoy_binary(), "-c", str(bootstrap), "--use-dynamic-base-id", "--log-level", "warn"]
        with open(home / "envoy.log", "w") as log:  # the child keeps its own descriptor
            self.envoy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.environ['ENVOY_GRPC_PORT']}")
        self.stub = retriever_pb2_grpc.RetrieverServiceStub(self.channel)

    def xds_argv(self, *extra: str) -> list[str]:
        return [sys.executable, "-m", "tiermesh.control.xds", "--tiers", "retriever",
                "--port", str(self.port), "--source", "registry", "--store", self.store_url,
                "--status", str(self.status), "--interval", "0.1", *extra]  # fmt: skip

    def run_xds(self, *extra: str) -> None:
        subprocess.run(self.xds_argv(*extra), env=self.environ, check=True, timeout=60)

    def start_xds(self) -> subprocess.Popen:
        with open(self.home / "xds.log", "a") as log:
            return subprocess.Popen(self.xds_argv(), env=self.environ, stdout=log, stderr=log)

    def write_state(self, arms: dict[str, str] | None = None) -> None:
        """Register exactly the replicas of `self.replicas` (as each would while SERVING)."""
        arms = arms or {}
        entries = {
            replica_key("retriever", arms.get(name, "control"), f"127.0.0.1:{r.port}"): json.dumps(
                {"tier": "retriever", "arm": arms.get(name, "control"), "grpc": f"127.0.0.1:{r.port}"}
            )
            for name, r in self.replicas.items()
        }
        registered = self.registry.keys(f"{REPLICA_KEY_PREFIX}*")
        with self.registry.pipeline(transaction=True) as pipe:
            if registered:
                pipe.delete(*registered)
            if entries:
                pipe.mset(entries)
            pipe.execute()

    def add(self, name: str, arms: dict[str, str] | None = None) -> Replica:
        self.replicas[name] = Replica(name)
        self.write_state(arms)
        return self.replicas[name]

    def served_by(self, calls: int = 40, user: str = "") -> set[str]:
        metadata = [("x-tiermesh-user", user)] if user else None
        request = retriever_pb2.SearchRequest(text="q")
        return {
            self.stub.Search(request, timeout=5, metadata=metadata).passages[0].doc_id for _ in range(calls)
        }

    def admin(self, path: str) -> str:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.environ['ENVOY_ADMIN_PORT']}{path}", timeout=2
        ) as r:
            return r.read().decode()

    def close(self) -> None:
        self.channel.close()
        for process in (self.envoy, self.xds):
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
            if process.poll() is None:
                process.kill()
        for replica in self.replicas.values():
            replica.server.stop(0)


@pytest.fixture
def plane(tmp_path, store_url) -> Iterator[Plane]:
    redis.Redis.from_url(store_url).delete("tiermesh:weights")
    running = Plane(tmp_path, store_url)
    try:
        yield running
    finally:
        running.close()
        redis.Redis.from_url(store_url).delete("tiermesh:weights")


def test_envoy_gets_every_cluster_and_route_from_the_control_plane_and_follows_replicas(plane):
    first = plane.add("r1")
    wait_for(lambda: plane.served_by(5) == {"r1"}, 30, "Envoy routing to the first replica")
    assert "retriever::" in plane.admin("/clusters") and "dynamic_active_clusters" in plane.admin(
        "/config_dump"
    )
    plane.add("r2")
    wait_for(lambda: plane.served_by() == {"r1", "r2"}, 15, "the added replica taking calls")
    # Scaling in: the replica leaves the list and stops. Envoy keeps a host that left EDS while it
    # still passes health checks (a drain), so it goes once its checks fail; no call fails meanwhile.
    del plane.replicas["r1"]
    plane.write_state()
    first.server.stop(grace=1.0)
    wait_for(lambda: plane.served_by() == {"r2"}, 15, "the removed replica leaving Envoy")
    status = json.loads(plane.status.read_text())
    assert {a["type"] for a in status["acked"]} >= {"Cluster", "ClusterLoadAssignment", "RouteConfiguration"}
    assert status["rejected"] == []


def test_weights_in_the_store_reach_envoy_over_rtds_and_survive_an_envoy_restart(plane):
    plane.add("c1")
    plane.add("t1", arms={"t1": "treatment"})
    wait_for(lambda: plane.served_by(20) == {"c1"}, 30, "everything on control at weight 0")
    redis.Redis.from_url(plane.store_url).hset("tiermesh:weights", "retriever", 10_000)
    wait_for(lambda: plane.served_by(20) == {"t1"}, 15, "everything on treatment at weight 10000")
    redis.Redis.from_url(plane.store_url).hset("tiermesh:weights", "retriever", 5_000)
    wait_for(lambda: plane.served_by(40, user="") == {"c1", "t1"}, 15, "a 50/50 split")
    split = {user: plane.served_by(3, user=f"user-{user}") for user in range(30)}
    assert all(len(arms) == 1 for arms in split.values())  # sticky per user
    assert 5 < sum(arms == {"t1"} for arms in split.values()) < 25


def test_envoy_keeps_serving_while_the_control_plane_is_away_and_it_resyncs(plane):
    plane.add("r1")
    wait_for(lambda: plane.served_by(5) == {"r1"}, 30, "Envoy routing")
    plane.xds.kill()
    plane.xds.wait()
    assert plane.served_by(50) == {"r1"}  # every call served from the last configuration
    plane.add("r2")
    plane.xds = plane.start_xds()
    wait_for(lambda: plane.served_by() == {"r1", "r2"}, 30, "the restarted control plane's update")


def test_a_configuration_envoy_refuses_is_reported_and_the_last_good_one_kept(plane):
    plane.add("r1")
    wait_for(lambda: plane.served_by(5) == {"r1"}, 30, "Envoy routing")
    plane.replicas["bad"] = Replica("bad")
    bad = {"tier": "retriever", "grpc": "not-an-ip:1"}  # Envoy refuses a hostname in EDS
    plane.registry.set(replica_key("retriever", "control", "not-an-ip:1"), json.dumps(bad))
    wait_for(lambda: json.loads(plane.status.read_text())["rejected"], 15, "the NACK in the status file")
    rejected = json.loads(plane.status.read_text())["rejected"][0]
    assert rejected["type_url"].endswith("ClusterLoadAssignment") and "not-an-ip" in rejected["message"]
    assert plane.served_by(20) == {"r1"}
    assert "rejected ClusterLoadAssignment" in (plane.home / "xds.log").read_text()


def test_the_bootstrap_has_no_tier_cluster_and_routes_over_rds(tmp_path):
    environ = mesh_environ(tmp_path, OTLP_SINK_PORT="")
    out = tmp_path / "boot.yaml"
    argv = [sys.executable, "-m", "tiermesh.control.xds", "--bootstrap", str(out)]
    subprocess.run(argv, env=environ, check=True, timeout=60)
    boot = yaml.safe_load(out.read_text())
    static = {c["name"] for c in boot["static_resources"]["clusters"]}
    assert static - {"traces"} == {"envoy_admin", "tiermesh_xds"}  # Envoy's own spans may stay static
    rds = [
        listener["filter_chains"][0]["filters"][0]["typed_config"].get("rds", {}).get("route_config_name")
        for listener in boot["static_resources"]["listeners"]
    ]
    assert sorted(filter(None, rds)) == ["rest", "tiers"]
    check = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(out)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr
