from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ABArm(_message.Message):
    __slots__ = ("variant", "model_name", "version", "alias", "weight")
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    variant: str
    model_name: str
    version: int
    alias: str
    weight: int
    def __init__(self, variant: _Optional[str] = ..., model_name: _Optional[str] = ..., version: _Optional[int] = ..., alias: _Optional[str] = ..., weight: _Optional[int] = ...) -> None: ...

class StartABTestRequest(_message.Message):
    __slots__ = ("endpoint", "arms", "metric", "kind", "confidence", "key_parameter", "key_header")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[StartABTestRequest.Kind]
        RATE: _ClassVar[StartABTestRequest.Kind]
        MEAN: _ClassVar[StartABTestRequest.Kind]
    KIND_UNSPECIFIED: StartABTestRequest.Kind
    RATE: StartABTestRequest.Kind
    MEAN: StartABTestRequest.Kind
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    ARMS_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    KEY_PARAMETER_FIELD_NUMBER: _ClassVar[int]
    KEY_HEADER_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    arms: _containers.RepeatedCompositeFieldContainer[ABArm]
    metric: str
    kind: StartABTestRequest.Kind
    confidence: float
    key_parameter: str
    key_header: str
    def __init__(self, endpoint: _Optional[str] = ..., arms: _Optional[_Iterable[_Union[ABArm, _Mapping]]] = ..., metric: _Optional[str] = ..., kind: _Optional[_Union[StartABTestRequest.Kind, str]] = ..., confidence: _Optional[float] = ..., key_parameter: _Optional[str] = ..., key_header: _Optional[str] = ...) -> None: ...

class RecordOutcomeRequest(_message.Message):
    __slots__ = ("endpoint", "routing_key", "metric", "value")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    ROUTING_KEY_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    routing_key: str
    metric: str
    value: float
    def __init__(self, endpoint: _Optional[str] = ..., routing_key: _Optional[str] = ..., metric: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...

class RecordOutcomeResponse(_message.Message):
    __slots__ = ("variant",)
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    variant: str
    def __init__(self, variant: _Optional[str] = ...) -> None: ...

class Outcome(_message.Message):
    __slots__ = ("routing_key", "value")
    ROUTING_KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    routing_key: str
    value: float
    def __init__(self, routing_key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...

class RecordOutcomesRequest(_message.Message):
    __slots__ = ("endpoint", "metric", "outcomes")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    metric: str
    outcomes: _containers.RepeatedCompositeFieldContainer[Outcome]
    def __init__(self, endpoint: _Optional[str] = ..., metric: _Optional[str] = ..., outcomes: _Optional[_Iterable[_Union[Outcome, _Mapping]]] = ...) -> None: ...

class RecordOutcomesResponse(_message.Message):
    __slots__ = ("recorded", "per_variant")
    class PerVariantEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    RECORDED_FIELD_NUMBER: _ClassVar[int]
    PER_VARIANT_FIELD_NUMBER: _ClassVar[int]
    recorded: int
    per_variant: _containers.ScalarMap[str, int]
    def __init__(self, recorded: _Optional[int] = ..., per_variant: _Optional[_Mapping[str, int]] = ...) -> None: ...

class GetABTestRequest(_message.Message):
    __slots__ = ("endpoint",)
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    def __init__(self, endpoint: _Optional[str] = ...) -> None: ...

class ArmResult(_message.Message):
    __slots__ = ("variant", "count", "mean", "stddev", "difference", "ci_low", "ci_high", "p_value", "significant")
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STDDEV_FIELD_NUMBER: _ClassVar[int]
    DIFFERENCE_FIELD_NUMBER: _ClassVar[int]
    CI_LOW_FIELD_NUMBER: _ClassVar[int]
    CI_HIGH_FIELD_NUMBER: _ClassVar[int]
    P_VALUE_FIELD_NUMBER: _ClassVar[int]
    SIGNIFICANT_FIELD_NUMBER: _ClassVar[int]
    variant: str
    count: int
    mean: float
    stddev: float
    difference: float
    ci_low: float
    ci_high: float
    p_value: float
    significant: bool
    def __init__(self, variant: _Optional[str] = ..., count: _Optional[int] = ..., mean: _Optional[float] = ..., stddev: _Optional[float] = ..., difference: _Optional[float] = ..., ci_low: _Optional[float] = ..., ci_high: _Optional[float] = ..., p_value: _Optional[float] = ..., significant: bool = ...) -> None: ...

class ABTest(_message.Message):
    __slots__ = ("endpoint", "metric", "kind", "confidence", "running", "arms", "results", "test")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    ARMS_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    TEST_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    metric: str
    kind: StartABTestRequest.Kind
    confidence: float
    running: bool
    arms: _containers.RepeatedCompositeFieldContainer[ABArm]
    results: _containers.RepeatedCompositeFieldContainer[ArmResult]
    test: str
    def __init__(self, endpoint: _Optional[str] = ..., metric: _Optional[str] = ..., kind: _Optional[_Union[StartABTestRequest.Kind, str]] = ..., confidence: _Optional[float] = ..., running: bool = ..., arms: _Optional[_Iterable[_Union[ABArm, _Mapping]]] = ..., results: _Optional[_Iterable[_Union[ArmResult, _Mapping]]] = ..., test: _Optional[str] = ...) -> None: ...
