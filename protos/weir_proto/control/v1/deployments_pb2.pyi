import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from weir_proto.control.v1 import monitoring_pb2 as _monitoring_pb2
from weir_proto.common.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Variant(_message.Message):
    __slots__ = ("name", "model_name", "version", "alias", "weight", "shadow_percent")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    SHADOW_PERCENT_FIELD_NUMBER: _ClassVar[int]
    name: str
    model_name: str
    version: int
    alias: str
    weight: int
    shadow_percent: int
    def __init__(self, name: _Optional[str] = ..., model_name: _Optional[str] = ..., version: _Optional[int] = ..., alias: _Optional[str] = ..., weight: _Optional[int] = ..., shadow_percent: _Optional[int] = ...) -> None: ...

class Deployment(_message.Message):
    __slots__ = ("endpoint", "variants", "resolved", "revision", "updated_by", "created_at", "updated_at", "flags", "routing")
    class FlagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    UPDATED_BY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    ROUTING_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    variants: _containers.RepeatedCompositeFieldContainer[Variant]
    resolved: _containers.RepeatedCompositeFieldContainer[_types_pb2.ModelVersionRef]
    revision: int
    updated_by: str
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    flags: _containers.ScalarMap[str, str]
    routing: RoutingPolicy
    def __init__(self, endpoint: _Optional[str] = ..., variants: _Optional[_Iterable[_Union[Variant, _Mapping]]] = ..., resolved: _Optional[_Iterable[_Union[_types_pb2.ModelVersionRef, _Mapping]]] = ..., revision: _Optional[int] = ..., updated_by: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., flags: _Optional[_Mapping[str, str]] = ..., routing: _Optional[_Union[RoutingPolicy, _Mapping]] = ...) -> None: ...

class RoutingPolicy(_message.Message):
    __slots__ = ("key_parameter", "key_header")
    KEY_PARAMETER_FIELD_NUMBER: _ClassVar[int]
    KEY_HEADER_FIELD_NUMBER: _ClassVar[int]
    key_parameter: str
    key_header: str
    def __init__(self, key_parameter: _Optional[str] = ..., key_header: _Optional[str] = ...) -> None: ...

class SetTrafficRequest(_message.Message):
    __slots__ = ("endpoint", "variants", "routing")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    ROUTING_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    variants: _containers.RepeatedCompositeFieldContainer[Variant]
    routing: RoutingPolicy
    def __init__(self, endpoint: _Optional[str] = ..., variants: _Optional[_Iterable[_Union[Variant, _Mapping]]] = ..., routing: _Optional[_Union[RoutingPolicy, _Mapping]] = ...) -> None: ...

class SetFlagRequest(_message.Message):
    __slots__ = ("endpoint", "name", "value")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    name: str
    value: str
    def __init__(self, endpoint: _Optional[str] = ..., name: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class DeployRequest(_message.Message):
    __slots__ = ("endpoint", "model_name", "version", "alias")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    model_name: str
    version: int
    alias: str
    def __init__(self, endpoint: _Optional[str] = ..., model_name: _Optional[str] = ..., version: _Optional[int] = ..., alias: _Optional[str] = ...) -> None: ...

class UndeployRequest(_message.Message):
    __slots__ = ("endpoint",)
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    def __init__(self, endpoint: _Optional[str] = ...) -> None: ...

class UndeployResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetDeploymentRequest(_message.Message):
    __slots__ = ("endpoint",)
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    def __init__(self, endpoint: _Optional[str] = ...) -> None: ...

class ListDeploymentsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListDeploymentsResponse(_message.Message):
    __slots__ = ("deployments", "next_page_token")
    DEPLOYMENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    deployments: _containers.RepeatedCompositeFieldContainer[Deployment]
    next_page_token: str
    def __init__(self, deployments: _Optional[_Iterable[_Union[Deployment, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ListReplicasRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListReplicasResponse(_message.Message):
    __slots__ = ("replicas",)
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaInfo]
    def __init__(self, replicas: _Optional[_Iterable[_Union[ReplicaInfo, _Mapping]]] = ...) -> None: ...

class ReplicaInfo(_message.Message):
    __slots__ = ("replica_id", "address", "attached_at", "last_heartbeat", "status", "identity")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ATTACHED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    address: str
    attached_at: _timestamp_pb2.Timestamp
    last_heartbeat: _timestamp_pb2.Timestamp
    status: ReplicaStatus
    identity: str
    def __init__(self, replica_id: _Optional[str] = ..., address: _Optional[str] = ..., attached_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_heartbeat: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., status: _Optional[_Union[ReplicaStatus, _Mapping]] = ..., identity: _Optional[str] = ...) -> None: ...

class DataPlaneMessage(_message.Message):
    __slots__ = ("hello", "heartbeat", "status", "records")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    heartbeat: Heartbeat
    status: ReplicaStatus
    records: _monitoring_pb2.InferenceRecords
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., status: _Optional[_Union[ReplicaStatus, _Mapping]] = ..., records: _Optional[_Union[_monitoring_pb2.InferenceRecords, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("replica_id", "address", "weir_version", "status")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    WEIR_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    address: str
    weir_version: str
    status: ReplicaStatus
    def __init__(self, replica_id: _Optional[str] = ..., address: _Optional[str] = ..., weir_version: _Optional[str] = ..., status: _Optional[_Union[ReplicaStatus, _Mapping]] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("sent_at",)
    SENT_AT_FIELD_NUMBER: _ClassVar[int]
    sent_at: _timestamp_pb2.Timestamp
    def __init__(self, sent_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ReplicaStatus(_message.Message):
    __slots__ = ("applied_revision", "endpoints", "shadows", "variants")
    APPLIED_REVISION_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    SHADOWS_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    applied_revision: int
    endpoints: _containers.RepeatedCompositeFieldContainer[EndpointStatus]
    shadows: _containers.RepeatedCompositeFieldContainer[ShadowStats]
    variants: _containers.RepeatedCompositeFieldContainer[VariantStats]
    def __init__(self, applied_revision: _Optional[int] = ..., endpoints: _Optional[_Iterable[_Union[EndpointStatus, _Mapping]]] = ..., shadows: _Optional[_Iterable[_Union[ShadowStats, _Mapping]]] = ..., variants: _Optional[_Iterable[_Union[VariantStats, _Mapping]]] = ...) -> None: ...

class VariantStats(_message.Message):
    __slots__ = ("endpoint", "variant", "version", "succeeded", "failed", "latency_bounds_seconds", "latency_counts")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SUCCEEDED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    LATENCY_BOUNDS_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_COUNTS_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    variant: str
    version: int
    succeeded: int
    failed: int
    latency_bounds_seconds: _containers.RepeatedScalarFieldContainer[float]
    latency_counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, endpoint: _Optional[str] = ..., variant: _Optional[str] = ..., version: _Optional[int] = ..., succeeded: _Optional[int] = ..., failed: _Optional[int] = ..., latency_bounds_seconds: _Optional[_Iterable[float]] = ..., latency_counts: _Optional[_Iterable[int]] = ...) -> None: ...

class ShadowStats(_message.Message):
    __slots__ = ("endpoint", "shadow", "mirrored", "errors", "dropped", "rows", "rows_agreeing", "max_abs_diff", "rows_within_tolerance")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    MIRRORED_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    ROWS_AGREEING_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_DIFF_FIELD_NUMBER: _ClassVar[int]
    ROWS_WITHIN_TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    shadow: str
    mirrored: int
    errors: int
    dropped: int
    rows: int
    rows_agreeing: int
    max_abs_diff: float
    rows_within_tolerance: int
    def __init__(self, endpoint: _Optional[str] = ..., shadow: _Optional[str] = ..., mirrored: _Optional[int] = ..., errors: _Optional[int] = ..., dropped: _Optional[int] = ..., rows: _Optional[int] = ..., rows_agreeing: _Optional[int] = ..., max_abs_diff: _Optional[float] = ..., rows_within_tolerance: _Optional[int] = ...) -> None: ...

class EndpointStatus(_message.Message):
    __slots__ = ("endpoint", "state", "desired", "serving", "message", "variant")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[EndpointStatus.State]
        LOADING: _ClassVar[EndpointStatus.State]
        READY: _ClassVar[EndpointStatus.State]
        FAILED: _ClassVar[EndpointStatus.State]
    STATE_UNSPECIFIED: EndpointStatus.State
    LOADING: EndpointStatus.State
    READY: EndpointStatus.State
    FAILED: EndpointStatus.State
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DESIRED_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    state: EndpointStatus.State
    desired: _types_pb2.ModelVersionRef
    serving: _types_pb2.ModelVersionRef
    message: str
    variant: str
    def __init__(self, endpoint: _Optional[str] = ..., state: _Optional[_Union[EndpointStatus.State, str]] = ..., desired: _Optional[_Union[_types_pb2.ModelVersionRef, _Mapping]] = ..., serving: _Optional[_Union[_types_pb2.ModelVersionRef, _Mapping]] = ..., message: _Optional[str] = ..., variant: _Optional[str] = ...) -> None: ...

class ControlPlaneMessage(_message.Message):
    __slots__ = ("desired_state",)
    DESIRED_STATE_FIELD_NUMBER: _ClassVar[int]
    desired_state: DesiredState
    def __init__(self, desired_state: _Optional[_Union[DesiredState, _Mapping]] = ...) -> None: ...

class DesiredState(_message.Message):
    __slots__ = ("revision", "endpoints", "feature_definitions_toml", "online_store")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    FEATURE_DEFINITIONS_TOML_FIELD_NUMBER: _ClassVar[int]
    ONLINE_STORE_FIELD_NUMBER: _ClassVar[int]
    revision: int
    endpoints: _containers.RepeatedCompositeFieldContainer[EndpointState]
    feature_definitions_toml: str
    online_store: str
    def __init__(self, revision: _Optional[int] = ..., endpoints: _Optional[_Iterable[_Union[EndpointState, _Mapping]]] = ..., feature_definitions_toml: _Optional[str] = ..., online_store: _Optional[str] = ...) -> None: ...

class EndpointState(_message.Message):
    __slots__ = ("endpoint", "variants", "flags", "routing")
    class FlagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    ROUTING_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    variants: _containers.RepeatedCompositeFieldContainer[ResolvedVariant]
    flags: _containers.ScalarMap[str, str]
    routing: RoutingPolicy
    def __init__(self, endpoint: _Optional[str] = ..., variants: _Optional[_Iterable[_Union[ResolvedVariant, _Mapping]]] = ..., flags: _Optional[_Mapping[str, str]] = ..., routing: _Optional[_Union[RoutingPolicy, _Mapping]] = ...) -> None: ...

class ResolvedVariant(_message.Message):
    __slots__ = ("name", "model", "artifact_sha256", "artifact_size", "artifact_filename", "config_pbtxt", "weight", "shadow_percent")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_SHA256_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_SIZE_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_FILENAME_FIELD_NUMBER: _ClassVar[int]
    CONFIG_PBTXT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    SHADOW_PERCENT_FIELD_NUMBER: _ClassVar[int]
    name: str
    model: _types_pb2.ModelVersionRef
    artifact_sha256: str
    artifact_size: int
    artifact_filename: str
    config_pbtxt: str
    weight: int
    shadow_percent: int
    def __init__(self, name: _Optional[str] = ..., model: _Optional[_Union[_types_pb2.ModelVersionRef, _Mapping]] = ..., artifact_sha256: _Optional[str] = ..., artifact_size: _Optional[int] = ..., artifact_filename: _Optional[str] = ..., config_pbtxt: _Optional[str] = ..., weight: _Optional[int] = ..., shadow_percent: _Optional[int] = ...) -> None: ...
