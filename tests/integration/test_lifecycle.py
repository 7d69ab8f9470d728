"""Process lifecycle: fail-fast configuration, graceful drain on SIGTERM, up/down."""

import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from tiermesh.control.probes import grpc_health
from tiermesh.control.testing import mesh_environ, tier_process
from tiermesh.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from tiermesh.kit.testing import free_port, run_cli
from tiermesh.kit.topology import TIERS

pytestmark = pytest.mark.integration
EMBEDDER = next(tier for tier in TIERS if tier.name == "embedder")
SERVICE = EMBEDDER.service


def _run_embedder(env: dict) -> subprocess.CompletedProcess:
    """Run the tier to completion (it is expected to stop by itself)."""
    return subprocess.run(
        [sys.executable, "-m", "services.embedder"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_bad_environment_variable_stops_start_up_with_one_line(tmp_path):
    env = mesh_environ(tmp_path, EMBEDDER_MAX_BATCH_SIZE="lots")
    result = _run_embedder(env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "tiermesh-embedder: configuration error: EMBEDDER_MAX_BATCH_SIZE: expected an integer, got 'lots'"
    ]


def _in_flight(metrics_port: int, method: str) -> float:
    """The tier's own count of `method` calls being handled now (tiermesh_rpc_in_flight)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return 0.0
    found = re.search(rf"^tiermesh_rpc_in_flight{{[^}}]*{method}[^}}]*}} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


@pytest.mark.slow
def test_sigterm_drains_in_flight_calls_then_exits(tmp_path, embedding_model):
    # A generous grace period: the test is about draining, not about how fast this host is.
    metrics_port = free_port()
    settings = {"EMBEDDER_MAX_BATCH_SIZE": "8", "EMBEDDER_SHUTDOWN_GRACE_S": "180"}
    with tier_process(EMBEDDER, tmp_path, EMBEDDER_METRICS_PORT=str(metrics_port), **settings) as (
        process,
        address,
    ):
        # A call that takes a while: many long texts in small batches.
        texts = [f"{i} " + "loan repayment schedule " * 60 for i in range(200)]
        result: dict = {}

        def slow_call() -> None:
            with grpc.insecure_channel(address) as channel:
                stub = embedder_pb2_grpc.EmbedderServiceStub(channel)
                response = stub.EmbedBatch(embedder_pb2.EmbedBatchRequest(texts=texts), timeout=180)
                result["count"] = len(response.embeddings)
                result["finished"] = time.monotonic()

        caller = threading.Thread(target=slow_call)
        caller.start()
        # SIGTERM only once the tier itself counts the call as in flight (a fixed sleep raced a
        # busy host: the call could still be connecting, and a draining server refuses new calls).
        deadline = time.monotonic() + 60
        while _in_flight(metrics_port, "EmbedBatch") < 1 and caller.is_alive():
            assert time.monotonic() < deadline, "the call never reached the tier"
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        time.sleep(0.3)
        assert grpc_health(address, SERVICE) in ("NOT_SERVING", "UNAVAILABLE")  # draining: no new work
        caller.join(180)
        assert result.get("count") == 200, "the in-flight call did not complete"
        assert result["finished"] > signalled, "the call finished before SIGTERM; the test proved nothing"
        assert process.wait(30) == 0
        assert "draining in-flight calls" in process.stderr.read()


def _running(pid: int) -> bool:
    """True unless the process is gone or a zombie waiting for init to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_cli_up_outlives_its_command_and_down_stops_everything(
    tmp_path, embedding_model, knowledge_index, language_model, classifier_models, bias_text_model
):
    env = mesh_environ(tmp_path, GATEWAY_DEFAULT_MAX_TOKENS="24")  # a short demo answer
    up = run_cli(env, "up", "--replicas", "retriever=1")
    assert up.returncode == 0, up.stdout + up.stderr
    assert "mesh is up" in up.stdout
    # the demo question, answered through every tier, with where the answer came from
    demo = up.stdout.split("demo question", 1)[1]
    for part in ("sources:\n  [1] kb-", "intent: loan_affordability", "bias: score", "llm          smollm2"):
        assert part in demo, demo
    assert re.search(r"trace: [0-9a-f]{32}", demo), demo
    try:
        time.sleep(1.5)  # Envoy dies with its parent unless the runner supervises it
        status = run_cli(env, "status", "--json")
        assert status.returncode == 0, status.stdout
        report = json.loads(status.stdout)
        assert {name: entry["health"] for name, entry in report.items()} == {
            "store": "SERVING",
            "embedder": "SERVING",
            "retriever": "SERVING",
            "llm": "SERVING",
            "classifiers": "SERVING",
            "bias": "SERVING",
            "gateway": "SERVING",
            "otlp-sink": "SERVING",  # Envoy's spans into the trace file
            "xds": "SERVING",  # the control plane Envoy's configuration comes from
            "envoy": "LIVE",
        }
        again = run_cli(env, "up")
        assert again.returncode == 0 and "already running" in again.stdout
    finally:
        down = run_cli(env, "down")
    assert down.returncode == 0, down.stderr
    for name in (
        "embedder",
        "retriever",
        "llm",
        "classifiers",
        "bias",
        "gateway",
        "envoy",
        "otlp-sink",
        "store",
    ):
        assert f"{name}: stopped" in down.stdout
    for name, entry in report.items():
        assert not _running(entry["pid"]), f"{name} still runs after down"
    assert grpc_health(report["envoy"]["grpc"], SERVICE, timeout=0.5) == "UNAVAILABLE"
    assert run_cli(env, "status").returncode == 1


def test_help_lists_every_setting_without_starting(tmp_path):
    env = mesh_environ(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "services.embedder", "--help"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    for variable in (
        "EMBEDDER_GRPC_PORT",
        "EMBEDDER_TOKEN_BUDGET",
        "EMBEDDER_SPIN_WAIT",
        "TIERMESH_TRACES_EXPORTER",
    ):
        assert variable in result.stdout
    assert grpc_health(f"127.0.0.1:{env['EMBEDDER_GRPC_PORT']}", SERVICE, timeout=0.5) == "UNAVAILABLE"


def test_a_model_that_cannot_load_stops_the_tier_with_a_clear_error(tmp_path, embedding_model):
    env = mesh_environ(tmp_path, EMBEDDER_MODEL_VERSION="9.9.9")
    result = _run_embedder(env)
    assert result.returncode == 1
    assert "model 'all-minilm-l6-v2' has no version '9.9.9'" in result.stderr
