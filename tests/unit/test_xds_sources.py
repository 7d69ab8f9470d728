"""Where the control plane reads the replicas: the runner's state file, and the Kubernetes API
(a local HTTP server answering with recorded EndpointSlices stands in for the API server)."""

import http.server
import threading
from pathlib import Path

import pytest

from tiermesh.control.kubernetes import SELECTOR
from tiermesh.control.xds.sources import KubernetesEndpoints, endpoints_of

SLICES = (Path(__file__).parent / "data" / "endpointslices.json").read_bytes()


class FakeApi(http.server.BaseHTTPRequestHandler):
    seen: list[tuple[str, str]] = []
    failing = False

    def do_GET(self):
        FakeApi.seen.append((self.path, self.headers.get("Authorization", "")))
        body = b'{"message": "forbidden"}' if FakeApi.failing else SLICES
        self.send_response(403 if FakeApi.failing else 200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def api():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    FakeApi.seen, FakeApi.failing = [], False
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


async def test_endpointslices_are_listed_with_the_token_and_selector_and_kept_through_an_outage(
    api, tmp_path
):
    token = tmp_path / "token"
    token.write_text("secret-1\n")
    source = KubernetesEndpoints(api, "tiermesh", token_file=token)
    endpoints = await source.read()
    assert endpoints["retriever"] and all(port == 50061 for _, port in endpoints["retriever"])
    path, authorization = FakeApi.seen[0]
    assert path.startswith("/apis/discovery.k8s.io/v1/namespaces/tiermesh/endpointslices?labelSelector=")
    assert SELECTOR.replace("=", "%3D").replace("/", "%2F") in path and authorization == "Bearer secret-1"

    token.write_text("secret-2")  # rotated by Kubernetes: the next call uses the new one
    FakeApi.failing = True
    assert await source.read() == endpoints  # the API refuses: the last endpoints stay
    assert FakeApi.seen[-1][1] == "Bearer secret-2"


def test_registry_entries_become_each_arms_cluster_and_bad_ones_are_left_out():
    entries = [
        {"tier": "retriever", "arm": "control", "grpc": "10.0.0.11:7001"},
        {"tier": "gateway", "arm": "treatment", "grpc": "10.0.0.12:7101", "http": "10.0.0.12:7102"},
        {"tier": "retriever", "arm": "control", "grpc": "no-port"},
        {"tier": "no-such-tier", "grpc": "10.0.0.13:1"},
    ]
    assert endpoints_of(entries, "test") == {
        "retriever": [("10.0.0.11", 7001)],
        "gateway_treatment": [("10.0.0.12", 7101)],
        "gateway_treatment_rest": [("10.0.0.12", 7102)],
    }
