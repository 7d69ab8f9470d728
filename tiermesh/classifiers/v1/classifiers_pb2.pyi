import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from tiermesh.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EntityLabel(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENTITY_LABEL_UNSPECIFIED: _ClassVar[EntityLabel]
    ENTITY_LABEL_MONEY: _ClassVar[EntityLabel]
    ENTITY_LABEL_DATE: _ClassVar[EntityLabel]
    ENTITY_LABEL_CATEGORY: _ClassVar[EntityLabel]
    ENTITY_LABEL_MERCHANT: _ClassVar[EntityLabel]
    ENTITY_LABEL_ACCOUNT: _ClassVar[EntityLabel]
    ENTITY_LABEL_ORG: _ClassVar[EntityLabel]
    ENTITY_LABEL_PERSON: _ClassVar[EntityLabel]
    ENTITY_LABEL_PERCENT: _ClassVar[EntityLabel]
    ENTITY_LABEL_CARDINAL: _ClassVar[EntityLabel]

class RiskBand(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RISK_BAND_UNSPECIFIED: _ClassVar[RiskBand]
    RISK_BAND_LOW: _ClassVar[RiskBand]
    RISK_BAND_MEDIUM: _ClassVar[RiskBand]
    RISK_BAND_HIGH: _ClassVar[RiskBand]
    RISK_BAND_VERY_HIGH: _ClassVar[RiskBand]
ENTITY_LABEL_UNSPECIFIED: EntityLabel
ENTITY_LABEL_MONEY: EntityLabel
ENTITY_LABEL_DATE: EntityLabel
ENTITY_LABEL_CATEGORY: EntityLabel
ENTITY_LABEL_MERCHANT: EntityLabel
ENTITY_LABEL_ACCOUNT: EntityLabel
ENTITY_LABEL_ORG: EntityLabel
ENTITY_LABEL_PERSON: EntityLabel
ENTITY_LABEL_PERCENT: EntityLabel
ENTITY_LABEL_CARDINAL: EntityLabel
RISK_BAND_UNSPECIFIED: RiskBand
RISK_BAND_LOW: RiskBand
RISK_BAND_MEDIUM: RiskBand
RISK_BAND_HIGH: RiskBand
RISK_BAND_VERY_HIGH: RiskBand

class IntentCandidate(_message.Message):
    __slots__ = ("label", "probability")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    label: str
    probability: float
    def __init__(self, label: _Optional[str] = ..., probability: _Optional[float] = ...) -> None: ...

class Intent(_message.Message):
    __slots__ = ("label", "probability", "candidates", "low_confidence", "threshold")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    LOW_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    label: str
    probability: float
    candidates: _containers.RepeatedCompositeFieldContainer[IntentCandidate]
    low_confidence: bool
    threshold: float
    def __init__(self, label: _Optional[str] = ..., probability: _Optional[float] = ..., candidates: _Optional[_Iterable[_Union[IntentCandidate, _Mapping]]] = ..., low_confidence: _Optional[bool] = ..., threshold: _Optional[float] = ...) -> None: ...

class MoneyAmount(_message.Message):
    __slots__ = ("amount", "currency_code")
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_CODE_FIELD_NUMBER: _ClassVar[int]
    amount: float
    currency_code: str
    def __init__(self, amount: _Optional[float] = ..., currency_code: _Optional[str] = ...) -> None: ...

class Entity(_message.Message):
    __slots__ = ("label", "text", "start", "end", "money")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    MONEY_FIELD_NUMBER: _ClassVar[int]
    label: EntityLabel
    text: str
    start: int
    end: int
    money: MoneyAmount
    def __init__(self, label: _Optional[_Union[EntityLabel, str]] = ..., text: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., money: _Optional[_Union[MoneyAmount, _Mapping]] = ...) -> None: ...

class CreditApplication(_message.Message):
    __slots__ = ("annual_income", "loan_amount", "term_months", "debt_to_income", "credit_score", "employment_years", "delinquencies_2y", "credit_utilization", "open_accounts")
    ANNUAL_INCOME_FIELD_NUMBER: _ClassVar[int]
    LOAN_AMOUNT_FIELD_NUMBER: _ClassVar[int]
    TERM_MONTHS_FIELD_NUMBER: _ClassVar[int]
    DEBT_TO_INCOME_FIELD_NUMBER: _ClassVar[int]
    CREDIT_SCORE_FIELD_NUMBER: _ClassVar[int]
    EMPLOYMENT_YEARS_FIELD_NUMBER: _ClassVar[int]
    DELINQUENCIES_2Y_FIELD_NUMBER: _ClassVar[int]
    CREDIT_UTILIZATION_FIELD_NUMBER: _ClassVar[int]
    OPEN_ACCOUNTS_FIELD_NUMBER: _ClassVar[int]
    annual_income: float
    loan_amount: float
    term_months: int
    debt_to_income: float
    credit_score: int
    employment_years: float
    delinquencies_2y: int
    credit_utilization: float
    open_accounts: int
    def __init__(self, annual_income: _Optional[float] = ..., loan_amount: _Optional[float] = ..., term_months: _Optional[int] = ..., debt_to_income: _Optional[float] = ..., credit_score: _Optional[int] = ..., employment_years: _Optional[float] = ..., delinquencies_2y: _Optional[int] = ..., credit_utilization: _Optional[float] = ..., open_accounts: _Optional[int] = ...) -> None: ...

class FeatureContribution(_message.Message):
    __slots__ = ("feature", "value", "contribution")
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    feature: str
    value: float
    contribution: float
    def __init__(self, feature: _Optional[str] = ..., value: _Optional[float] = ..., contribution: _Optional[float] = ...) -> None: ...

class Transaction(_message.Message):
    __slots__ = ("amount", "merchant", "category", "transaction_time", "customer_usual_amount", "transactions_last_24h")
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    MERCHANT_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    TRANSACTION_TIME_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_USUAL_AMOUNT_FIELD_NUMBER: _ClassVar[int]
    TRANSACTIONS_LAST_24H_FIELD_NUMBER: _ClassVar[int]
    amount: float
    merchant: str
    category: str
    transaction_time: _timestamp_pb2.Timestamp
    customer_usual_amount: float
    transactions_last_24h: int
    def __init__(self, amount: _Optional[float] = ..., merchant: _Optional[str] = ..., category: _Optional[str] = ..., transaction_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., customer_usual_amount: _Optional[float] = ..., transactions_last_24h: _Optional[int] = ...) -> None: ...

class ClassifyIntentRequest(_message.Message):
    __slots__ = ("text", "model_version")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    text: str
    model_version: str
    def __init__(self, text: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class ClassifyIntentResponse(_message.Message):
    __slots__ = ("intent", "model")
    INTENT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    intent: Intent
    model: _common_pb2.ModelInfo
    def __init__(self, intent: _Optional[_Union[Intent, _Mapping]] = ..., model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ...) -> None: ...

class ExtractEntitiesRequest(_message.Message):
    __slots__ = ("text", "model_version")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    text: str
    model_version: str
    def __init__(self, text: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class ExtractEntitiesResponse(_message.Message):
    __slots__ = ("entities", "model")
    ENTITIES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    entities: _containers.RepeatedCompositeFieldContainer[Entity]
    model: _common_pb2.ModelInfo
    def __init__(self, entities: _Optional[_Iterable[_Union[Entity, _Mapping]]] = ..., model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ...) -> None: ...

class ScoreCreditRiskRequest(_message.Message):
    __slots__ = ("application", "top_n", "model_version")
    APPLICATION_FIELD_NUMBER: _ClassVar[int]
    TOP_N_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    application: CreditApplication
    top_n: int
    model_version: str
    def __init__(self, application: _Optional[_Union[CreditApplication, _Mapping]] = ..., top_n: _Optional[int] = ..., model_version: _Optional[str] = ...) -> None: ...

class ScoreCreditRiskResponse(_message.Message):
    __slots__ = ("default_probability", "risk_band", "contributions", "base_value", "model")
    DEFAULT_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    RISK_BAND_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    BASE_VALUE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    default_probability: float
    risk_band: RiskBand
    contributions: _containers.RepeatedCompositeFieldContainer[FeatureContribution]
    base_value: float
    model: _common_pb2.ModelInfo
    def __init__(self, default_probability: _Optional[float] = ..., risk_band: _Optional[_Union[RiskBand, str]] = ..., contributions: _Optional[_Iterable[_Union[FeatureContribution, _Mapping]]] = ..., base_value: _Optional[float] = ..., model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ...) -> None: ...

class DetectAnomalyRequest(_message.Message):
    __slots__ = ("transaction", "model_version")
    TRANSACTION_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    transaction: Transaction
    model_version: str
    def __init__(self, transaction: _Optional[_Union[Transaction, _Mapping]] = ..., model_version: _Optional[str] = ...) -> None: ...

class DetectAnomalyResponse(_message.Message):
    __slots__ = ("anomaly_score", "threshold", "is_anomaly", "model")
    ANOMALY_SCORE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    IS_ANOMALY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    anomaly_score: float
    threshold: float
    is_anomaly: bool
    model: _common_pb2.ModelInfo
    def __init__(self, anomaly_score: _Optional[float] = ..., threshold: _Optional[float] = ..., is_anomaly: _Optional[bool] = ..., model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ...) -> None: ...
