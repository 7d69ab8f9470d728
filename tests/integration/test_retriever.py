"""The retriever in a real mesh: answers through Envoy, hot swap and rollback under load, refusals."""

import json
import os
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest

from services.retriever import corpus, manage
from tiermesh.control.testing import running_mesh
from tiermesh.kit.hotswap import announce
from tiermesh.kit.registry import Registry
from tiermesh.kit.testing import run_cli, scratch_registry
from tiermesh.kit.topology import only
from tiermesh.retriever.v1 import retriever_pb2, retriever_pb2_grpc

pytestmark = pytest.mark.integration
QUESTIONS = [json.loads(line) for line in corpus.DEFAULT_QUESTIONS.read_text().splitlines() if line.strip()]


def stub_for(address: str) -> tuple[grpc.Channel, retriever_pb2_grpc.RetrieverServiceStub]:
    channel = grpc.insecure_channel(address)
    return channel, retriever_pb2_grpc.RetrieverServiceStub(channel)


def test_questions_through_envoy_find_their_passage(mesh, knowledge_index):
    _, status = mesh
    channel, stub = stub_for(status["envoy"]["grpc"])
    with channel:
        ranks = []
        for item in QUESTIONS:
            response = stub.Search(retriever_pb2.SearchRequest(text=item["question"], k=5), timeout=10)
            assert response.model.version == knowledge_index.version
            docs = [p.doc_id for p in response.passages]
            ranks.append(docs.index(item["doc_id"]) + 1 if item["doc_id"] in docs else None)
        canonical = stub.Search(
            retriever_pb2.SearchRequest(
                text="Can my lender charge me for paying off my car loan early?", k=1
            ),
            timeout=10,
        ).passages[0]
    found = [rank for rank in ranks if rank is not None]
    # MiniLM on the shipped questions (paraphrased, 184 of them): ~65% top-1, ~90% top-5.
    assert len(found) / len(ranks) >= 0.85 and found.count(1) / len(ranks) >= 0.55
    assert canonical.metadata["topic"] in ("auto-loans", "fees-prepayment") and canonical.text


def test_filters_and_bad_input_through_envoy(mesh):
    _, status = mesh
    channel, stub = stub_for(status["envoy"]["grpc"])
    with channel:
        response = stub.Search(
            retriever_pb2.SearchRequest(
                text="How is APR different from the rate?", metadata_filter={"topic": "fair-lending"}
            ),
            timeout=10,
        )
        assert response.passages and {p.metadata["topic"] for p in response.passages} == {"fair-lending"}
        with pytest.raises(grpc.RpcError) as raised:
            stub.Search(
                retriever_pb2.SearchRequest(vector=retriever_pb2.QueryVector(values=[0.5] * 12)), timeout=10
            )
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "vector.values: has 12 values; the index dimension is 384" in raised.value.details()


def test_metrics_describe_the_serving_index(mesh, knowledge_index):
    _, status = mesh
    stub_for(status["envoy"]["grpc"])[1].Search(retriever_pb2.SearchRequest(text="What is APR?"), timeout=10)
    texts = []
    for name in ("retriever", "retriever-2"):
        with urllib.request.urlopen(f"http://{status[name]['metrics']}/metrics", timeout=5) as response:
            texts.append(text := response.read().decode())
        count = knowledge_index.metadata["parameters"]["count"]
        assert f'tiermesh_retriever_vectors{{index="loan-kb"}} {count:.1f}' in text
        assert 'tiermesh_retriever_index_memory_bytes{index="loan-kb"}' in text
        assert f'version="{knowledge_index.version}"' in text and "tiermesh_model_info{" in text
        assert "tiermesh_model_swaps_total" in text
    assert any('tiermesh_retriever_search_seconds_count{index="loan-kb",kind="flat"}' in t for t in texts)


# -- hot swap ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swap_registry(tmp_path_factory, embedding_model):
    """A registry of its own with two live-able versions of the knowledge base (flat, then IVF)."""
    registry = scratch_registry(tmp_path_factory.mktemp("swap") / "models", embedding_model)
    first = manage.build(registry, kind="flat")
    second = manage.build(registry, kind="ivf", nlist=4, nprobe=4)
    registry.set_latest(manage.INDEX_NAME, first.version)
    return registry, first.version, second.version


class Load:
    """Client threads searching through Envoy until stopped, recording every outcome."""

    def __init__(self, target: str, vectors: np.ndarray, clients: int = 4) -> None:
        self.target, self.vectors = target, vectors
        self.failures: list[str] = []
        self.versions: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def _run(self, client: int) -> None:
        channel, stub = stub_for(self.target)
        with channel:
            step = 0
            while not self._stop.is_set():
                step += 1
                if (client + step) % 3:
                    vector = self.vectors[(client * 7 + step) % len(self.vectors)]
                    request = retriever_pb2.SearchRequest(
                        vector=retriever_pb2.QueryVector(values=vector.tolist())
                    )
                else:  # every third call goes through the embedder as well
                    request = retriever_pb2.SearchRequest(text=QUESTIONS[step % len(QUESTIONS)]["question"])
                try:
                    response = stub.Search(request, timeout=10)
                    self.versions.append((time.monotonic(), response.model.version))
                except grpc.RpcError as error:
                    self.failures.append(f"{error.code().name}: {error.details()}")

    def __enter__(self) -> "Load":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


def serving(status: dict, name: str) -> str:
    channel, stub = stub_for(status[name]["grpc"])
    with channel:
        return stub.GetIndexInfo(retriever_pb2.GetIndexInfoRequest(), timeout=5).model.version


def wait_for_replicas(status: dict, version: str, timeout: float = 20.0) -> float:
    started = time.monotonic()
    while any(serving(status, name) != version for name in ("retriever", "retriever-2")):
        assert time.monotonic() - started < timeout, f"replicas did not all switch to {version}"
        time.sleep(0.01)
    return time.monotonic() - started


@pytest.mark.slow
def test_publish_and_rollback_under_load_fail_no_request(tmp_path, swap_registry, embedding_model):
    registry, first, second = swap_registry
    # A long periodic check: the switch must come from the announcement on the store.
    with running_mesh(
        tmp_path,
        tiers=only("embedder", "retriever"),
        TIERMESH_MODELS=str(registry.root),
        RETRIEVER_REPLICAS="2",
        RETRIEVER_CHECK_INTERVAL_S="600",
    ) as (mesh, status):
        env = {**mesh.environ, "REDIS_URL": status["store"]["url"]}
        vectors = manage.embed_texts([q["question"] for q in QUESTIONS[:20]], embedding_model)
        assert serving(status, "retriever") == serving(status, "retriever-2") == first
        with Load(status["envoy"]["grpc"], vectors) as load:
            time.sleep(1.0)
            published = run_cli(env, "index", "publish", second)
            assert published.returncode == 0, published.stderr
            assert "announced to 2 replica(s)" in published.stdout
            wait_for_replicas(status, second)
            time.sleep(1.0)
            rolled_back = run_cli(env, "index", "rollback")
            assert rolled_back.returncode == 0 and f"latest -> {first}" in rolled_back.stdout
            wait_for_replicas(status, first)
            time.sleep(1.0)
        assert load.failures == []
        seen = [version for _, version in load.versions]
        assert len(seen) > 50 and seen[0] == first and second in seen and seen[-1] == first

        # A version that is corrupt on disk is refused by every replica; the old one keeps serving.
        broken = manage.build(registry, kind="ivf", nlist=2, nprobe=2)
        index_file = broken.path / "index.faiss"
        index_file.write_bytes(index_file.read_bytes()[:-64])
        registry.set_latest(manage.INDEX_NAME, broken.version)
        assert announce(status["store"]["url"], broken) == 2
        logs = [tmp_path / "run" / "logs" / f"{name}.log" for name in ("retriever", "retriever-2")]
        deadline = time.monotonic() + 20
        while not all(f"refused loan-kb {broken.version}" in log.read_text() for log in logs):
            assert time.monotonic() < deadline, "replicas did not report the refused version"
            time.sleep(0.05)
        assert serving(status, "retriever") == serving(status, "retriever-2") == first
        channel, stub = stub_for(status["envoy"]["grpc"])
        with channel:
            assert stub.Search(retriever_pb2.SearchRequest(text="What is APR?"), timeout=10).passages
        line = next(line for line in logs[0].read_text().splitlines() if "refused" in line)
        assert "truncated or replaced" in json.loads(line)["msg"]


# -- the CLI's gates -------------------------------------------------------------------------------


def scratch_env(tmp_path, registry: Registry) -> dict[str, str]:
    return {
        **os.environ,
        "TIERMESH_MODELS": str(registry.root),
        "TIERMESH_HOME": str(tmp_path),
        "REDIS_URL": "",
    }


def test_validation_blocks_a_bad_index_and_publish_refuses_it(tmp_path, embedding_model):
    registry = scratch_registry(tmp_path / "models", embedding_model)
    env = scratch_env(tmp_path, registry)
    build = run_cli(env, "index", "build", "--kind", "ivf", "--nlist", "150", "--nprobe", "1")
    assert build.returncode == 0, build.stderr
    version = build.stdout.split()[1].rstrip(":")
    validate = run_cli(env, "index", "validate", version)
    assert validate.returncode == 1 and "below threshold" in validate.stdout
    refused = run_cli(env, "index", "publish", version)
    assert (
        refused.returncode == 1
        and "is below 0.95" in refused.stderr
        and "--allow-low-recall" in refused.stderr
    )
    assert registry.latest(manage.INDEX_NAME) is None
    forced = run_cli(env, "index", "publish", version, "--allow-low-recall")
    assert forced.returncode == 0 and "publishing anyway" in forced.stdout
    assert registry.latest(manage.INDEX_NAME).version == version


def test_publish_refuses_an_index_built_with_another_embedder_version(tmp_path, embedding_model):
    registry = scratch_registry(tmp_path / "models", embedding_model)
    env = scratch_env(tmp_path, registry)
    build = run_cli(env, "index", "build")
    assert build.returncode == 0, build.stderr
    version = build.stdout.split()[1].rstrip(":")
    stand_in = tmp_path / "retrained"
    stand_in.mkdir()
    (stand_in / "model.onnx").write_bytes(b"another model")
    registry.publish(embedding_model.name, stand_in, version="9.0.0", make_latest=False)
    refused = run_cli({**env, "EMBEDDER_MODEL_VERSION": "9.0.0"}, "index", "publish", version)
    assert refused.returncode == 1
    assert f"built with embedder {embedding_model.version} but the mesh serves 9.0.0" in refused.stderr
    assert registry.latest(manage.INDEX_NAME) is None
