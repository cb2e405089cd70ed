"""Container health check: asks the grpc.health.v1 service on WEIR_HEALTH_PORT (default 8001, the
data plane; 8011 for a control plane container) and exits 0 only for SERVING."""

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

port = os.environ.get("WEIR_HEALTH_PORT", "8001")
try:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
except grpc.RpcError as error:
    print(f"health check on port {port}: {error.code().name}", file=sys.stderr)  # type: ignore[attr-defined]
    sys.exit(1)
sys.exit(0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1)
