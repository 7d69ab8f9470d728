"""The classifiers tier as a real process behind Envoy: the four RPCs, training and publishing
through the CLI, and version switches under concurrent traffic."""

import os
import threading
import time

import grpc
import pytest
from google.protobuf import timestamp_pb2

from tiermesh.classifiers.v1 import classifiers_pb2 as pb
from tiermesh.classifiers.v1 import classifiers_pb2_grpc
from tiermesh.control.testing import running_mesh
from tiermesh.kit.testing import run_cli, scratch_registry
from tiermesh.kit.topology import only

pytestmark = pytest.mark.integration

APPLICATION = pb.CreditApplication(
    annual_income=54_000, loan_amount=20_000, term_months=60, debt_to_income=0.41, credit_score=640,
    employment_years=2, delinquencies_2y=1, credit_utilization=0.7, open_accounts=5,
)  # fmt: skip
AFTERNOON_UTC = timestamp_pb2.Timestamp(seconds=1_700_000_000 - 1_700_000_000 % 86_400 + 15 * 3600)
TRANSACTION = pb.Transaction(
    amount=61.2, merchant="Safeway", category="groceries", customer_usual_amount=55.0,
    transactions_last_24h=1, transaction_time=AFTERNOON_UTC,
)  # fmt: skip
CALLS = (
    ("ClassifyIntent", pb.ClassifyIntentRequest(text="Is there a penalty if I pay my loan off early?")),
    ("ExtractEntities", pb.ExtractEntitiesRequest(text="I owe $12,500 to Capital One since March 2024")),
    ("ScoreCreditRisk", pb.ScoreCreditRiskRequest(application=APPLICATION, top_n=3)),
    ("DetectAnomaly", pb.DetectAnomalyRequest(transaction=TRANSACTION)),
)


def stub_for(target: str):
    channel = grpc.insecure_channel(target)
    return channel, classifiers_pb2_grpc.ClassifiersServiceStub(channel)


def test_the_four_rpcs_through_envoy(mesh, classifier_models):
    _, status = mesh
    channel, stub = stub_for(status["envoy"]["grpc"])
    with channel:
        intent = stub.ClassifyIntent(CALLS[0][1], timeout=10)
        assert intent.intent.label == "fees_and_penalties" and intent.model.name == "loan-intent"
        entities = stub.ExtractEntities(CALLS[1][1], timeout=10).entities
        assert [(pb.EntityLabel.Name(e.label), e.text) for e in entities] == [
            ("ENTITY_LABEL_MONEY", "$12,500"),
            ("ENTITY_LABEL_ORG", "Capital One"),
            ("ENTITY_LABEL_DATE", "March 2024"),
        ]
        risk = stub.ScoreCreditRisk(CALLS[2][1], timeout=10)
        assert len(risk.contributions) == 3 and risk.model.version == classifier_models["credit"].version
        anomaly = stub.DetectAnomaly(CALLS[3][1], timeout=10)
        assert not anomaly.is_anomaly and anomaly.model.version == classifier_models["anomaly"].version
        with pytest.raises(grpc.RpcError) as caught:
            stub.ScoreCreditRisk(pb.ScoreCreditRiskRequest(application=pb.CreditApplication()), timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details().startswith("application.annual_income: is required")


class Load:
    """Client threads calling all four RPCs through Envoy until stopped, recording every outcome."""

    def __init__(self, target: str, clients: int = 4) -> None:
        self.target = target
        self.failures: list[str] = []
        self.anomaly_versions: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def _run(self, client: int) -> None:
        channel, stub = stub_for(self.target)
        with channel:
            step = client
            while not self._stop.is_set():
                method, request = CALLS[step % len(CALLS)]
                step += 1
                try:
                    response = getattr(stub, method)(request, timeout=10)
                except grpc.RpcError as error:
                    self.failures.append(f"{method}: {error.code().name} {error.details()}")
                    continue
                if method == "DetectAnomaly":
                    self.anomaly_versions.append(response.model.version)

    def __enter__(self) -> "Load":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


def serving_anomaly(status: dict, name: str) -> str:
    channel, stub = stub_for(status[name]["grpc"])
    with channel:
        return stub.DetectAnomaly(CALLS[3][1], timeout=5).model.version


@pytest.mark.slow
def test_train_then_publish_and_rollback_under_load_fail_no_call(
    tmp_path, classifier_models, embedding_model
):
    registry = scratch_registry(tmp_path / "models", embedding_model, *classifier_models.values())
    first = classifier_models["anomaly"].version
    # A long periodic check: the switch must come from the announcement on the store.
    with running_mesh(
        tmp_path / "home",
        tiers=only("classifiers"),
        TIERMESH_MODELS=str(registry.root),
        CLASSIFIERS_REPLICAS="2",
        CLASSIFIERS_CHECK_INTERVAL_S="600",
    ) as (mesh, status):
        env = {**mesh.environ, "REDIS_URL": status["store"]["url"]}
        trained = run_cli(env, "train", "anomaly", "--seed", "12", "--changelog", "retrained with seed 12")
        assert trained.returncode == 0, trained.stderr
        assert "detection rate" in trained.stdout and "not live yet" in trained.stdout
        second = registry.versions("transaction-anomaly")[-1]
        assert second.version != first and second.metadata["changelog"] == "retrained with seed 12"
        assert second.metadata["previous_version"] == first
        assert serving_anomaly(status, "classifiers") == first  # training alone changes nothing

        replicas = ("classifiers", "classifiers-2")
        with Load(status["envoy"]["grpc"]) as load:
            time.sleep(1.0)
            published = run_cli(env, "models", "publish", "transaction-anomaly", second.version)
            assert published.returncode == 0, published.stderr
            assert "announced to 2 replica(s)" in published.stdout
            wait_until(lambda: all(serving_anomaly(status, name) == second.version for name in replicas))
            time.sleep(1.0)
            rolled_back = run_cli(env, "models", "rollback", "transaction-anomaly")
            assert rolled_back.returncode == 0 and f"latest -> {first}" in rolled_back.stdout
            wait_until(lambda: all(serving_anomaly(status, name) == first for name in replicas))
            time.sleep(1.0)
        assert load.failures == []
        seen = load.anomaly_versions
        assert len(seen) > 20 and seen[0] == first and second.version in seen and seen[-1] == first

        refused = run_cli(env, "models", "publish", "loan-kb", "abc")
        assert refused.returncode != 0 and "index publish" in refused.stderr


def wait_until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_models_publish_refuses_an_unknown_version(tmp_path, classifier_models, embedding_model):
    registry = scratch_registry(tmp_path / "models", embedding_model, *classifier_models.values())
    env = {
        **os.environ,
        "TIERMESH_MODELS": str(registry.root),
        "TIERMESH_HOME": str(tmp_path),
        "REDIS_URL": "",
    }
    result = run_cli(env, "models", "publish", "loan-intent", "9.9.9")
    assert result.returncode != 0 and "no version '9.9.9'" in result.stderr
    assert registry.latest("loan-intent").version == classifier_models["intent"].version
