import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from weir_proto.common.v1 import types_pb2 as _types_pb2
from weir_proto.control.v1 import rollouts_pb2 as _rollouts_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ParamValue(_message.Message):
    __slots__ = ("number", "integer", "text", "flag")
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    INTEGER_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FLAG_FIELD_NUMBER: _ClassVar[int]
    number: float
    integer: int
    text: str
    flag: bool
    def __init__(self, number: _Optional[float] = ..., integer: _Optional[int] = ..., text: _Optional[str] = ..., flag: bool = ...) -> None: ...

class RegisterSpec(_message.Message):
    __slots__ = ("model_name", "aliases", "canary")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    CANARY_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    aliases: _containers.RepeatedScalarFieldContainer[str]
    canary: _rollouts_pb2.StartRolloutRequest
    def __init__(self, model_name: _Optional[str] = ..., aliases: _Optional[_Iterable[str]] = ..., canary: _Optional[_Union[_rollouts_pb2.StartRolloutRequest, _Mapping]] = ...) -> None: ...

class JobSpec(_message.Message):
    __slots__ = ("entrypoint", "code_archive", "parameters", "processes_per_node", "nodes", "max_retries", "timeout_seconds", "checkpoint_every_epochs", "register")
    class ParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: ParamValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[ParamValue, _Mapping]] = ...) -> None: ...
    ENTRYPOINT_FIELD_NUMBER: _ClassVar[int]
    CODE_ARCHIVE_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_PER_NODE_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    MAX_RETRIES_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    REGISTER_FIELD_NUMBER: _ClassVar[int]
    entrypoint: str
    code_archive: bytes
    parameters: _containers.MessageMap[str, ParamValue]
    processes_per_node: int
    nodes: int
    max_retries: int
    timeout_seconds: float
    checkpoint_every_epochs: int
    register: RegisterSpec
    def __init__(self, entrypoint: _Optional[str] = ..., code_archive: _Optional[bytes] = ..., parameters: _Optional[_Mapping[str, ParamValue]] = ..., processes_per_node: _Optional[int] = ..., nodes: _Optional[int] = ..., max_retries: _Optional[int] = ..., timeout_seconds: _Optional[float] = ..., checkpoint_every_epochs: _Optional[int] = ..., register: _Optional[_Union[RegisterSpec, _Mapping]] = ...) -> None: ...

class ParamSpace(_message.Message):
    __slots__ = ("values", "low", "high", "log", "integer")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    LOW_FIELD_NUMBER: _ClassVar[int]
    HIGH_FIELD_NUMBER: _ClassVar[int]
    LOG_FIELD_NUMBER: _ClassVar[int]
    INTEGER_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedCompositeFieldContainer[ParamValue]
    low: float
    high: float
    log: bool
    integer: bool
    def __init__(self, values: _Optional[_Iterable[_Union[ParamValue, _Mapping]]] = ..., low: _Optional[float] = ..., high: _Optional[float] = ..., log: bool = ..., integer: bool = ...) -> None: ...

class SweepSpec(_message.Message):
    __slots__ = ("template", "space", "method", "trials", "parallelism", "metric", "maximize", "median_stopping", "median_min_steps", "seed")
    class SpaceEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: ParamSpace
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[ParamSpace, _Mapping]] = ...) -> None: ...
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    SPACE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    TRIALS_FIELD_NUMBER: _ClassVar[int]
    PARALLELISM_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    MAXIMIZE_FIELD_NUMBER: _ClassVar[int]
    MEDIAN_STOPPING_FIELD_NUMBER: _ClassVar[int]
    MEDIAN_MIN_STEPS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    template: JobSpec
    space: _containers.MessageMap[str, ParamSpace]
    method: str
    trials: int
    parallelism: int
    metric: str
    maximize: bool
    median_stopping: bool
    median_min_steps: int
    seed: int
    def __init__(self, template: _Optional[_Union[JobSpec, _Mapping]] = ..., space: _Optional[_Mapping[str, ParamSpace]] = ..., method: _Optional[str] = ..., trials: _Optional[int] = ..., parallelism: _Optional[int] = ..., metric: _Optional[str] = ..., maximize: bool = ..., median_stopping: bool = ..., median_min_steps: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("epoch", "total_epochs", "step", "message")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TOTAL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    total_epochs: int
    step: int
    message: str
    def __init__(self, epoch: _Optional[int] = ..., total_epochs: _Optional[int] = ..., step: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "kind", "parent_id", "spec", "sweep", "code_hash", "state", "exit_code", "reason", "attempt", "submitted_by", "created_at", "started_at", "finished_at", "logged_params", "metrics", "progress", "dataset_hash", "registered", "trials", "best_trial", "best_value")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Job.State]
        QUEUED: _ClassVar[Job.State]
        RUNNING: _ClassVar[Job.State]
        SUCCEEDED: _ClassVar[Job.State]
        FAILED: _ClassVar[Job.State]
        CANCELLED: _ClassVar[Job.State]
    STATE_UNSPECIFIED: Job.State
    QUEUED: Job.State
    RUNNING: Job.State
    SUCCEEDED: Job.State
    FAILED: Job.State
    CANCELLED: Job.State
    class LoggedParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PARENT_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    SWEEP_FIELD_NUMBER: _ClassVar[int]
    CODE_HASH_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_BY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    LOGGED_PARAMS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    DATASET_HASH_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    TRIALS_FIELD_NUMBER: _ClassVar[int]
    BEST_TRIAL_FIELD_NUMBER: _ClassVar[int]
    BEST_VALUE_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: str
    parent_id: str
    spec: JobSpec
    sweep: SweepSpec
    code_hash: str
    state: Job.State
    exit_code: int
    reason: str
    attempt: int
    submitted_by: str
    created_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    logged_params: _containers.ScalarMap[str, str]
    metrics: _containers.ScalarMap[str, float]
    progress: Progress
    dataset_hash: str
    registered: _types_pb2.ModelVersionRef
    trials: _containers.RepeatedScalarFieldContainer[str]
    best_trial: str
    best_value: float
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[str] = ..., parent_id: _Optional[str] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., sweep: _Optional[_Union[SweepSpec, _Mapping]] = ..., code_hash: _Optional[str] = ..., state: _Optional[_Union[Job.State, str]] = ..., exit_code: _Optional[int] = ..., reason: _Optional[str] = ..., attempt: _Optional[int] = ..., submitted_by: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., logged_params: _Optional[_Mapping[str, str]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., dataset_hash: _Optional[str] = ..., registered: _Optional[_Union[_types_pb2.ModelVersionRef, _Mapping]] = ..., trials: _Optional[_Iterable[str]] = ..., best_trial: _Optional[str] = ..., best_value: _Optional[float] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("id", "spec")
    ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    id: str
    spec: JobSpec
    def __init__(self, id: _Optional[str] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ...) -> None: ...

class SubmitSweepRequest(_message.Message):
    __slots__ = ("id", "sweep")
    ID_FIELD_NUMBER: _ClassVar[int]
    SWEEP_FIELD_NUMBER: _ClassVar[int]
    id: str
    sweep: SweepSpec
    def __init__(self, id: _Optional[str] = ..., sweep: _Optional[_Union[SweepSpec, _Mapping]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("state", "kind", "parent_id", "page_size", "page_token")
    STATE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PARENT_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    state: Job.State
    kind: str
    parent_id: str
    page_size: int
    page_token: str
    def __init__(self, state: _Optional[_Union[Job.State, str]] = ..., kind: _Optional[str] = ..., parent_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class StreamLogsRequest(_message.Message):
    __slots__ = ("id", "follow", "offset")
    ID_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    id: str
    follow: bool
    offset: int
    def __init__(self, id: _Optional[str] = ..., follow: bool = ..., offset: _Optional[int] = ...) -> None: ...

class LogChunk(_message.Message):
    __slots__ = ("data", "offset")
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    offset: int
    def __init__(self, data: _Optional[bytes] = ..., offset: _Optional[int] = ...) -> None: ...

class StreamMetricsRequest(_message.Message):
    __slots__ = ("id", "follow")
    ID_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    id: str
    follow: bool
    def __init__(self, id: _Optional[str] = ..., follow: bool = ...) -> None: ...

class MetricPoint(_message.Message):
    __slots__ = ("key", "step", "value", "at")
    KEY_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    key: str
    step: int
    value: float
    at: _timestamp_pb2.Timestamp
    def __init__(self, key: _Optional[str] = ..., step: _Optional[int] = ..., value: _Optional[float] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("metric", "progress", "state")
    METRIC_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    metric: MetricPoint
    progress: Progress
    state: Job.State
    def __init__(self, metric: _Optional[_Union[MetricPoint, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., state: _Optional[_Union[Job.State, str]] = ...) -> None: ...

class LogParamsRequest(_message.Message):
    __slots__ = ("job_id", "params", "dataset_hash")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    DATASET_HASH_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    params: _containers.ScalarMap[str, str]
    dataset_hash: str
    def __init__(self, job_id: _Optional[str] = ..., params: _Optional[_Mapping[str, str]] = ..., dataset_hash: _Optional[str] = ...) -> None: ...

class LogMetricsRequest(_message.Message):
    __slots__ = ("job_id", "points")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    POINTS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    points: _containers.RepeatedCompositeFieldContainer[MetricPoint]
    def __init__(self, job_id: _Optional[str] = ..., points: _Optional[_Iterable[_Union[MetricPoint, _Mapping]]] = ...) -> None: ...

class ReportProgressRequest(_message.Message):
    __slots__ = ("job_id", "progress")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    progress: Progress
    def __init__(self, job_id: _Optional[str] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ...) -> None: ...

class TrackingAck(_message.Message):
    __slots__ = ("stop",)
    STOP_FIELD_NUMBER: _ClassVar[int]
    stop: bool
    def __init__(self, stop: bool = ...) -> None: ...
