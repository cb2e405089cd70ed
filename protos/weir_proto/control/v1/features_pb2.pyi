from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class ApplyFeaturesRequest(_message.Message):
    __slots__ = ("definitions_toml",)
    DEFINITIONS_TOML_FIELD_NUMBER: _ClassVar[int]
    definitions_toml: str
    def __init__(self, definitions_toml: _Optional[str] = ...) -> None: ...

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
