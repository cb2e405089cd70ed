import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from weir_proto.control.v1 import training_pb2 as _training_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Severity(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEVERITY_UNSPECIFIED: _ClassVar[Severity]
    NONE: _ClassVar[Severity]
    WARNING: _ClassVar[Severity]
    CRITICAL: _ClassVar[Severity]
SEVERITY_UNSPECIFIED: Severity
NONE: Severity
WARNING: Severity
CRITICAL: Severity

class FeatureValue(_message.Message):
    __slots__ = ("name", "number", "text")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    name: str
    number: float
    text: str
    def __init__(self, name: _Optional[str] = ..., number: _Optional[float] = ..., text: _Optional[str] = ...) -> None: ...

class InferenceRecord(_message.Message):
    __slots__ = ("endpoint", "variant", "version", "request_id", "routing_key", "at", "latency_seconds", "inputs", "outputs")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ROUTING_KEY_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    LATENCY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    variant: str
    version: int
    request_id: str
    routing_key: str
    at: _timestamp_pb2.Timestamp
    latency_seconds: float
    inputs: _containers.RepeatedCompositeFieldContainer[FeatureValue]
    outputs: _containers.RepeatedCompositeFieldContainer[FeatureValue]
    def __init__(self, endpoint: _Optional[str] = ..., variant: _Optional[str] = ..., version: _Optional[int] = ..., request_id: _Optional[str] = ..., routing_key: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., latency_seconds: _Optional[float] = ..., inputs: _Optional[_Iterable[_Union[FeatureValue, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[FeatureValue, _Mapping]]] = ...) -> None: ...

class InferenceRecords(_message.Message):
    __slots__ = ("records", "dropped")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[InferenceRecord]
    dropped: int
    def __init__(self, records: _Optional[_Iterable[_Union[InferenceRecord, _Mapping]]] = ..., dropped: _Optional[int] = ...) -> None: ...

class TimeRange(_message.Message):
    __slots__ = ("start", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: _timestamp_pb2.Timestamp
    end: _timestamp_pb2.Timestamp
    def __init__(self, start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class SetReferenceRequest(_message.Message):
    __slots__ = ("endpoint", "window", "serving_lineage", "parquet_path")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    SERVING_LINEAGE_FIELD_NUMBER: _ClassVar[int]
    PARQUET_PATH_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    window: TimeRange
    serving_lineage: bool
    parquet_path: str
    def __init__(self, endpoint: _Optional[str] = ..., window: _Optional[_Union[TimeRange, _Mapping]] = ..., serving_lineage: bool = ..., parquet_path: _Optional[str] = ...) -> None: ...

class ReferenceSummary(_message.Message):
    __slots__ = ("endpoint", "source", "rows", "numeric_features", "categorical_features", "set_at", "serving_lineage", "serving_version")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    NUMERIC_FEATURES_FIELD_NUMBER: _ClassVar[int]
    CATEGORICAL_FEATURES_FIELD_NUMBER: _ClassVar[int]
    SET_AT_FIELD_NUMBER: _ClassVar[int]
    SERVING_LINEAGE_FIELD_NUMBER: _ClassVar[int]
    SERVING_VERSION_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    source: str
    rows: int
    numeric_features: _containers.RepeatedScalarFieldContainer[str]
    categorical_features: _containers.RepeatedScalarFieldContainer[str]
    set_at: _timestamp_pb2.Timestamp
    serving_lineage: bool
    serving_version: str
    def __init__(self, endpoint: _Optional[str] = ..., source: _Optional[str] = ..., rows: _Optional[int] = ..., numeric_features: _Optional[_Iterable[str]] = ..., categorical_features: _Optional[_Iterable[str]] = ..., set_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., serving_lineage: bool = ..., serving_version: _Optional[str] = ...) -> None: ...

class Thresholds(_message.Message):
    __slots__ = ("warning", "critical")
    WARNING_FIELD_NUMBER: _ClassVar[int]
    CRITICAL_FIELD_NUMBER: _ClassVar[int]
    warning: float
    critical: float
    def __init__(self, warning: _Optional[float] = ..., critical: _Optional[float] = ...) -> None: ...

class MonitoringPolicy(_message.Message):
    __slots__ = ("endpoint", "window_seconds", "min_records", "thresholds", "webhook_url", "retrain", "retrain_spec", "cooldown_seconds", "max_windows")
    class ThresholdsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Thresholds
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Thresholds, _Mapping]] = ...) -> None: ...
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MIN_RECORDS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    WEBHOOK_URL_FIELD_NUMBER: _ClassVar[int]
    RETRAIN_FIELD_NUMBER: _ClassVar[int]
    RETRAIN_SPEC_FIELD_NUMBER: _ClassVar[int]
    COOLDOWN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_WINDOWS_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    window_seconds: float
    min_records: int
    thresholds: _containers.MessageMap[str, Thresholds]
    webhook_url: str
    retrain: bool
    retrain_spec: _training_pb2.JobSpec
    cooldown_seconds: float
    max_windows: int
    def __init__(self, endpoint: _Optional[str] = ..., window_seconds: _Optional[float] = ..., min_records: _Optional[int] = ..., thresholds: _Optional[_Mapping[str, Thresholds]] = ..., webhook_url: _Optional[str] = ..., retrain: bool = ..., retrain_spec: _Optional[_Union[_training_pb2.JobSpec, _Mapping]] = ..., cooldown_seconds: _Optional[float] = ..., max_windows: _Optional[int] = ...) -> None: ...

class GetMonitoringPolicyRequest(_message.Message):
    __slots__ = ("endpoint",)
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    def __init__(self, endpoint: _Optional[str] = ...) -> None: ...

class Histogram(_message.Message):
    __slots__ = ("edges", "categories", "reference", "current")
    EDGES_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    edges: _containers.RepeatedScalarFieldContainer[float]
    categories: _containers.RepeatedScalarFieldContainer[str]
    reference: _containers.RepeatedScalarFieldContainer[float]
    current: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, edges: _Optional[_Iterable[float]] = ..., categories: _Optional[_Iterable[str]] = ..., reference: _Optional[_Iterable[float]] = ..., current: _Optional[_Iterable[float]] = ...) -> None: ...

class FeatureDrift(_message.Message):
    __slots__ = ("name", "role", "categorical", "count", "psi", "ks_statistic", "ks_p_value", "jensen_shannon", "wasserstein", "wasserstein_normalized", "chi_square", "chi_square_p_value", "severity", "reasons", "histogram")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CATEGORICAL_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    PSI_FIELD_NUMBER: _ClassVar[int]
    KS_STATISTIC_FIELD_NUMBER: _ClassVar[int]
    KS_P_VALUE_FIELD_NUMBER: _ClassVar[int]
    JENSEN_SHANNON_FIELD_NUMBER: _ClassVar[int]
    WASSERSTEIN_FIELD_NUMBER: _ClassVar[int]
    WASSERSTEIN_NORMALIZED_FIELD_NUMBER: _ClassVar[int]
    CHI_SQUARE_FIELD_NUMBER: _ClassVar[int]
    CHI_SQUARE_P_VALUE_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    HISTOGRAM_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: str
    categorical: bool
    count: int
    psi: float
    ks_statistic: float
    ks_p_value: float
    jensen_shannon: float
    wasserstein: float
    wasserstein_normalized: float
    chi_square: float
    chi_square_p_value: float
    severity: Severity
    reasons: _containers.RepeatedScalarFieldContainer[str]
    histogram: Histogram
    def __init__(self, name: _Optional[str] = ..., role: _Optional[str] = ..., categorical: bool = ..., count: _Optional[int] = ..., psi: _Optional[float] = ..., ks_statistic: _Optional[float] = ..., ks_p_value: _Optional[float] = ..., jensen_shannon: _Optional[float] = ..., wasserstein: _Optional[float] = ..., wasserstein_normalized: _Optional[float] = ..., chi_square: _Optional[float] = ..., chi_square_p_value: _Optional[float] = ..., severity: _Optional[_Union[Severity, str]] = ..., reasons: _Optional[_Iterable[str]] = ..., histogram: _Optional[_Union[Histogram, _Mapping]] = ...) -> None: ...

class PredictionDrift(_message.Message):
    __slots__ = ("output", "max_share_change", "severity")
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    MAX_SHARE_CHANGE_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    output: str
    max_share_change: float
    severity: Severity
    def __init__(self, output: _Optional[str] = ..., max_share_change: _Optional[float] = ..., severity: _Optional[_Union[Severity, str]] = ...) -> None: ...

class ConceptDrift(_message.Message):
    __slots__ = ("labelled", "accuracy", "reference_accuracy", "detector_state", "severity")
    LABELLED_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_STATE_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    labelled: int
    accuracy: float
    reference_accuracy: float
    detector_state: str
    severity: Severity
    def __init__(self, labelled: _Optional[int] = ..., accuracy: _Optional[float] = ..., reference_accuracy: _Optional[float] = ..., detector_state: _Optional[str] = ..., severity: _Optional[_Union[Severity, str]] = ...) -> None: ...

class DriftWindow(_message.Message):
    __slots__ = ("start", "end", "records", "severity", "features", "predictions", "concept")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    CONCEPT_FIELD_NUMBER: _ClassVar[int]
    start: _timestamp_pb2.Timestamp
    end: _timestamp_pb2.Timestamp
    records: int
    severity: Severity
    features: _containers.RepeatedCompositeFieldContainer[FeatureDrift]
    predictions: _containers.RepeatedCompositeFieldContainer[PredictionDrift]
    concept: ConceptDrift
    def __init__(self, start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., records: _Optional[int] = ..., severity: _Optional[_Union[Severity, str]] = ..., features: _Optional[_Iterable[_Union[FeatureDrift, _Mapping]]] = ..., predictions: _Optional[_Iterable[_Union[PredictionDrift, _Mapping]]] = ..., concept: _Optional[_Union[ConceptDrift, _Mapping]] = ...) -> None: ...

class Action(_message.Message):
    __slots__ = ("at", "kind", "detail", "job_id", "window", "features")
    AT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    at: _timestamp_pb2.Timestamp
    kind: str
    detail: str
    job_id: str
    window: TimeRange
    features: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., kind: _Optional[str] = ..., detail: _Optional[str] = ..., job_id: _Optional[str] = ..., window: _Optional[_Union[TimeRange, _Mapping]] = ..., features: _Optional[_Iterable[str]] = ...) -> None: ...

class DriftReport(_message.Message):
    __slots__ = ("endpoint", "reference", "policy", "windows", "actions", "records_received", "records_dropped", "labels_held", "labels_unmatched")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    RECORDS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    RECORDS_DROPPED_FIELD_NUMBER: _ClassVar[int]
    LABELS_HELD_FIELD_NUMBER: _ClassVar[int]
    LABELS_UNMATCHED_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    reference: ReferenceSummary
    policy: MonitoringPolicy
    windows: _containers.RepeatedCompositeFieldContainer[DriftWindow]
    actions: _containers.RepeatedCompositeFieldContainer[Action]
    records_received: int
    records_dropped: int
    labels_held: int
    labels_unmatched: int
    def __init__(self, endpoint: _Optional[str] = ..., reference: _Optional[_Union[ReferenceSummary, _Mapping]] = ..., policy: _Optional[_Union[MonitoringPolicy, _Mapping]] = ..., windows: _Optional[_Iterable[_Union[DriftWindow, _Mapping]]] = ..., actions: _Optional[_Iterable[_Union[Action, _Mapping]]] = ..., records_received: _Optional[int] = ..., records_dropped: _Optional[int] = ..., labels_held: _Optional[int] = ..., labels_unmatched: _Optional[int] = ...) -> None: ...

class GetDriftReportRequest(_message.Message):
    __slots__ = ("endpoint", "windows")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    windows: int
    def __init__(self, endpoint: _Optional[str] = ..., windows: _Optional[int] = ...) -> None: ...

class RecordFeedbackRequest(_message.Message):
    __slots__ = ("endpoint", "labels")
    class Label(_message.Message):
        __slots__ = ("request_id", "number", "text")
        REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
        NUMBER_FIELD_NUMBER: _ClassVar[int]
        TEXT_FIELD_NUMBER: _ClassVar[int]
        request_id: str
        number: float
        text: str
        def __init__(self, request_id: _Optional[str] = ..., number: _Optional[float] = ..., text: _Optional[str] = ...) -> None: ...
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    labels: _containers.RepeatedCompositeFieldContainer[RecordFeedbackRequest.Label]
    def __init__(self, endpoint: _Optional[str] = ..., labels: _Optional[_Iterable[_Union[RecordFeedbackRequest.Label, _Mapping]]] = ...) -> None: ...

class RecordFeedbackResponse(_message.Message):
    __slots__ = ("matched", "unmatched", "held", "duplicate")
    MATCHED_FIELD_NUMBER: _ClassVar[int]
    UNMATCHED_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    matched: int
    unmatched: int
    held: int
    duplicate: int
    def __init__(self, matched: _Optional[int] = ..., unmatched: _Optional[int] = ..., held: _Optional[int] = ..., duplicate: _Optional[int] = ...) -> None: ...
