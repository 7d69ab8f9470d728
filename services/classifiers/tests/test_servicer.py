"""ClassifiersService through its gRPC interface, served in-process on a free port."""

import asyncio
import math
import shutil

import grpc
import pytest
from google.protobuf import timestamp_pb2
from grpc_health.v1 import health_pb2
from prometheus_client import REGISTRY

from services.classifiers import credit
from services.classifiers.config import ClassifiersConfig
from services.classifiers.servicer import ClassifiersTier
from tiermesh.classifiers.v1 import classifiers_pb2 as pb
from tiermesh.classifiers.v1 import classifiers_pb2_grpc
from tiermesh.kit.registry import METADATA
from tiermesh.kit.testing import health_while, scratch_registry, serving_in_process, tier_config

pytestmark = pytest.mark.asyncio(loop_scope="session")

APPLICATION = dict(
    annual_income=72_000, loan_amount=15_000, term_months=36, debt_to_income=0.22, credit_score=720,
    employment_years=6, delinquencies_2y=0, credit_utilization=0.25, open_accounts=7,
)  # fmt: skip
MIDNIGHT_UTC = 1_700_000_000 - 1_700_000_000 % 86_400


def scoring(top_n: int = 0, **changes) -> pb.ScoreCreditRiskRequest:
    fields = {key: value for key, value in {**APPLICATION, **changes}.items() if value is not None}
    return pb.ScoreCreditRiskRequest(application=pb.CreditApplication(**fields), top_n=top_n)


def detecting(hour: int = 12, **changes) -> pb.DetectAnomalyRequest:
    fields = {
        "amount": 42.5,
        "merchant": "Kroger",
        "category": "groceries",
        "customer_usual_amount": 45.0,
        "transactions_last_24h": 2,
        "transaction_time": timestamp_pb2.Timestamp(seconds=MIDNIGHT_UTC + hour * 3600),
    }
    fields.update(changes)
    return pb.DetectAnomalyRequest(
        transaction=pb.Transaction(**{k: v for k, v in fields.items() if v is not None})
    )


@pytest.fixture
def registry(tmp_path, classifier_models, embedding_model):
    return scratch_registry(tmp_path / "models", embedding_model, *classifier_models.values())


def config(**values) -> ClassifiersConfig:
    return tier_config(ClassifiersConfig, **{"check_interval_s": 0.05, **values})


async def call(server, method: str, request):
    async with grpc.aio.insecure_channel(server.address) as channel:
        return await getattr(classifiers_pb2_grpc.ClassifiersServiceStub(channel), method)(
            request, timeout=10
        )


async def test_every_rpc_answers_with_the_version_that_answered(registry, classifier_models):
    settings = config()
    async with serving_in_process(ClassifiersTier(settings, registry=registry), settings) as server:
        question = pb.ClassifyIntentRequest(text="How do I refinance my mortgage?")
        found = await call(server, "ClassifyIntent", question)
        assert found.intent.label == "refinancing" and found.intent.threshold == pytest.approx(0.4)
        assert found.model.version == classifier_models["intent"].version
        assert found.model.digest == classifier_models["intent"].digest

        text = "Charged $1.2k at Walmart on card 4111111111111111"
        entities = (await call(server, "ExtractEntities", pb.ExtractEntitiesRequest(text=text))).entities
        assert [(e.label, e.text, text[e.start : e.end]) for e in entities] == [
            (pb.ENTITY_LABEL_MONEY, "$1.2k", "$1.2k"),
            (pb.ENTITY_LABEL_MERCHANT, "Walmart", "Walmart"),
            (pb.ENTITY_LABEL_ACCOUNT, "************1111", "4111111111111111"),
        ]
        assert (entities[0].money.amount, entities[0].money.currency_code) == (1200.0, "USD")
        assert not entities[1].HasField("money")

        risk = await call(server, "ScoreCreditRisk", scoring(top_n=3))
        assert 0 < risk.default_probability < 1 and risk.risk_band != pb.RISK_BAND_UNSPECIFIED
        assert len(risk.contributions) == 3 and risk.model.name == "credit-risk"
        everything = await call(server, "ScoreCreditRisk", scoring())
        log_odds = everything.base_value + sum(c.contribution for c in everything.contributions)
        assert len(everything.contributions) == len(credit.FEATURES)
        assert 1 / (1 + math.exp(-log_odds)) == pytest.approx(everything.default_probability, rel=1e-5)

        normal = await call(server, "DetectAnomaly", detecting())
        odd = await call(
            server,
            "DetectAnomaly",
            detecting(hour=3, amount=8_000, category="electronics", transactions_last_24h=30),
        )
        assert not normal.is_anomaly and odd.is_anomaly
        assert odd.anomaly_score > odd.threshold > normal.anomaly_score

        for version in classifier_models.values():
            labels = {"tier": "classifiers", "name": version.name, "version": version.version}
            assert REGISTRY.get_sample_value("tiermesh_model_info", {**labels, "digest": version.digest}) == 1


BAD_REQUESTS = [
    ("ClassifyIntent", pb.ClassifyIntentRequest(text="   "), "text"),
    ("ClassifyIntent", pb.ClassifyIntentRequest(text="x" * 5000), "text"),
    ("ClassifyIntent", pb.ClassifyIntentRequest(text="hi", model_version="7.0.0"), "model_version"),
    ("ExtractEntities", pb.ExtractEntitiesRequest(text=""), "text"),
    ("ScoreCreditRisk", pb.ScoreCreditRiskRequest(), "application"),
    ("ScoreCreditRisk", scoring(credit_score=900), "application.credit_score"),
    ("ScoreCreditRisk", scoring(term_months=0), "application.term_months"),
    ("ScoreCreditRisk", scoring(annual_income=-5), "application.annual_income"),
    ("ScoreCreditRisk", scoring(debt_to_income=float("nan")), "application.debt_to_income"),
    ("ScoreCreditRisk", scoring(open_accounts=None), "application.open_accounts"),
    ("ScoreCreditRisk", scoring(top_n=-1), "top_n"),
    ("DetectAnomaly", pb.DetectAnomalyRequest(), "transaction"),
    ("DetectAnomaly", detecting(amount=-3), "transaction.amount"),
    ("DetectAnomaly", detecting(amount=float("inf")), "transaction.amount"),
    ("DetectAnomaly", detecting(category="yachts"), "transaction.category"),
    ("DetectAnomaly", detecting(customer_usual_amount=0), "transaction.customer_usual_amount"),
    ("DetectAnomaly", detecting(transaction_time=None), "transaction.transaction_time"),
]


async def test_bad_input_is_invalid_argument_naming_the_field_and_the_tier_keeps_serving(registry):
    settings = config()
    async with serving_in_process(ClassifiersTier(settings, registry=registry), settings) as server:
        for method, request, field in BAD_REQUESTS:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call(server, method, request)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, field)
            assert caught.value.details().startswith(field), (caught.value.details(), field)
        found = await call(
            server, "ClassifyIntent", pb.ClassifyIntentRequest(text="What documents do I need?")
        )
        assert found.intent.label == "required_documents"


async def test_publishes_swap_models_live_and_a_broken_version_keeps_the_old_one(registry, classifier_models):
    settings = config()
    current = classifier_models["credit"]

    def publish(version: str, *, corrupt: bool) -> None:
        staging = registry.root / f"staging-{version}"
        shutil.copytree(current.path, staging, ignore=shutil.ignore_patterns(METADATA))
        if corrupt:
            (staging / credit.MODEL_FILE).write_text("{}")  # a model file XGBoost cannot read
        registry.publish(current.name, staging, version=version, parameters=current.metadata["parameters"])

    async with serving_in_process(ClassifiersTier(settings, registry=registry), settings) as server:
        before = await call(server, "ScoreCreditRisk", scoring())
        publish("1.0.7", corrupt=True)
        await asyncio.sleep(0.5)  # many periodic checks: the load fails, the old model serves on
        assert (await call(server, "ScoreCreditRisk", scoring())).model.version == current.version

        publish("1.0.8", corrupt=False)
        async with asyncio.timeout(10):
            while (after := await call(server, "ScoreCreditRisk", scoring())).model.version != "1.0.8":
                await asyncio.sleep(0.05)
        assert after.default_probability == pytest.approx(before.default_probability)
        pinned = scoring()
        pinned.model_version = current.version
        with pytest.raises(grpc.aio.AioRpcError, match=r"this replica serves credit-risk 1\.0\.8"):
            await call(server, "ScoreCreditRisk", pinned)


async def test_health_checks_answer_while_long_runs_are_searched_for_entities(registry):
    digits = "Can I borrow " + "9" * 2_000 + "?"  # ~1 s holding the GIL before
    spaces = "My account" + " " * 2_000 + "is overdrawn"  # ~50 s holding the GIL before
    settings = config()
    async with (
        serving_in_process(ClassifiersTier(settings, registry=registry), settings) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = classifiers_pb2_grpc.ClassifiersServiceStub(channel)
        calls = [
            asyncio.ensure_future(stub.ExtractEntities(pb.ExtractEntitiesRequest(text=text), timeout=60))
            for text in (digits, spaces, digits, spaces)
        ]
        statuses = await health_while(channel, ClassifiersTier.service_names[0], calls)
        answers = await asyncio.gather(*calls)
    assert set(statuses) == {health_pb2.HealthCheckResponse.SERVING}
    rules = (pb.ENTITY_LABEL_MONEY, pb.ENTITY_LABEL_ACCOUNT)
    assert all(not any(e.label in rules for e in answer.entities) for answer in answers)
