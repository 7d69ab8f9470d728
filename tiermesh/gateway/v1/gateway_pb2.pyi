import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from tiermesh.bias.v1 import bias_pb2 as _bias_pb2
from tiermesh.classifiers.v1 import classifiers_pb2 as _classifiers_pb2
from tiermesh.common.v1 import common_pb2 as _common_pb2
from tiermesh.llm.v1 import llm_pb2 as _llm_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TIER_UNSPECIFIED: _ClassVar[Tier]
    TIER_GATEWAY: _ClassVar[Tier]
    TIER_CLASSIFIERS: _ClassVar[Tier]
    TIER_EMBEDDER: _ClassVar[Tier]
    TIER_RETRIEVER: _ClassVar[Tier]
    TIER_LLM: _ClassVar[Tier]
    TIER_BIAS: _ClassVar[Tier]

class Arm(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ARM_UNSPECIFIED: _ClassVar[Arm]
    ARM_CONTROL: _ClassVar[Arm]
    ARM_TREATMENT: _ClassVar[Arm]

class BiasCheckStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BIAS_CHECK_STATUS_UNSPECIFIED: _ClassVar[BiasCheckStatus]
    BIAS_CHECK_STATUS_CHECKED: _ClassVar[BiasCheckStatus]
    BIAS_CHECK_STATUS_UNCHECKED: _ClassVar[BiasCheckStatus]

class DegradedMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEGRADED_MODE_UNSPECIFIED: _ClassVar[DegradedMode]
    DEGRADED_MODE_BIAS_UNCHECKED: _ClassVar[DegradedMode]
    DEGRADED_MODE_CLASSIFIERS_SKIPPED: _ClassVar[DegradedMode]
    DEGRADED_MODE_SOURCES_SKIPPED: _ClassVar[DegradedMode]
TIER_UNSPECIFIED: Tier
TIER_GATEWAY: Tier
TIER_CLASSIFIERS: Tier
TIER_EMBEDDER: Tier
TIER_RETRIEVER: Tier
TIER_LLM: Tier
TIER_BIAS: Tier
ARM_UNSPECIFIED: Arm
ARM_CONTROL: Arm
ARM_TREATMENT: Arm
BIAS_CHECK_STATUS_UNSPECIFIED: BiasCheckStatus
BIAS_CHECK_STATUS_CHECKED: BiasCheckStatus
BIAS_CHECK_STATUS_UNCHECKED: BiasCheckStatus
DEGRADED_MODE_UNSPECIFIED: DegradedMode
DEGRADED_MODE_BIAS_UNCHECKED: DegradedMode
DEGRADED_MODE_CLASSIFIERS_SKIPPED: DegradedMode
DEGRADED_MODE_SOURCES_SKIPPED: DegradedMode

class AdviseOptions(_message.Message):
    __slots__ = ("top_k", "max_tokens", "temperature", "seed")
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    top_k: int
    max_tokens: int
    temperature: float
    seed: int
    def __init__(self, top_k: _Optional[int] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class Source(_message.Message):
    __slots__ = ("doc_id", "title", "section", "score")
    DOC_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    SECTION_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    doc_id: str
    title: str
    section: str
    score: float
    def __init__(self, doc_id: _Optional[str] = ..., title: _Optional[str] = ..., section: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class BiasCheck(_message.Message):
    __slots__ = ("status", "verdict", "unchecked_reason")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    UNCHECKED_REASON_FIELD_NUMBER: _ClassVar[int]
    status: BiasCheckStatus
    verdict: _bias_pb2.TextBiasVerdict
    unchecked_reason: str
    def __init__(self, status: _Optional[_Union[BiasCheckStatus, str]] = ..., verdict: _Optional[_Union[_bias_pb2.TextBiasVerdict, _Mapping]] = ..., unchecked_reason: _Optional[str] = ...) -> None: ...

class TierVersion(_message.Message):
    __slots__ = ("tier", "model", "arm")
    TIER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ARM_FIELD_NUMBER: _ClassVar[int]
    tier: Tier
    model: _common_pb2.ModelInfo
    arm: Arm
    def __init__(self, tier: _Optional[_Union[Tier, str]] = ..., model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ..., arm: _Optional[_Union[Arm, str]] = ...) -> None: ...

class HopTiming(_message.Message):
    __slots__ = ("tier", "rpc", "duration", "status_code")
    TIER_FIELD_NUMBER: _ClassVar[int]
    RPC_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    STATUS_CODE_FIELD_NUMBER: _ClassVar[int]
    tier: Tier
    rpc: str
    duration: _duration_pb2.Duration
    status_code: str
    def __init__(self, tier: _Optional[_Union[Tier, str]] = ..., rpc: _Optional[str] = ..., duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., status_code: _Optional[str] = ...) -> None: ...

class Advice(_message.Message):
    __slots__ = ("response_id", "text", "sources", "intent", "entities", "bias", "out_of_scope", "versions", "trace_id", "timings", "total_duration", "degraded_modes", "cached", "usage")
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    INTENT_FIELD_NUMBER: _ClassVar[int]
    ENTITIES_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    OUT_OF_SCOPE_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_DURATION_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_MODES_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    response_id: str
    text: str
    sources: _containers.RepeatedCompositeFieldContainer[Source]
    intent: _classifiers_pb2.Intent
    entities: _containers.RepeatedCompositeFieldContainer[_classifiers_pb2.Entity]
    bias: BiasCheck
    out_of_scope: bool
    versions: _containers.RepeatedCompositeFieldContainer[TierVersion]
    trace_id: str
    timings: _containers.RepeatedCompositeFieldContainer[HopTiming]
    total_duration: _duration_pb2.Duration
    degraded_modes: _containers.RepeatedScalarFieldContainer[DegradedMode]
    cached: bool
    usage: _llm_pb2.Usage
    def __init__(self, response_id: _Optional[str] = ..., text: _Optional[str] = ..., sources: _Optional[_Iterable[_Union[Source, _Mapping]]] = ..., intent: _Optional[_Union[_classifiers_pb2.Intent, _Mapping]] = ..., entities: _Optional[_Iterable[_Union[_classifiers_pb2.Entity, _Mapping]]] = ..., bias: _Optional[_Union[BiasCheck, _Mapping]] = ..., out_of_scope: _Optional[bool] = ..., versions: _Optional[_Iterable[_Union[TierVersion, _Mapping]]] = ..., trace_id: _Optional[str] = ..., timings: _Optional[_Iterable[_Union[HopTiming, _Mapping]]] = ..., total_duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., degraded_modes: _Optional[_Iterable[_Union[DegradedMode, str]]] = ..., cached: _Optional[bool] = ..., usage: _Optional[_Union[_llm_pb2.Usage, _Mapping]] = ...) -> None: ...

class AdviceChunk(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class AdviseRequest(_message.Message):
    __slots__ = ("question", "user_id", "options")
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    question: str
    user_id: str
    options: AdviseOptions
    def __init__(self, question: _Optional[str] = ..., user_id: _Optional[str] = ..., options: _Optional[_Union[AdviseOptions, _Mapping]] = ...) -> None: ...

class AdviseResponse(_message.Message):
    __slots__ = ("advice",)
    ADVICE_FIELD_NUMBER: _ClassVar[int]
    advice: Advice
    def __init__(self, advice: _Optional[_Union[Advice, _Mapping]] = ...) -> None: ...

class AdviseStreamRequest(_message.Message):
    __slots__ = ("question", "user_id", "options")
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    question: str
    user_id: str
    options: AdviseOptions
    def __init__(self, question: _Optional[str] = ..., user_id: _Optional[str] = ..., options: _Optional[_Union[AdviseOptions, _Mapping]] = ...) -> None: ...

class AdviseStreamResponse(_message.Message):
    __slots__ = ("chunk", "advice")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    ADVICE_FIELD_NUMBER: _ClassVar[int]
    chunk: AdviceChunk
    advice: Advice
    def __init__(self, chunk: _Optional[_Union[AdviceChunk, _Mapping]] = ..., advice: _Optional[_Union[Advice, _Mapping]] = ...) -> None: ...
