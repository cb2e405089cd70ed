import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StartBlueGreenRequest(_message.Message):
    __slots__ = ("endpoint", "model_name", "version", "alias", "keep_previous_seconds", "progress_deadline_seconds")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    KEEP_PREVIOUS_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_DEADLINE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    model_name: str
    version: int
    alias: str
    keep_previous_seconds: float
    progress_deadline_seconds: float
    def __init__(self, endpoint: _Optional[str] = ..., model_name: _Optional[str] = ..., version: _Optional[int] = ..., alias: _Optional[str] = ..., keep_previous_seconds: _Optional[float] = ..., progress_deadline_seconds: _Optional[float] = ...) -> None: ...

class AnalysisThresholds(_message.Message):
    __slots__ = ("max_error_rate_increase", "max_p99_ratio", "max_p99_slack_ms", "min_requests", "failure_limit", "max_accuracy_drop", "min_labelled")
    MAX_ERROR_RATE_INCREASE_FIELD_NUMBER: _ClassVar[int]
    MAX_P99_RATIO_FIELD_NUMBER: _ClassVar[int]
    MAX_P99_SLACK_MS_FIELD_NUMBER: _ClassVar[int]
    MIN_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    FAILURE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    MAX_ACCURACY_DROP_FIELD_NUMBER: _ClassVar[int]
    MIN_LABELLED_FIELD_NUMBER: _ClassVar[int]
    max_error_rate_increase: float
    max_p99_ratio: float
    max_p99_slack_ms: float
    min_requests: int
    failure_limit: int
    max_accuracy_drop: float
    min_labelled: int
    def __init__(self, max_error_rate_increase: _Optional[float] = ..., max_p99_ratio: _Optional[float] = ..., max_p99_slack_ms: _Optional[float] = ..., min_requests: _Optional[int] = ..., failure_limit: _Optional[int] = ..., max_accuracy_drop: _Optional[float] = ..., min_labelled: _Optional[int] = ...) -> None: ...

class StartRolloutRequest(_message.Message):
    __slots__ = ("endpoint", "model_name", "version", "alias", "steps", "interval_seconds", "thresholds", "progress_deadline_seconds")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_DEADLINE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    model_name: str
    version: int
    alias: str
    steps: _containers.RepeatedScalarFieldContainer[int]
    interval_seconds: float
    thresholds: AnalysisThresholds
    progress_deadline_seconds: float
    def __init__(self, endpoint: _Optional[str] = ..., model_name: _Optional[str] = ..., version: _Optional[int] = ..., alias: _Optional[str] = ..., steps: _Optional[_Iterable[int]] = ..., interval_seconds: _Optional[float] = ..., thresholds: _Optional[_Union[AnalysisThresholds, _Mapping]] = ..., progress_deadline_seconds: _Optional[float] = ...) -> None: ...

class GetRolloutRequest(_message.Message):
    __slots__ = ("endpoint",)
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    def __init__(self, endpoint: _Optional[str] = ...) -> None: ...

class RolloutAction(_message.Message):
    __slots__ = ("endpoint",)
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    def __init__(self, endpoint: _Optional[str] = ...) -> None: ...

class Analysis(_message.Message):
    __slots__ = ("at", "step", "canary_weight", "canary_requests", "canary_errors", "baseline_requests", "baseline_errors", "canary_p99_ms", "baseline_p99_ms", "verdict", "reason", "canary_labelled", "baseline_labelled", "canary_accuracy", "baseline_accuracy")
    AT_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CANARY_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    CANARY_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    CANARY_ERRORS_FIELD_NUMBER: _ClassVar[int]
    BASELINE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    BASELINE_ERRORS_FIELD_NUMBER: _ClassVar[int]
    CANARY_P99_MS_FIELD_NUMBER: _ClassVar[int]
    BASELINE_P99_MS_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CANARY_LABELLED_FIELD_NUMBER: _ClassVar[int]
    BASELINE_LABELLED_FIELD_NUMBER: _ClassVar[int]
    CANARY_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    BASELINE_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    at: _timestamp_pb2.Timestamp
    step: int
    canary_weight: int
    canary_requests: int
    canary_errors: int
    baseline_requests: int
    baseline_errors: int
    canary_p99_ms: float
    baseline_p99_ms: float
    verdict: str
    reason: str
    canary_labelled: int
    baseline_labelled: int
    canary_accuracy: float
    baseline_accuracy: float
    def __init__(self, at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., step: _Optional[int] = ..., canary_weight: _Optional[int] = ..., canary_requests: _Optional[int] = ..., canary_errors: _Optional[int] = ..., baseline_requests: _Optional[int] = ..., baseline_errors: _Optional[int] = ..., canary_p99_ms: _Optional[float] = ..., baseline_p99_ms: _Optional[float] = ..., verdict: _Optional[str] = ..., reason: _Optional[str] = ..., canary_labelled: _Optional[int] = ..., baseline_labelled: _Optional[int] = ..., canary_accuracy: _Optional[float] = ..., baseline_accuracy: _Optional[float] = ...) -> None: ...

class RolloutVariant(_message.Message):
    __slots__ = ("name", "model_name", "version", "alias", "weight")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    name: str
    model_name: str
    version: int
    alias: str
    weight: int
    def __init__(self, name: _Optional[str] = ..., model_name: _Optional[str] = ..., version: _Optional[int] = ..., alias: _Optional[str] = ..., weight: _Optional[int] = ...) -> None: ...

class Rollout(_message.Message):
    __slots__ = ("endpoint", "state", "baseline_variant", "canary_variant", "steps", "step", "interval_seconds", "thresholds", "failed_intervals", "analyses", "started_by", "started_at", "next_analysis_at", "reason", "strategy", "keep_previous_seconds", "retire_previous_at", "green_ready", "approved_by", "awaiting_approval", "variants", "ended_at", "progress_deadline_seconds", "progress_deadline_at", "canary_ready", "desired_revision")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Rollout.State]
        RUNNING: _ClassVar[Rollout.State]
        PAUSED: _ClassVar[Rollout.State]
        SUCCEEDED: _ClassVar[Rollout.State]
        ROLLED_BACK: _ClassVar[Rollout.State]
        SUPERSEDED: _ClassVar[Rollout.State]
    STATE_UNSPECIFIED: Rollout.State
    RUNNING: Rollout.State
    PAUSED: Rollout.State
    SUCCEEDED: Rollout.State
    ROLLED_BACK: Rollout.State
    SUPERSEDED: Rollout.State
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    BASELINE_VARIANT_FIELD_NUMBER: _ClassVar[int]
    CANARY_VARIANT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    FAILED_INTERVALS_FIELD_NUMBER: _ClassVar[int]
    ANALYSES_FIELD_NUMBER: _ClassVar[int]
    STARTED_BY_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    NEXT_ANALYSIS_AT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    KEEP_PREVIOUS_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RETIRE_PREVIOUS_AT_FIELD_NUMBER: _ClassVar[int]
    GREEN_READY_FIELD_NUMBER: _ClassVar[int]
    APPROVED_BY_FIELD_NUMBER: _ClassVar[int]
    AWAITING_APPROVAL_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_DEADLINE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_DEADLINE_AT_FIELD_NUMBER: _ClassVar[int]
    CANARY_READY_FIELD_NUMBER: _ClassVar[int]
    DESIRED_REVISION_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    state: Rollout.State
    baseline_variant: str
    canary_variant: str
    steps: _containers.RepeatedScalarFieldContainer[int]
    step: int
    interval_seconds: float
    thresholds: AnalysisThresholds
    failed_intervals: int
    analyses: _containers.RepeatedCompositeFieldContainer[Analysis]
    started_by: str
    started_at: _timestamp_pb2.Timestamp
    next_analysis_at: _timestamp_pb2.Timestamp
    reason: str
    strategy: str
    keep_previous_seconds: float
    retire_previous_at: _timestamp_pb2.Timestamp
    green_ready: bool
    approved_by: str
    awaiting_approval: bool
    variants: _containers.RepeatedCompositeFieldContainer[RolloutVariant]
    ended_at: _timestamp_pb2.Timestamp
    progress_deadline_seconds: float
    progress_deadline_at: _timestamp_pb2.Timestamp
    canary_ready: bool
    desired_revision: int
    def __init__(self, endpoint: _Optional[str] = ..., state: _Optional[_Union[Rollout.State, str]] = ..., baseline_variant: _Optional[str] = ..., canary_variant: _Optional[str] = ..., steps: _Optional[_Iterable[int]] = ..., step: _Optional[int] = ..., interval_seconds: _Optional[float] = ..., thresholds: _Optional[_Union[AnalysisThresholds, _Mapping]] = ..., failed_intervals: _Optional[int] = ..., analyses: _Optional[_Iterable[_Union[Analysis, _Mapping]]] = ..., started_by: _Optional[str] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., next_analysis_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reason: _Optional[str] = ..., strategy: _Optional[str] = ..., keep_previous_seconds: _Optional[float] = ..., retire_previous_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., green_ready: bool = ..., approved_by: _Optional[str] = ..., awaiting_approval: bool = ..., variants: _Optional[_Iterable[_Union[RolloutVariant, _Mapping]]] = ..., ended_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., progress_deadline_seconds: _Optional[float] = ..., progress_deadline_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., canary_ready: bool = ..., desired_revision: _Optional[int] = ...) -> None: ...
