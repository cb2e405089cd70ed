"""Message classes of the ``inference`` protos, built from Weir's private descriptor pool.

Type checkers read the generated stubs (``grpc_service_pb2.pyi``, ``model_config_pb2.pyi``); at run
time the same names come from ``weir_proto.inference.pool`` so that nothing is registered in
protobuf's default pool.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from weir_proto.inference.grpc_service_pb2 import *  # noqa: F403
    from weir_proto.inference.model_config_pb2 import *  # noqa: F403
else:
    from weir_proto.inference.pool import module_namespace

    globals().update(module_namespace())
    del module_namespace
