import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ApplyFeaturesRequest(_message.Message):
    __slots__ = ("definitions_toml", "base_directory")
    DEFINITIONS_TOML_FIELD_NUMBER: _ClassVar[int]
    BASE_DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    definitions_toml: str
    base_directory: str
    def __init__(self, definitions_toml: _Optional[str] = ..., base_directory: _Optional[str] = ...) -> None: ...

class GetFeaturesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FeatureDefinitions(_message.Message):
    __slots__ = ("revision", "definitions_toml", "entities", "feature_views", "feature_services")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    DEFINITIONS_TOML_FIELD_NUMBER: _ClassVar[int]
    ENTITIES_FIELD_NUMBER: _ClassVar[int]
    FEATURE_VIEWS_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SERVICES_FIELD_NUMBER: _ClassVar[int]
    revision: int
    definitions_toml: str
    entities: _containers.RepeatedScalarFieldContainer[str]
    feature_views: _containers.RepeatedScalarFieldContainer[str]
    feature_services: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, revision: _Optional[int] = ..., definitions_toml: _Optional[str] = ..., entities: _Optional[_Iterable[str]] = ..., feature_views: _Optional[_Iterable[str]] = ..., feature_services: _Optional[_Iterable[str]] = ...) -> None: ...

class HistoricalFeaturesRequest(_message.Message):
    __slots__ = ("feature_service", "arrow_ipc")
    FEATURE_SERVICE_FIELD_NUMBER: _ClassVar[int]
    ARROW_IPC_FIELD_NUMBER: _ClassVar[int]
    feature_service: str
    arrow_ipc: bytes
    def __init__(self, feature_service: _Optional[str] = ..., arrow_ipc: _Optional[bytes] = ...) -> None: ...

class ArrowChunk(_message.Message):
    __slots__ = ("arrow_ipc", "rows")
    ARROW_IPC_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    arrow_ipc: bytes
    rows: int
    def __init__(self, arrow_ipc: _Optional[bytes] = ..., rows: _Optional[int] = ...) -> None: ...

class MaterializeRequest(_message.Message):
    __slots__ = ("start", "end", "views", "incremental")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    VIEWS_FIELD_NUMBER: _ClassVar[int]
    INCREMENTAL_FIELD_NUMBER: _ClassVar[int]
    start: _timestamp_pb2.Timestamp
    end: _timestamp_pb2.Timestamp
    views: _containers.RepeatedScalarFieldContainer[str]
    incremental: bool
    def __init__(self, start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., views: _Optional[_Iterable[str]] = ..., incremental: bool = ...) -> None: ...

class MaterializeResponse(_message.Message):
    __slots__ = ("written",)
    class WrittenEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    WRITTEN_FIELD_NUMBER: _ClassVar[int]
    written: _containers.ScalarMap[str, int]
    def __init__(self, written: _Optional[_Mapping[str, int]] = ...) -> None: ...

class PushFeaturesRequest(_message.Message):
    __slots__ = ("view", "arrow_ipc")
    VIEW_FIELD_NUMBER: _ClassVar[int]
    ARROW_IPC_FIELD_NUMBER: _ClassVar[int]
    view: str
    arrow_ipc: bytes
    def __init__(self, view: _Optional[str] = ..., arrow_ipc: _Optional[bytes] = ...) -> None: ...

class OnlineFeaturesRequest(_message.Message):
    __slots__ = ("name", "entity_keys")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ENTITY_KEYS_FIELD_NUMBER: _ClassVar[int]
    name: str
    entity_keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., entity_keys: _Optional[_Iterable[str]] = ...) -> None: ...

class OnlineValue(_message.Message):
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

class OnlineFeatureRow(_message.Message):
    __slots__ = ("entity_key", "values", "event_times")
    class EventTimesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _timestamp_pb2.Timestamp
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
    ENTITY_KEY_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    EVENT_TIMES_FIELD_NUMBER: _ClassVar[int]
    entity_key: str
    values: _containers.RepeatedCompositeFieldContainer[OnlineValue]
    event_times: _containers.MessageMap[str, _timestamp_pb2.Timestamp]
    def __init__(self, entity_key: _Optional[str] = ..., values: _Optional[_Iterable[_Union[OnlineValue, _Mapping]]] = ..., event_times: _Optional[_Mapping[str, _timestamp_pb2.Timestamp]] = ...) -> None: ...

class OnlineFeaturesResponse(_message.Message):
    __slots__ = ("feature_names", "rows")
    FEATURE_NAMES_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    feature_names: _containers.RepeatedScalarFieldContainer[str]
    rows: _containers.RepeatedCompositeFieldContainer[OnlineFeatureRow]
    def __init__(self, feature_names: _Optional[_Iterable[str]] = ..., rows: _Optional[_Iterable[_Union[OnlineFeatureRow, _Mapping]]] = ...) -> None: ...
