"""A mesh whose Envoy gets its configuration from the xDS control plane (ENVOY_CONFIG=xds): the
runner starts and supervises the control plane, `tiermesh traffic` moves the split through the
store, the split survives Envoy's restart and the control plane's, and replicas and treatment
deployments come and go on the running mesh without a failed call."""

import os
import signal
import time
from collections.abc import Callable, Iterator

import grpc
import pytest

from tests.integration.load import Load, calls_to, embed, search
from tiermesh.control.deploy import deploy, remove
from tiermesh.control.runner import Mesh, RunnerError
from tiermesh.control.scale import scale
from tiermesh.control.testing import running_mesh
from tiermesh.control.traffic import EnvoyAdmin, set_treatment, split_of, splits
from tiermesh.kit.topology import ARM_HEADER, max_concurrency, only, tier_named
from tiermesh.retriever.v1 import retriever_pb2, retriever_pb2_grpc

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def xds_mesh(tmp_path_factory, embedding_model, knowledge_index) -> Iterator[tuple[Mesh, dict]]:
    settings = {"ENVOY_CONFIG": "xds", "RETRIEVER_REPLICAS": "2", "RETRIEVER_TREATMENT": "same"}
    tiers = only("embedder", "retriever")
    with running_mesh(tmp_path_factory.mktemp("xds-mesh"), tiers=tiers, **settings) as (mesh, status):
        yield mesh, status


def arms_seen(status: dict, calls: int = 30) -> set[str]:
    with grpc.insecure_channel(status["envoy"]["grpc"]) as channel:
        stub = retriever_pb2_grpc.RetrieverServiceStub(channel)
        seen = set()
        for i in range(calls):
            metadata = [("x-tiermesh-user", f"user-{i}")]
            _, call = stub.Search.with_call(
                retriever_pb2.SearchRequest(text="APR?", k=1), timeout=10, metadata=metadata
            )
            seen |= {value for key, value in call.initial_metadata() if key == ARM_HEADER}
        return seen


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout:.0f}s")


def test_envoys_clusters_come_from_the_control_plane_which_the_runner_supervises(xds_mesh):
    mesh, status = xds_mesh
    report = mesh.status()
    assert report["xds"]["health"] == "SERVING" and "rejected" not in report["xds"]
    dump = EnvoyAdmin(status["envoy"]["admin"]).config_dump()
    dynamic = next(c for c in dump["configs"] if c["@type"].endswith("ClustersConfigDump"))
    names = {c["cluster"]["name"] for c in dynamic.get("dynamic_active_clusters", [])}
    assert {"embedder", "retriever", "retriever_treatment"} <= names
    assert arms_seen(status) == {"control"}


def test_a_split_set_with_traffic_survives_envoy_and_control_plane_restarts(xds_mesh):
    mesh, status = xds_mesh
    admin = EnvoyAdmin(status["envoy"]["admin"])
    set_treatment(admin, "retriever", 100)
    assert arms_seen(status) == {"treatment"}
    for name in ("envoy", "xds"):
        pid = mesh.status()[name]["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_for(
            lambda n=name, p=pid: (
                mesh.status()[n]["pid"] != p and mesh.status()[n]["health"] in ("LIVE", "SERVING")
            ),
            60,
            f"{name} restarted",
        )
        wait_for(lambda: arms_seen(status, 10) == {"treatment"}, 30, f"the split after {name}'s restart")
    assert split_of(EnvoyAdmin(status["envoy"]["admin"]), "retriever").weights == {
        "control": 0,
        "treatment": 10_000,
    }
    set_treatment(EnvoyAdmin(status["envoy"]["admin"]), "retriever", 0)
    assert arms_seen(status) == {"control"}


def test_scaling_out_and_in_under_load_fails_no_call(xds_mesh):
    mesh, status = xds_mesh
    lines = []
    with Load(status["envoy"]["grpc"], search) as load:
        scale(mesh, tier_named("retriever"), 3, progress=lines.append)
        third = mesh.state()["retriever-3"]["grpc"]
        wait_for(lambda: calls_to(status["envoy"]["admin"], third) > 10, 15, "calls on the new replica")
        limit = str(3 * max_concurrency(mesh.settings, tier_named("retriever")))
        runtime = EnvoyAdmin(status["envoy"]["admin"]).runtime
        wait_for(
            lambda: runtime()["circuit_breakers.retriever.default.max_requests"] == limit,
            10,
            "circuit breakers sized for 3 replicas",
        )
        scale(mesh, tier_named("retriever"), 2, progress=lines.append)
        assert "retriever-3" not in mesh.state() and "retriever-3" not in mesh.status()
        time.sleep(1.0)
    assert load.failures == [] and load.calls > 100, (load.failures[:5], load.calls)
    assert any("retriever-3: SERVING and in Envoy's pool" in line for line in lines), lines
    assert any("retriever-3: drained and stopped" in line for line in lines), lines


def test_a_treatment_deployed_on_the_running_mesh_takes_calls_and_leaves_without_a_failed_call(xds_mesh):
    mesh, status = xds_mesh
    embedder, lines = tier_named("embedder"), []
    admin = EnvoyAdmin(status["envoy"]["admin"])
    with Load(status["envoy"]["grpc"], embed) as load:
        deploy(mesh, embedder, ["EMBEDDER_MAX_BATCH_SIZE=8"], progress=lines.append)
        assert split_of(admin, "embedder").has_treatment and load.arms == {"control"}
        set_treatment(admin, "embedder", 50)
        wait_for(lambda: "treatment" in load.arms, 15, "calls on the treatment")
        with pytest.raises(RunnerError, match="still takes 50% of the calls"):
            remove(mesh, embedder)
        set_treatment(admin, "embedder", 0)
        remove(mesh, embedder, progress=lines.append)
        time.sleep(1.0)
    assert load.failures == [] and load.calls > 50, (load.failures[:5], load.calls)
    assert "embedder-treatment" not in mesh.state()
    assert not splits(EnvoyAdmin(status["envoy"]["admin"]))["embedder"].has_treatment
    assert any("embedder-treatment: SERVING and in Envoy's pool" in line for line in lines), lines
    assert any("embedder-treatment: drained and stopped" in line for line in lines), lines
    with pytest.raises(RunnerError, match="embedder has no treatment deployment to remove"):
        remove(mesh, embedder)
    with pytest.raises(RunnerError, match="retriever already has a treatment deployment"):
        deploy(mesh, tier_named("retriever"), [])
    with pytest.raises(RunnerError, match="--treatment: EMBEDDER_TREATMENT: expected KEY=VALUE"):
        deploy(mesh, embedder, ["lowercase"])


def test_scaling_needs_the_control_plane_and_a_sane_count(tmp_path, xds_mesh):
    mesh, _status = xds_mesh
    with pytest.raises(RunnerError, match="from 1 to 16, got 0"):
        scale(mesh, tier_named("retriever"), 0)
    static = Mesh({**os.environ, "TIERMESH_HOME": str(tmp_path)})
    static.save({"retriever": {"tier": "retriever", "arm": "control", "grpc": "127.0.0.1:1"}})
    with pytest.raises(
        RunnerError, match="scaling a running mesh needs Envoy on the xDS control plane: set ENVOY_CONFIG=xds"
    ):
        scale(static, tier_named("retriever"), 3)
