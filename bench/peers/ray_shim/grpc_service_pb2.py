"""Pickle shim for the Ray peer (on PYTHONPATH of every Ray process, nowhere else).

tritonclient's generated classes say ``__module__ == "grpc_service_pb2"``, so Ray, which pickles each
request between its gRPC proxy and the replica, must be able to import that name. Re-export the very
same classes (no second registration of the .proto in protobuf's pool).
"""

from tritonclient.grpc.service_pb2 import *  # noqa: F403
