"""Weir's data plane: an Open Inference (KServe V2) gRPC server for PyTorch models."""

__version__ = "0.1.0"
