"""Where the control plane reads the replicas: the store's registry entries, and the Kubernetes API
(a local HTTP server answering with recorded EndpointSlices and watch events stands in for the API
server)."""

import asyncio
import copy
import http.server
import json
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

from tiermesh.control.kubernetes import SELECTOR, endpoints_from_slices
from tiermesh.control.xds.sources import KubernetesEndpoints, endpoints_of

SLICES = (Path(__file__).parent / "data" / "endpointslices.json").read_bytes()


class FakeApi(http.server.BaseHTTPRequestHandler):
    """Lists the recorded slices (resourceVersion 48377); a watch streams `events`, then ends."""

    seen: list[tuple[dict, str]] = []
    events: list[dict] = []
    failing = False

    def do_GET(self):
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query))
        FakeApi.seen.append((query, self.headers.get("Authorization", "")))
        if FakeApi.failing:
            body = b'{"message": "forbidden"}'
        elif query.get("watch"):
            body = b"".join(json.dumps(event).encode() + b"\n" for event in FakeApi.events)
            FakeApi.events = []
        else:
            body = SLICES
        self.send_response(403 if FakeApi.failing else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def api():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    FakeApi.seen, FakeApi.events, FakeApi.failing = [], [], False
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def recorded(name: str) -> dict:
    return copy.deepcopy(next(s for s in json.loads(SLICES)["items"] if s["metadata"]["name"] == name))


async def eventually(condition, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def test_endpointslices_are_listed_then_watched_with_the_token_and_selector(api, tmp_path):
    token = tmp_path / "token"
    token.write_text("secret-1\n")
    source = KubernetesEndpoints(api, "tiermesh", token_file=token)
    endpoints = await source.read()
    assert endpoints["retriever"] and all(port == 50061 for _, port in endpoints["retriever"])
    query, authorization = FakeApi.seen[0]
    assert query == {"labelSelector": SELECTOR} and authorization == "Bearer secret-1"
    await eventually(lambda: any(q.get("watch") for q, _ in FakeApi.seen), "a watch")
    watch = next(q for q, _ in FakeApi.seen if q.get("watch"))
    assert watch["resourceVersion"] == "48377" and watch["labelSelector"] == SELECTOR

    # a slice deleted, then a modified one whose endpoints are not ready: both leave the cluster
    gone, drained = recorded("retriever-m5vdt"), recorded("retriever-7x2kq")
    for endpoint in drained["endpoints"]:
        endpoint["conditions"] = {"ready": False}
    drained["metadata"]["resourceVersion"] = "48380"
    token.write_text("secret-2")  # rotated by Kubernetes: the next request uses the new one
    FakeApi.events = [{"type": "DELETED", "object": gone}, {"type": "MODIFIED", "object": drained}]
    await eventually(lambda: not endpoints_from_slices(source.slices.values()).get("retriever"), "the events")
    assert (await source.read())["retriever"] == []
    await eventually(lambda: FakeApi.seen[-1][0].get("resourceVersion") == "48380", "resuming the watch")
    assert FakeApi.seen[-1][1] == "Bearer secret-2"

    # the watch expired: everything is listed again (the recorded slices, all ready)
    FakeApi.events = [{"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old"}}]
    relisted = lambda: endpoints_from_slices(source.slices.values()).get("retriever")  # noqa: E731
    await eventually(lambda: relisted() == endpoints["retriever"], "a new list")
    assert [q for q, _ in FakeApi.seen if not q.get("watch")][1:], "listed once more"
    await source.close()


async def test_an_unreachable_api_keeps_the_last_endpoints(api):
    source = KubernetesEndpoints(api, "tiermesh")
    endpoints = await source.read()
    FakeApi.failing = True
    FakeApi.events = [{"type": "DELETED", "object": recorded("retriever-m5vdt")}]
    await asyncio.sleep(1.5)
    assert await source.read() == endpoints
    await source.close()


def test_registry_entries_become_each_arms_cluster_and_bad_ones_are_left_out():
    entries = {
        "r1": {"tier": "retriever", "arm": "control", "grpc": "10.0.0.11:7001"},
        "g1": {"tier": "gateway", "arm": "treatment", "grpc": "10.0.0.12:7101", "http": "10.0.0.12:7102"},
        "r2": {"tier": "retriever", "arm": "control", "grpc": "no-port"},
        "x1": {"tier": "no-such-tier", "grpc": "10.0.0.13:1"},
        "n1": 42,  # valid JSON, not an entry: left out, it does not stop the others
        "n2": None,  # not JSON at all
    }
    endpoints, problems = endpoints_of(entries)
    assert endpoints == {
        "retriever": [("10.0.0.11", 7001)],
        "gateway_treatment": [("10.0.0.12", 7101)],
        "gateway_treatment_rest": [("10.0.0.12", 7102)],
    }
    assert {problem.split(":")[0] for problem in problems} == {"r2", "x1", "n1", "n2"}
    assert any("'no-port' is not host:port" in problem for problem in problems)
