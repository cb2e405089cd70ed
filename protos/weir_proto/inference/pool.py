"""A private descriptor pool holding Weir's copy of the ``inference`` protos.

tritonclient, kserve and mlserver each register ``inference.*`` in protobuf's default pool, and a
second registration of the same symbol fails ("duplicate symbol 'inference.ServerLiveRequest'").
Weir shares only the wire format and the method paths with them, so it loads its descriptors from
the committed descriptor set into a pool of its own and builds its message classes from there.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, ServiceDescriptor
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

SERVICE_NAME = "inference.GRPCInferenceService"
_PROTO_FILES = ("weir_proto/inference/model_config.proto", "weir_proto/inference/grpc_service.proto")


def _load_pool() -> descriptor_pool.DescriptorPool:
    descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(
        resources.files(__package__).joinpath("inference_descriptors.binpb").read_bytes()
    )
    pool = descriptor_pool.DescriptorPool()
    for file_proto in descriptor_set.file:
        pool.Add(file_proto)
    return pool


POOL = _load_pool()
SERVICE: ServiceDescriptor = POOL.FindServiceByName(SERVICE_NAME)


def add_file_to_pool(file_descriptor: Any) -> None:
    """Copy a file descriptor (e.g. grpc.health.v1) into the private pool, so that server
    reflection, which reads one pool, can describe every service Weir serves."""
    file_proto = descriptor_pb2.FileDescriptorProto()
    file_descriptor.CopyToProto(file_proto)
    try:
        POOL.FindFileByName(file_proto.name)
    except KeyError:
        for dependency in file_descriptor.dependencies:
            add_file_to_pool(dependency)
        POOL.Add(file_proto)


def module_namespace() -> dict[str, Any]:
    """Top-level message classes, enum wrappers and enum values of every ``inference`` file,
    under the names the generated ``*_pb2.pyi`` stubs declare."""
    namespace: dict[str, Any] = {}
    for file_name in _PROTO_FILES:
        file_descriptor = POOL.FindFileByName(file_name)
        message_descriptors: list[Descriptor] = list(file_descriptor.message_types_by_name.values())
        for message_class in message_factory.GetMessageClassesForFiles([file_name], POOL).values():
            if message_class.DESCRIPTOR in message_descriptors:
                namespace[message_class.DESCRIPTOR.name] = message_class
        for enum_name, enum_descriptor in file_descriptor.enum_types_by_name.items():
            namespace[enum_name] = EnumTypeWrapper(enum_descriptor)
            for value in enum_descriptor.values:
                namespace[value.name] = value.number
    return namespace
