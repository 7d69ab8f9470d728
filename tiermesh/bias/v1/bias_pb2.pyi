from tiermesh.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FairnessMetric(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FAIRNESS_METRIC_UNSPECIFIED: _ClassVar[FairnessMetric]
    FAIRNESS_METRIC_STATISTICAL_PARITY_DIFFERENCE: _ClassVar[FairnessMetric]
    FAIRNESS_METRIC_DISPARATE_IMPACT: _ClassVar[FairnessMetric]
    FAIRNESS_METRIC_EQUAL_OPPORTUNITY_DIFFERENCE: _ClassVar[FairnessMetric]
    FAIRNESS_METRIC_AVERAGE_ODDS_DIFFERENCE: _ClassVar[FairnessMetric]
    FAIRNESS_METRIC_THEIL_INDEX: _ClassVar[FairnessMetric]

class FourFifthsVerdict(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FOUR_FIFTHS_VERDICT_UNSPECIFIED: _ClassVar[FourFifthsVerdict]
    FOUR_FIFTHS_VERDICT_PASS: _ClassVar[FourFifthsVerdict]
    FOUR_FIFTHS_VERDICT_FAIL: _ClassVar[FourFifthsVerdict]
    FOUR_FIFTHS_VERDICT_UNDEFINED: _ClassVar[FourFifthsVerdict]

class ProtectedClass(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROTECTED_CLASS_UNSPECIFIED: _ClassVar[ProtectedClass]
    PROTECTED_CLASS_RACE: _ClassVar[ProtectedClass]
    PROTECTED_CLASS_COLOR: _ClassVar[ProtectedClass]
    PROTECTED_CLASS_RELIGION: _ClassVar[ProtectedClass]
    PROTECTED_CLASS_NATIONAL_ORIGIN: _ClassVar[ProtectedClass]
    PROTECTED_CLASS_SEX: _ClassVar[ProtectedClass]
    PROTECTED_CLASS_MARITAL_STATUS: _ClassVar[ProtectedClass]
    PROTECTED_CLASS_AGE: _ClassVar[ProtectedClass]
    PROTECTED_CLASS_PUBLIC_ASSISTANCE: _ClassVar[ProtectedClass]

class DivergenceKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DIVERGENCE_KIND_UNSPECIFIED: _ClassVar[DivergenceKind]
    DIVERGENCE_KIND_SEMANTIC: _ClassVar[DivergenceKind]
    DIVERGENCE_KIND_AMOUNT: _ClassVar[DivergenceKind]
    DIVERGENCE_KIND_RATE: _ClassVar[DivergenceKind]
    DIVERGENCE_KIND_DECISION: _ClassVar[DivergenceKind]
FAIRNESS_METRIC_UNSPECIFIED: FairnessMetric
FAIRNESS_METRIC_STATISTICAL_PARITY_DIFFERENCE: FairnessMetric
FAIRNESS_METRIC_DISPARATE_IMPACT: FairnessMetric
FAIRNESS_METRIC_EQUAL_OPPORTUNITY_DIFFERENCE: FairnessMetric
FAIRNESS_METRIC_AVERAGE_ODDS_DIFFERENCE: FairnessMetric
FAIRNESS_METRIC_THEIL_INDEX: FairnessMetric
FOUR_FIFTHS_VERDICT_UNSPECIFIED: FourFifthsVerdict
FOUR_FIFTHS_VERDICT_PASS: FourFifthsVerdict
FOUR_FIFTHS_VERDICT_FAIL: FourFifthsVerdict
FOUR_FIFTHS_VERDICT_UNDEFINED: FourFifthsVerdict
PROTECTED_CLASS_UNSPECIFIED: ProtectedClass
PROTECTED_CLASS_RACE: ProtectedClass
PROTECTED_CLASS_COLOR: ProtectedClass
PROTECTED_CLASS_RELIGION: ProtectedClass
PROTECTED_CLASS_NATIONAL_ORIGIN: ProtectedClass
PROTECTED_CLASS_SEX: ProtectedClass
PROTECTED_CLASS_MARITAL_STATUS: ProtectedClass
PROTECTED_CLASS_AGE: ProtectedClass
PROTECTED_CLASS_PUBLIC_ASSISTANCE: ProtectedClass
DIVERGENCE_KIND_UNSPECIFIED: DivergenceKind
DIVERGENCE_KIND_SEMANTIC: DivergenceKind
DIVERGENCE_KIND_AMOUNT: DivergenceKind
DIVERGENCE_KIND_RATE: DivergenceKind
DIVERGENCE_KIND_DECISION: DivergenceKind

class BootstrapOptions(_message.Message):
    __slots__ = ("samples", "confidence_level", "seed")
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_LEVEL_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    samples: int
    confidence_level: float
    seed: int
    def __init__(self, samples: _Optional[int] = ..., confidence_level: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class ConfidenceInterval(_message.Message):
    __slots__ = ("lower", "upper", "level", "samples")
    LOWER_FIELD_NUMBER: _ClassVar[int]
    UPPER_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    lower: float
    upper: float
    level: float
    samples: int
    def __init__(self, lower: _Optional[float] = ..., upper: _Optional[float] = ..., level: _Optional[float] = ..., samples: _Optional[int] = ...) -> None: ...

class MetricResult(_message.Message):
    __slots__ = ("metric", "value", "undefined", "undefined_reason", "interval")
    METRIC_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    UNDEFINED_FIELD_NUMBER: _ClassVar[int]
    UNDEFINED_REASON_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_FIELD_NUMBER: _ClassVar[int]
    metric: FairnessMetric
    value: float
    undefined: bool
    undefined_reason: str
    interval: ConfidenceInterval
    def __init__(self, metric: _Optional[_Union[FairnessMetric, str]] = ..., value: _Optional[float] = ..., undefined: _Optional[bool] = ..., undefined_reason: _Optional[str] = ..., interval: _Optional[_Union[ConfidenceInterval, _Mapping]] = ...) -> None: ...

class GroupSummary(_message.Message):
    __slots__ = ("count", "selection_rate", "base_rate")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SELECTION_RATE_FIELD_NUMBER: _ClassVar[int]
    BASE_RATE_FIELD_NUMBER: _ClassVar[int]
    count: int
    selection_rate: float
    base_rate: float
    def __init__(self, count: _Optional[int] = ..., selection_rate: _Optional[float] = ..., base_rate: _Optional[float] = ...) -> None: ...

class BiasEvidence(_message.Message):
    __slots__ = ("protected_class", "span", "start", "end", "used_as_basis", "strength", "cues")
    PROTECTED_CLASS_FIELD_NUMBER: _ClassVar[int]
    SPAN_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    USED_AS_BASIS_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    CUES_FIELD_NUMBER: _ClassVar[int]
    protected_class: ProtectedClass
    span: str
    start: int
    end: int
    used_as_basis: bool
    strength: float
    cues: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, protected_class: _Optional[_Union[ProtectedClass, str]] = ..., span: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., used_as_basis: _Optional[bool] = ..., strength: _Optional[float] = ..., cues: _Optional[_Iterable[str]] = ...) -> None: ...

class TextBiasVerdict(_message.Message):
    __slots__ = ("score", "flagged", "threshold", "evidence")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    score: float
    flagged: bool
    threshold: float
    evidence: _containers.RepeatedCompositeFieldContainer[BiasEvidence]
    def __init__(self, score: _Optional[float] = ..., flagged: _Optional[bool] = ..., threshold: _Optional[float] = ..., evidence: _Optional[_Iterable[_Union[BiasEvidence, _Mapping]]] = ...) -> None: ...

class CounterfactualVariant(_message.Message):
    __slots__ = ("attribute_value", "question", "answer", "similarity")
    ATTRIBUTE_VALUE_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    attribute_value: str
    question: str
    answer: str
    similarity: float
    def __init__(self, attribute_value: _Optional[str] = ..., question: _Optional[str] = ..., answer: _Optional[str] = ..., similarity: _Optional[float] = ...) -> None: ...

class Divergence(_message.Message):
    __slots__ = ("variant_index", "kind", "reference_value", "variant_value")
    VARIANT_INDEX_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_VALUE_FIELD_NUMBER: _ClassVar[int]
    VARIANT_VALUE_FIELD_NUMBER: _ClassVar[int]
    variant_index: int
    kind: DivergenceKind
    reference_value: str
    variant_value: str
    def __init__(self, variant_index: _Optional[int] = ..., kind: _Optional[_Union[DivergenceKind, str]] = ..., reference_value: _Optional[str] = ..., variant_value: _Optional[str] = ...) -> None: ...

class DecisionBatch(_message.Message):
    __slots__ = ("true_labels", "predicted_labels", "scores", "threshold", "favorable_label", "protected_attribute", "protected_values", "privileged_values", "label_mapping")
    class LabelMappingEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    TRUE_LABELS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_LABELS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    FAVORABLE_LABEL_FIELD_NUMBER: _ClassVar[int]
    PROTECTED_ATTRIBUTE_FIELD_NUMBER: _ClassVar[int]
    PROTECTED_VALUES_FIELD_NUMBER: _ClassVar[int]
    PRIVILEGED_VALUES_FIELD_NUMBER: _ClassVar[int]
    LABEL_MAPPING_FIELD_NUMBER: _ClassVar[int]
    true_labels: _containers.RepeatedScalarFieldContainer[int]
    predicted_labels: _containers.RepeatedScalarFieldContainer[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    threshold: float
    favorable_label: int
    protected_attribute: str
    protected_values: _containers.RepeatedScalarFieldContainer[str]
    privileged_values: _containers.RepeatedScalarFieldContainer[str]
    label_mapping: _containers.ScalarMap[int, int]
    def __init__(self, true_labels: _Optional[_Iterable[int]] = ..., predicted_labels: _Optional[_Iterable[int]] = ..., scores: _Optional[_Iterable[float]] = ..., threshold: _Optional[float] = ..., favorable_label: _Optional[int] = ..., protected_attribute: _Optional[str] = ..., protected_values: _Optional[_Iterable[str]] = ..., privileged_values: _Optional[_Iterable[str]] = ..., label_mapping: _Optional[_Mapping[int, int]] = ...) -> None: ...

class FairnessReport(_message.Message):
    __slots__ = ("metrics", "four_fifths", "privileged", "unprivileged")
    METRICS_FIELD_NUMBER: _ClassVar[int]
    FOUR_FIFTHS_FIELD_NUMBER: _ClassVar[int]
    PRIVILEGED_FIELD_NUMBER: _ClassVar[int]
    UNPRIVILEGED_FIELD_NUMBER: _ClassVar[int]
    metrics: _containers.RepeatedCompositeFieldContainer[MetricResult]
    four_fifths: FourFifthsVerdict
    privileged: GroupSummary
    unprivileged: GroupSummary
    def __init__(self, metrics: _Optional[_Iterable[_Union[MetricResult, _Mapping]]] = ..., four_fifths: _Optional[_Union[FourFifthsVerdict, str]] = ..., privileged: _Optional[_Union[GroupSummary, _Mapping]] = ..., unprivileged: _Optional[_Union[GroupSummary, _Mapping]] = ...) -> None: ...

class EvaluateDecisionsRequest(_message.Message):
    __slots__ = ("decisions", "bootstrap")
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    BOOTSTRAP_FIELD_NUMBER: _ClassVar[int]
    decisions: DecisionBatch
    bootstrap: BootstrapOptions
    def __init__(self, decisions: _Optional[_Union[DecisionBatch, _Mapping]] = ..., bootstrap: _Optional[_Union[BootstrapOptions, _Mapping]] = ...) -> None: ...

class EvaluateDecisionsResponse(_message.Message):
    __slots__ = ("report", "model")
    REPORT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    report: FairnessReport
    model: _common_pb2.ModelInfo
    def __init__(self, report: _Optional[_Union[FairnessReport, _Mapping]] = ..., model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ...) -> None: ...

class DecisionWindow(_message.Message):
    __slots__ = ("model_name", "model_version", "protected_attribute")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROTECTED_ATTRIBUTE_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    protected_attribute: str
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., protected_attribute: _Optional[str] = ...) -> None: ...

class RecordDecisionsRequest(_message.Message):
    __slots__ = ("model_name", "model_version", "decisions")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    decisions: DecisionBatch
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., decisions: _Optional[_Union[DecisionBatch, _Mapping]] = ...) -> None: ...

class RecordDecisionsResponse(_message.Message):
    __slots__ = ("window", "size", "capacity", "model")
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    window: DecisionWindow
    size: int
    capacity: int
    model: _common_pb2.ModelInfo
    def __init__(self, window: _Optional[_Union[DecisionWindow, _Mapping]] = ..., size: _Optional[int] = ..., capacity: _Optional[int] = ..., model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ...) -> None: ...

class EvaluateWindowRequest(_message.Message):
    __slots__ = ("window", "bootstrap")
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    BOOTSTRAP_FIELD_NUMBER: _ClassVar[int]
    window: DecisionWindow
    bootstrap: BootstrapOptions
    def __init__(self, window: _Optional[_Union[DecisionWindow, _Mapping]] = ..., bootstrap: _Optional[_Union[BootstrapOptions, _Mapping]] = ...) -> None: ...

class EvaluateWindowResponse(_message.Message):
    __slots__ = ("window", "report", "decisions", "decisions_with_outcome", "privileged_values", "model")
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_WITH_OUTCOME_FIELD_NUMBER: _ClassVar[int]
    PRIVILEGED_VALUES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    window: DecisionWindow
    report: FairnessReport
    decisions: int
    decisions_with_outcome: int
    privileged_values: _containers.RepeatedScalarFieldContainer[str]
    model: _common_pb2.ModelInfo
    def __init__(self, window: _Optional[_Union[DecisionWindow, _Mapping]] = ..., report: _Optional[_Union[FairnessReport, _Mapping]] = ..., decisions: _Optional[int] = ..., decisions_with_outcome: _Optional[int] = ..., privileged_values: _Optional[_Iterable[str]] = ..., model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ...) -> None: ...

class ScoreTextRequest(_message.Message):
    __slots__ = ("text", "model_version")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    text: str
    model_version: str
    def __init__(self, text: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class ScoreTextResponse(_message.Message):
    __slots__ = ("verdict", "model")
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    verdict: TextBiasVerdict
    model: _common_pb2.ModelInfo
    def __init__(self, verdict: _Optional[_Union[TextBiasVerdict, _Mapping]] = ..., model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ...) -> None: ...

class ProbeCounterfactualRequest(_message.Message):
    __slots__ = ("question", "attribute", "values", "seed", "max_tokens", "temperature")
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTE_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    question: str
    attribute: ProtectedClass
    values: _containers.RepeatedScalarFieldContainer[str]
    seed: int
    max_tokens: int
    temperature: float
    def __init__(self, question: _Optional[str] = ..., attribute: _Optional[_Union[ProtectedClass, str]] = ..., values: _Optional[_Iterable[str]] = ..., seed: _Optional[int] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ...) -> None: ...

class ProbeCounterfactualResponse(_message.Message):
    __slots__ = ("variants", "parity_score", "divergences", "model", "llm", "embedder")
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    PARITY_SCORE_FIELD_NUMBER: _ClassVar[int]
    DIVERGENCES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LLM_FIELD_NUMBER: _ClassVar[int]
    EMBEDDER_FIELD_NUMBER: _ClassVar[int]
    variants: _containers.RepeatedCompositeFieldContainer[CounterfactualVariant]
    parity_score: float
    divergences: _containers.RepeatedCompositeFieldContainer[Divergence]
    model: _common_pb2.ModelInfo
    llm: _common_pb2.ModelInfo
    embedder: _common_pb2.ModelInfo
    def __init__(self, variants: _Optional[_Iterable[_Union[CounterfactualVariant, _Mapping]]] = ..., parity_score: _Optional[float] = ..., divergences: _Optional[_Iterable[_Union[Divergence, _Mapping]]] = ..., model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ..., llm: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ..., embedder: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ...) -> None: ...
