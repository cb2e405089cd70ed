"""The one mapping from Weir's error kinds to gRPC status codes (shared with the control plane)."""

from weir_proto.errors import STATUS_CODE_BY_KIND, status_code_for

__all__ = ["STATUS_CODE_BY_KIND", "status_code_for"]
