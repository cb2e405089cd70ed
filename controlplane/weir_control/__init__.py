"""Weir's control plane: model registry, artifact store, deployments and the attach stream that
data planes follow. Runs as ``weir control`` (or inside ``weir up``); talks to data planes only
through the ``weir.control.v1`` protos."""

__version__ = "0.1.0"
