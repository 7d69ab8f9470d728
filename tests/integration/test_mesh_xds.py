"""A mesh whose Envoy gets its configuration from the xDS control plane (ENVOY_CONFIG=xds): the
runner starts and supervises the control plane, `tiermesh traffic` moves the split through the
store, and the split survives Envoy's restart and the control plane's."""

import os
import signal
import time
from collections.abc import Callable, Iterator

import grpc
import pytest

from tiermesh.control.runner import Mesh
from tiermesh.control.testing import running_mesh
from tiermesh.control.traffic import EnvoyAdmin, set_treatment, split_of
from tiermesh.kit.topology import ARM_HEADER, only
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
