"""Chaos: real processes killed, stopped and restarted under steady concurrent load, counting what
failed and what was lost. One mesh (two replicas of the embedder, the retriever and the gateway,
one llm, an A/A treatment of the embedder) serves every test here."""

import collections
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from tests.integration.gateway import rest_client
from tiermesh.control.probes import envoy_host_health
from tiermesh.control.restart import rolling_restart
from tiermesh.control.runner import Mesh
from tiermesh.control.testing import running_mesh
from tiermesh.control.traffic import EnvoyAdmin, set_treatment, split_of
from tiermesh.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from tiermesh.kit.testing import run_cli
from tiermesh.kit.topology import only, tier_named
from tiermesh.llm.v1 import llm_pb2, llm_pb2_grpc
from tiermesh.retriever.v1 import retriever_pb2, retriever_pb2_grpc

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.chaos]
SECRET = re.compile(r"tm_(k_[0-9a-f]{10})_[A-Za-z0-9_-]{43}")


class Load:
    """`clients` threads calling `call(channel_or_client)` back to back until stopped; counts
    every outcome and keeps the failures' codes and details."""

    def __init__(self, call: Callable[[], None], clients: int = 8) -> None:
        self.call = call
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(clients)]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.call()
                self.outcomes["ok"] += 1
            except (grpc.RpcError, httpx.HTTPError, AssertionError) as error:
                self.outcomes["failed"] += 1
                self.failures.append(describe(error))

    def __enter__(self) -> "Load":
        for thread in self._threads:
            thread.start()
        time.sleep(1.0)  # steady before the fault
        return self

    def __exit__(self, *_) -> None:
        time.sleep(1.0)  # and after it
        self._stop.set()
        for thread in self._threads:
            thread.join()


def describe(error: BaseException) -> str:
    if isinstance(error, grpc.RpcError):
        return f"{error.code().name}: {error.details()}"
    return f"{type(error).__name__}: {error}"


@pytest.fixture(scope="module")
def chaos_mesh(
    tmp_path_factory, embedding_model, knowledge_index, language_model
) -> Iterator[tuple[Mesh, dict]]:
    settings = {
        "EMBEDDER_REPLICAS": "2",
        "RETRIEVER_REPLICAS": "2",
        "GATEWAY_REPLICAS": "2",
        "EMBEDDER_TREATMENT": "same",
        "GATEWAY_KEY_CACHE_TTL_S": "600",
    }
    tiers = only("embedder", "retriever", "llm", "gateway")
    with running_mesh(tmp_path_factory.mktemp("chaos"), tiers=tiers, **settings) as (mesh, status):
        yield mesh, status


@pytest.fixture(scope="module")
def envoy(chaos_mesh) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(chaos_mesh[1]["envoy"]["grpc"]) as channel:
        yield channel


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until `condition` held (AssertionError naming `what` after `timeout`)."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"{what}: not within {timeout:.0f}s"
        time.sleep(0.1)
    return time.monotonic() - started


def replaced(mesh: Mesh, name: str, old_pid: int, healthy: str = "SERVING") -> Callable[[], bool]:
    def check() -> bool:
        entry = mesh.status()[name]
        return entry.get("pid") not in (None, old_pid) and entry["health"] == healthy

    return check


def search(envoy: grpc.Channel) -> Callable[[], None]:
    stub = retriever_pb2_grpc.RetrieverServiceStub(envoy)
    return lambda: stub.Search(retriever_pb2.SearchRequest(text="What is an APR?", k=3), timeout=10)


def test_a_killed_replica_costs_no_idempotent_call_and_comes_back_by_itself(chaos_mesh, envoy):
    mesh, _ = chaos_mesh
    victim = mesh.status()["retriever-2"]["pid"]
    with Load(search(envoy)) as load:
        os.kill(victim, signal.SIGKILL)
        back = wait_for(replaced(mesh, "retriever-2", victim), 60, "retriever-2 back")
    assert load.failures == [] and load.outcomes["ok"] > 50, load.outcomes
    entry = mesh.status()["retriever-2"]
    assert entry["restarts"] >= 1 and entry["last_exit"] == "signal SIGKILL"
    print(f"retriever-2 SIGKILL: {load.outcomes['ok']} calls, 0 failed, SERVING again after {back:.1f}s")


def test_a_rolling_restart_of_every_replicated_tier_fails_no_call(chaos_mesh, envoy):
    mesh, status = chaos_mesh
    secret = create_key(status, "rolling")
    embed = embedder_pb2_grpc.EmbedderServiceStub(envoy)
    with rest_client(status, secret) as client:

        def mixed() -> None:
            search(envoy)()
            embed.Embed(embedder_pb2.EmbedRequest(text="fixed or variable rate?"), timeout=10)
            answer = client.post("/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": "APR"})
            assert answer.status_code == 200, answer.text

        with Load(mixed, clients=6) as load:
            for tier in ("embedder", "retriever", "gateway"):
                rolling_restart(mesh, tier_named(tier), progress=print)
    assert load.failures == [], collections.Counter(load.failures).most_common(3)
    assert load.outcomes["ok"] > 30


def test_the_llm_killed_mid_stream_fails_only_its_streams_clearly_and_restarts(chaos_mesh, envoy):
    mesh, _ = chaos_mesh
    stub = llm_pb2_grpc.LlmServiceStub(envoy)
    request = llm_pb2.GenerateStreamRequest(
        prompt="Explain loan amortization step by step.",
        sampling=llm_pb2.SamplingParams(max_tokens=400, temperature=0),
    )
    engines_before = engine_cores()
    victim = mesh.status()["llm"]["pid"]
    streams: list[str] = []

    def stream() -> None:
        try:
            for _ in stub.GenerateStream(request, timeout=120):
                pass
            streams.append("completed")
        except grpc.RpcError as error:
            streams.append(describe(error))

    threads = [threading.Thread(target=stream) for _ in range(3)]
    for thread in threads:
        thread.start()
    wait_for(lambda: llm_running(mesh) >= 3, 60, "three streams generating")
    os.kill(victim, signal.SIGKILL)
    for thread in threads:
        thread.join()
    # Envoy had sent the answer's headers, so it can only reset the stream: gRPC reports INTERNAL
    # "Stream removed (RST_STREAM ...)" to each caller at once (none hangs, none looks complete).
    assert len(streams) == 3, streams
    assert all(s.startswith(("INTERNAL: Stream removed", "UNAVAILABLE: ")) for s in streams), streams
    back = wait_for(replaced(mesh, "llm", victim), tier_named("llm").load_timeout_s, "llm back")
    # SERVING, it registers; the control plane adds it to Envoy, whose first health check passes
    admin, address = mesh.status()["envoy"]["admin"], mesh.status()["llm"]["grpc"]
    wait_for(lambda: envoy_host_health(admin, "llm", address) == "healthy", 15, "llm back in Envoy's pool")
    wait_for(lambda: engine_cores() == engines_before, 30, "the killed llm's engine processes gone")
    answer = llm_pb2_grpc.LlmServiceStub(envoy).Generate(
        llm_pb2.GenerateRequest(prompt="APR means", sampling=llm_pb2.SamplingParams(max_tokens=4)), timeout=60
    )
    assert answer.usage.completion_tokens > 0
    print(f"llm SIGKILL: 3 in-flight streams failed ({streams[0]}); SERVING again after {back:.1f}s")


def test_envoy_killed_comes_back_with_the_same_split(chaos_mesh, envoy):
    mesh, status = chaos_mesh
    admin = EnvoyAdmin(status["envoy"]["admin"])
    set_treatment(admin, "embedder", 30)
    victim = mesh.status()["envoy"]["pid"]
    os.kill(victim, signal.SIGKILL)
    back = wait_for(replaced(mesh, "envoy", victim, healthy="LIVE"), 30, "envoy back")
    after = split_of(EnvoyAdmin(status["envoy"]["admin"]), "embedder")
    assert after.percent("treatment") == 30.0 and after.source == "runtime"
    embedder_pb2_grpc.EmbedderServiceStub(envoy).Embed(embedder_pb2.EmbedRequest(text="hi"), timeout=10)
    set_treatment(admin, "embedder", 0)
    print(f"envoy SIGKILL: LIVE again after {back:.1f}s with treatment at 30%")


def test_a_store_crash_keeps_known_keys_answering_and_loses_no_acknowledged_write(chaos_mesh):
    mesh, status = chaos_mesh
    env = {**os.environ, "REDIS_URL": status["store"]["url"]}
    secret = create_key(status, "known")
    revoked_secret = create_key(status, "revoked")
    with rest_client(status, secret) as client, rest_client(status, revoked_secret) as revoked_client:
        assert embeddings(client).status_code == 200  # the gateways verify it while the store is up
        assert embeddings(revoked_client).status_code == 200
        assert run_cli(env, "keys", "revoke", SECRET.search(revoked_secret).group(1)).returncode == 0
        written = [create_key(status, f"last-{i}") for i in range(5)]  # acknowledged just before the crash

        def known_key_answers() -> None:
            answer = embeddings(client)
            assert answer.status_code == 200, f"{answer.status_code} {answer.text[:200]}"

        victim = mesh.status()["store"]["pid"]
        with Load(known_key_answers, clients=4) as load:
            os.kill(victim, signal.SIGKILL)
            back = wait_for(replaced(mesh, "store", victim), 30, "store back")
        assert load.failures == [] and load.outcomes["ok"] > 20, collections.Counter(
            load.failures
        ).most_common(3)
        assert embeddings(revoked_client).status_code == 401  # revoked before the crash, still revoked
    listed = run_cli(env, "keys", "list")
    assert listed.returncode == 0, listed.stderr
    for secret_text in written:
        assert SECRET.search(secret_text).group(1) in listed.stdout
    print(
        f"store SIGKILL: {load.outcomes['ok']} REST calls with a known key, 0 failed; back after {back:.1f}s"
    )


def embeddings(client: httpx.Client) -> httpx.Response:
    return client.post("/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": "What is an APR?"})


def create_key(status: dict, name: str) -> str:
    env = {**os.environ, "REDIS_URL": status["store"]["url"]}
    result = run_cli(env, "keys", "create", "--name", name, "--requests-per-minute", "100000")
    assert result.returncode == 0, result.stderr
    return SECRET.search(result.stdout).group(0)


def llm_running(mesh: Mesh) -> float:
    text = httpx.get(f"http://{mesh.status()['llm']['metrics']}/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("tiermesh_llm_requests_running{")
    )


def engine_cores() -> int:
    """vLLM engine processes alive on this machine (an orphan would hold its memory)."""
    count = 0
    for proc in Path("/proc").iterdir():
        try:
            count += proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(b"VLLM::EngineCore")
        except OSError:
            continue
    return count


def test_up_on_a_partly_dead_mesh_starts_only_what_is_missing(chaos_mesh):
    mesh, _ = chaos_mesh
    state = mesh.state()
    before = {name: entry.get("pid") for name, entry in mesh.status().items()}
    os.killpg(state["embedder-2"]["pid"], signal.SIGKILL)  # the supervisor and its embedder
    wait_for(lambda: mesh.status()["embedder-2"]["health"] == "EXITED", 10, "embedder-2 reported EXITED")
    assert mesh.missing() == ["embedder-2"]
    said: list[str] = []
    mesh.up(tiers=only("embedder", "retriever", "llm", "gateway"), progress=said.append)
    assert said[0] == "the mesh is running without embedder-2: starting them"
    after = mesh.status()
    assert after["embedder-2"]["health"] == "SERVING" and after["embedder-2"]["pid"] != before["embedder-2"]
    assert {n: e.get("pid") for n, e in after.items() if n != "embedder-2"} == {
        n: pid for n, pid in before.items() if n != "embedder-2"
    }
