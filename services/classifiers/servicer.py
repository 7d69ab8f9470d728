"""The classifiers' gRPC protocol: request validation, the four hot-swappable models, protos."""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
import numpy as np

from services.classifiers.anomaly import AnomalyModel
from services.classifiers.config import MODELS, ClassifiersConfig
from services.classifiers.credit import CreditModel
from services.classifiers.intent import IntentModel
from services.classifiers.ner import EntityModel
from tiermesh.classifiers.v1 import classifiers_pb2, classifiers_pb2_grpc
from tiermesh.common.v1 import common_pb2
from tiermesh.kit.errors import InvalidArgument, check_text
from tiermesh.kit.hotswap import Follower, ModelSlot
from tiermesh.kit.registry import LATEST, ModelVersion, Registry

T = TypeVar("T")
# Which model answers which RPC (for metrics, spans and the `model_version` check).
METHOD_MODELS = {
    "ClassifyIntent": "intent",
    "ExtractEntities": "ner",
    "ScoreCreditRisk": "credit",
    "DetectAnomaly": "anomaly",
}
# Every CreditApplication field with its accepted range (low, high, is the low bound exclusive).
CREDIT_RANGES: dict[str, tuple[float, float, bool]] = {
    "annual_income": (0, 1e9, True),
    "loan_amount": (0, 1e8, True),
    "term_months": (0, 600, True),
    "debt_to_income": (0, 10, False),
    "credit_score": (300, 850, False),
    "employment_years": (0, 80, False),
    "delinquencies_2y": (0, 1000, False),
    "credit_utilization": (0, 10, False),
    "open_accounts": (0, 1000, False),
}
_MAX_AMOUNT = 1e9


def _info(version: ModelVersion) -> common_pb2.ModelInfo:
    return common_pb2.ModelInfo(name=version.name, version=version.version, digest=version.digest)


class ClassifiersTier(classifiers_pb2_grpc.ClassifiersServiceServicer):
    """ClassifiersService over four independently versioned, hot-swappable models."""

    name = "classifiers"
    service_names = (classifiers_pb2.DESCRIPTOR.services_by_name["ClassifiersService"].full_name,)

    def __init__(self, config: ClassifiersConfig, *, registry: Registry | None = None) -> None:
        self.config = config
        self.registry = registry or Registry()
        openers: dict[str, Callable[[ModelVersion], Any]] = {
            "intent": lambda version: IntentModel(version, self.registry, threads=config.threads),
            "ner": EntityModel,
            "credit": CreditModel,
            "anomaly": AnomalyModel,
        }
        self.slots: dict[str, ModelSlot[Any]] = {
            kind: ModelSlot(self.name, MODELS[kind], opener) for kind, opener in openers.items()
        }
        self.followers: list[Follower] = []
        self._pool = concurrent.futures.ThreadPoolExecutor(config.workers, thread_name_prefix="classify")

    # -- what is served (tiermesh.kit.server.Tier) ---------------------------------------------------

    @property
    def models(self) -> list[common_pb2.ModelInfo]:
        return [self._model(kind) for kind in self.slots]

    @property
    def model(self) -> common_pb2.ModelInfo:
        return self._model("intent")

    def model_for(self, method: str) -> common_pb2.ModelInfo:
        kind = METHOD_MODELS.get(method.rsplit("/", 1)[-1])
        return self._model(kind) if kind else common_pb2.ModelInfo()

    def _model(self, kind: str) -> common_pb2.ModelInfo:
        loaded = self.slots[kind].current
        return _info(loaded.version) if loaded else common_pb2.ModelInfo()

    # -- lifecycle -------------------------------------------------------------------------------

    def register(self, server: grpc.aio.Server) -> None:
        classifiers_pb2_grpc.add_ClassifiersServiceServicer_to_server(self, server)

    async def start(self) -> None:
        for kind, slot in self.slots.items():
            wanted = self.config.version_of(kind)
            await slot.load(self.registry.get(slot.name, wanted))
            if wanted == LATEST:
                follower = Follower(
                    tier=self.name,
                    name=slot.name,
                    registry=self.registry,
                    store_url=self.config.store_url,
                    serving=slot.serving_version,
                    load=slot.load,
                    check_interval_s=self.config.check_interval_s,
                )
                follower.start(listen=bool(self.config.store_url))
                self.followers.append(follower)

    async def stop(self) -> None:
        for follower in self.followers:
            await follower.stop()
        self._pool.shutdown(wait=True)
        for slot in self.slots.values():
            slot.close()

    # -- RPCs ------------------------------------------------------------------------------------

    async def ClassifyIntent(self, request: classifiers_pb2.ClassifyIntentRequest, context: Any):
        model: IntentModel = self.slots["intent"].serving(request.model_version, self.registry)
        check_text(request.text, "text", max_chars=self.config.max_text_chars)
        threshold = self.config.intent_threshold if self.config.intent_threshold >= 0 else None
        (found,) = await self._run(lambda: model.classify([request.text], threshold))
        return classifiers_pb2.ClassifyIntentResponse(
            intent=classifiers_pb2.Intent(
                label=found.label,
                probability=found.probability,
                candidates=[
                    classifiers_pb2.IntentCandidate(label=label, probability=probability)
                    for label, probability in found.candidates
                ],
                low_confidence=found.low_confidence,
                threshold=found.threshold,
            ),
            model=_info(model.version),
        )

    async def ExtractEntities(self, request: classifiers_pb2.ExtractEntitiesRequest, context: Any):
        model: EntityModel = self.slots["ner"].serving(request.model_version, self.registry)
        check_text(request.text, "text", max_chars=self.config.max_text_chars)
        entities = await self._run(lambda: model.extract(request.text, currency=self.config.currency))
        return classifiers_pb2.ExtractEntitiesResponse(
            entities=[
                classifiers_pb2.Entity(
                    label=classifiers_pb2.EntityLabel.Value(f"ENTITY_LABEL_{entity.label}"),
                    text=entity.text,
                    start=entity.start,
                    end=entity.end,
                    money=(
                        classifiers_pb2.MoneyAmount(amount=entity.amount, currency_code=entity.currency)
                        if entity.amount is not None
                        else None
                    ),
                )
                for entity in entities
            ],
            model=_info(model.version),
        )

    async def ScoreCreditRisk(self, request: classifiers_pb2.ScoreCreditRiskRequest, context: Any):
        model: CreditModel = self.slots["credit"].serving(request.model_version, self.registry)
        if not request.HasField("application"):
            raise InvalidArgument("application", "is required")
        row = np.array([[self._credit_feature(request.application, name) for name in model.features]])
        if request.top_n < 0:
            raise InvalidArgument("top_n", f"must be 0 (all) or more, got {request.top_n}")
        (score,) = await self._run(lambda: model.score(row))
        contributions = score.contributions[: request.top_n or None]
        return classifiers_pb2.ScoreCreditRiskResponse(
            default_probability=score.default_probability,
            risk_band=classifiers_pb2.RiskBand.Value(f"RISK_BAND_{score.band}"),
            contributions=[
                classifiers_pb2.FeatureContribution(
                    feature=c.feature, value=c.value, contribution=c.contribution
                )
                for c in contributions
            ],
            base_value=score.base_value,
            model=_info(model.version),
        )

    async def DetectAnomaly(self, request: classifiers_pb2.DetectAnomalyRequest, context: Any):
        model: AnomalyModel = self.slots["anomaly"].serving(request.model_version, self.registry)
        if not request.HasField("transaction"):
            raise InvalidArgument("transaction", "is required")
        transaction = request.transaction
        amount = self._finite(transaction.amount, "transaction.amount")
        if not 0 <= amount <= _MAX_AMOUNT:
            raise InvalidArgument(
                "transaction.amount", f"must be between 0 and {_MAX_AMOUNT:.0f}, got {amount}"
            )
        usual = self._finite(transaction.customer_usual_amount, "transaction.customer_usual_amount")
        if not 0 < usual <= _MAX_AMOUNT:
            raise InvalidArgument(
                "transaction.customer_usual_amount",
                f"must be above 0 and at most {_MAX_AMOUNT:.0f}, got {usual}",
            )
        if transaction.transactions_last_24h < 0:
            raise InvalidArgument(
                "transaction.transactions_last_24h",
                f"must be 0 or more, got {transaction.transactions_last_24h}",
            )
        if transaction.category not in model.categories:
            raise InvalidArgument(
                "transaction.category",
                f"unknown category {transaction.category[:40]!r}; accepted: {', '.join(model.categories)}",
            )
        if not transaction.HasField("transaction_time"):
            raise InvalidArgument("transaction.transaction_time", "is required (its UTC hour is a feature)")
        try:
            hour = transaction.transaction_time.ToDatetime().hour
        except (ValueError, OverflowError):
            raise InvalidArgument("transaction.transaction_time", "is not a valid timestamp") from None
        found = await self._run(
            lambda: model.score(amount, hour, transaction.category, usual, transaction.transactions_last_24h)
        )
        return classifiers_pb2.DetectAnomalyResponse(
            anomaly_score=found.score,
            threshold=model.threshold,
            is_anomaly=found.is_anomaly,
            model=_info(model.version),
        )

    # -- helpers ---------------------------------------------------------------------------------

    async def _run(self, call: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    @staticmethod
    def _finite(value: float, field: str) -> float:
        if not math.isfinite(value):
            raise InvalidArgument(field, f"must be a finite number, got {value}")
        return value

    @classmethod
    def _credit_feature(cls, application: classifiers_pb2.CreditApplication, name: str) -> float:
        field = f"application.{name}"
        low, high, exclusive = CREDIT_RANGES[name]
        accepted = f"{'above' if exclusive else 'at least'} {low:g} and at most {high:g}"
        if not application.HasField(name):
            raise InvalidArgument(field, f"is required ({accepted})")
        value = cls._finite(float(getattr(application, name)), field)
        if value < low or (exclusive and value == low) or value > high:
            raise InvalidArgument(field, f"must be {accepted}, got {value:g}")
        return value
