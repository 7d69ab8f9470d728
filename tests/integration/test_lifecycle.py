"""Process lifecycle: fail-fast configuration, graceful drain on SIGTERM, up/down."""

import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest

from tiermesh.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from tiermesh.runner import Mesh, grpc_health
from tiermesh.testing import free_port, mesh_environ

pytestmark = pytest.mark.integration
SERVICE = "tiermesh.embedder.v1.EmbedderService"


def test_bad_environment_variable_stops_start_up_with_one_line(tmp_path):
    env = mesh_environ(tmp_path, EMBEDDER_MAX_BATCH_SIZE="lots")
    result = subprocess.run(
        [sys.executable, "-m", "services.embedder"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "tiermesh-embedder: configuration error: EMBEDDER_MAX_BATCH_SIZE: expected an integer, got 'lots'"
    ]


def test_sigterm_drains_in_flight_calls_then_exits(tmp_path, embedding_model):
    port = free_port()
    env = mesh_environ(tmp_path, EMBEDDER_GRPC_PORT=str(port), EMBEDDER_MAX_BATCH_SIZE="8")
    process = subprocess.Popen(
        [sys.executable, "-m", "services.embedder"], env=env, stderr=subprocess.PIPE, text=True
    )
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while grpc_health(address, SERVICE) != "SERVING":
            assert process.poll() is None and time.monotonic() < deadline, "embedder did not start"
            time.sleep(0.1)
        # A call that takes a few seconds: many long texts in small batches.
        texts = [f"{i} " + "loan repayment schedule " * 60 for i in range(200)]
        result: dict = {}

        def slow_call() -> None:
            with grpc.insecure_channel(address) as channel:
                stub = embedder_pb2_grpc.EmbedderServiceStub(channel)
                started = time.monotonic()
                response = stub.EmbedBatch(embedder_pb2.EmbedBatchRequest(texts=texts), timeout=60)
                result["count"] = len(response.embeddings)
                result["seconds"] = time.monotonic() - started

        caller = threading.Thread(target=slow_call)
        caller.start()
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert grpc_health(address, SERVICE) in ("NOT_SERVING", "UNAVAILABLE")  # draining: no new work
        caller.join(60)
        assert result.get("count") == 200, "the in-flight call did not complete"
        assert result["seconds"] > 0.8, "the call finished before SIGTERM; the test proved nothing"
        assert process.wait(30) == 0
        assert "draining in-flight calls" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()


def test_up_then_down_leaves_nothing_running(tmp_path, embedding_model):
    mesh = Mesh(mesh_environ(tmp_path))
    status = mesh.up(progress=lambda _line: None)
    pids = [status[name]["pid"] for name in ("store", "envoy", "embedder")]
    assert mesh.running()
    assert mesh.up(progress=lambda _line: None).keys() == status.keys()  # a second up is a no-op
    mesh.down(progress=lambda _line: None)
    assert not mesh.running() and mesh.status() == {}
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            import os

            os.kill(pid, 0)
    assert grpc_health(status["envoy"]["grpc"], SERVICE, timeout=0.5) == "UNAVAILABLE"
