"""Installing a variant's artifact into the managed repository, from whichever control plane is attached.

An install fetches the artifact (streamed into ``.artifacts/<sha256>``, checked against its sha256,
kept for the next install of the same bytes) and the version's validation inputs, writes the version
directory, and loads the model from the config the control plane sent (no round trip through a file:
the repository gets the config itself). Only once the version serves does the directory get its
``config.pbtxt`` and ``weir-served.txt``: the last-known-good copy a restart without the control
plane loads, never a half-installed one.

A download whose control plane goes away waits for the next attach (to any replica) and starts again
there: downloads go to whichever control plane is reachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import grpc
from google.protobuf import text_format

from weir.errors import WeirError
from weir.model_config import parse_config_text
from weir.reconciler import Target
from weir.repository import ModelRepository
from weir_proto.auth import client_metadata
from weir_proto.control.v1 import deployments_pb2, registry_pb2, registry_pb2_grpc
from weir_proto.inference import messages as inference
from weir_proto.validation_inputs import MAX_VALIDATION_BYTES, VALIDATION_FILENAME

ARTIFACTS_DIR = ".artifacts"  # dot-prefixed: the repository never mistakes it for a model
SERVED_MARKER = "weir-served.txt"  # in each variant's directory: registry model, version, sha256
# A download broken by its control plane going away waits this long for an attach to another one.
REATTACH_WAIT_SECONDS = 30.0
_GONE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)

Result = TypeVar("Result")


class RegistryLink:
    """The registry of the control plane attached now (none between attaches), for downloads that
    outlive one attach."""

    def __init__(self) -> None:
        self._stub: registry_pb2_grpc.RegistryStub | None = None
        self._generation = 0
        self._changed = asyncio.Condition()

    async def up(self, stub: registry_pb2_grpc.RegistryStub) -> None:
        async with self._changed:
            self._generation += 1
            self._stub = stub
            self._changed.notify_all()

    def down(self) -> None:
        self._stub = None

    async def registry(self, newer_than: int = 0) -> tuple[registry_pb2_grpc.RegistryStub, int]:
        """The attached registry, waiting for an attach (one after ``newer_than``) if needed."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._stub is not None and self._generation > newer_than)
            assert self._stub is not None
            return self._stub, self._generation


class Installer:
    def __init__(self, root: Path, repository: ModelRepository, link: RegistryLink, token: str | None) -> None:
        self._root = root
        self._artifacts = root / ARTIFACTS_DIR
        self._repository = repository
        self._link = link
        self._token = token

    async def install(self, model: str, variant: deployments_pb2.ResolvedVariant) -> None:
        """Fetch, write and load ``variant`` under ``model``; it serves when this returns. Raises
        WeirError, grpc.aio.AioRpcError or OSError when it cannot (what served before keeps serving)."""
        blob = await self._reachable(lambda registry: self._fetch(variant, registry))
        validation = await self._reachable(lambda registry: self._fetch_validation(variant, registry))
        config = parse_config_text(variant.config_pbtxt, f"the config of {variant.model.model_name} "
                                                          f"version {variant.model.version}")  # fmt: skip
        config.name = model  # endpoint@variant; clients call the endpoint and the router picks this
        config.version_policy.Clear()
        config.version_policy.specific.versions.append(variant.model.version)
        version_dir = self._root / model / str(variant.model.version)
        await asyncio.to_thread(_write_version, version_dir, variant.artifact_filename, blob, validation)
        await self._repository.load(model, config_override=config)
        # serving now: the last-known-good copy a restart loads (config first, then the marker)
        target = Target.of(variant)
        await asyncio.to_thread(_write_last_known_good, self._root / model, config_text(config), target)

    def forget(self, model: str) -> None:
        """Remove a model directory nothing serves from (an install that never finished, an unload)."""
        shutil.rmtree(self._root / model, ignore_errors=True)

    async def _reachable(self, fetch: Callable[[registry_pb2_grpc.RegistryStub], Awaitable[Result]]) -> Result:
        """``fetch`` from the attached control plane; again from the next one attached if that one
        goes away under it."""
        newer_than = 0
        while True:
            registry, generation = await self._link.registry(newer_than)
            try:
                return await fetch(registry)
            except grpc.aio.AioRpcError as error:
                if error.code() not in _GONE:
                    raise
                try:
                    async with asyncio.timeout(REATTACH_WAIT_SECONDS):
                        await self._link.registry(generation)
                except TimeoutError:
                    raise error from None
                newer_than = generation

    async def _fetch_validation(
        self, variant: deployments_pb2.ResolvedVariant, registry: registry_pb2_grpc.RegistryStub
    ) -> bytes | None:
        """The version's validation inputs (at most MAX_VALIDATION_BYTES, sha256 checked), or None when
        it has none."""
        request = registry_pb2.DownloadArtifactRequest(
            model_name=variant.model.model_name, version=variant.model.version, validation=True
        )
        parts: list[bytes] = []
        expected, size = "", 0
        try:
            async for part in registry.DownloadArtifact(request, metadata=client_metadata(self._token)):
                if part.WhichOneof("part") == "header":
                    if part.header.artifact_filename != VALIDATION_FILENAME:
                        return None  # a control plane that predates validation inputs sent the model itself
                    expected = part.header.artifact_sha256
                    continue
                size += len(part.chunk)
                if size > MAX_VALIDATION_BYTES:
                    raise WeirError(f"validation inputs of {variant.model.model_name}: over {MAX_VALIDATION_BYTES} B")
                parts.append(part.chunk)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        data = b"".join(parts)
        if hashlib.sha256(data).hexdigest() != expected:
            raise WeirError(f"validation inputs of {variant.model.model_name}: the bytes do not hash to {expected}")
        return data

    async def _fetch(self, variant: deployments_pb2.ResolvedVariant, registry: registry_pb2_grpc.RegistryStub) -> Path:
        """The artifact from the local cache, or downloaded into it and checked against its sha256."""
        cached = self._artifacts / variant.artifact_sha256
        if cached.is_file():
            return cached
        request = registry_pb2.DownloadArtifactRequest(
            model_name=variant.model.model_name, version=variant.model.version
        )
        digest = hashlib.sha256()
        self._artifacts.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=self._artifacts, prefix=".download-")
        try:
            with os.fdopen(descriptor, "wb") as handle:
                async for part in registry.DownloadArtifact(request, metadata=client_metadata(self._token)):
                    if part.WhichOneof("part") == "chunk":
                        digest.update(part.chunk)
                        await asyncio.to_thread(handle.write, part.chunk)
                await asyncio.to_thread(handle.flush)
                await asyncio.to_thread(os.fsync, handle.fileno())
            if digest.hexdigest() != variant.artifact_sha256:
                raise WeirError(
                    f"artifact of {variant.model.model_name} version {variant.model.version}: expected sha256 "
                    f"{variant.artifact_sha256}, the downloaded bytes hash to {digest.hexdigest()}"
                )
            os.replace(temporary, cached)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
        return cached


def config_text(config: inference.ModelConfig) -> str:
    return text_format.MessageToString(config)


def read_served_marker(model_dir: Path) -> Target | None:
    marker = model_dir / SERVED_MARKER
    if not marker.is_file():
        return None
    name, version, sha256 = marker.read_text().split()
    return Target(name, int(version), sha256)


def _write_version(version_dir: Path, filename: str, blob: Path, validation: bytes | None) -> None:
    version_dir.mkdir(parents=True, exist_ok=True)
    target = version_dir / filename
    staged = version_dir / f".{filename}.incoming"
    with contextlib.suppress(FileNotFoundError):
        staged.unlink()
    try:
        os.link(blob, staged)  # the cache and the version share one copy on disk
    except OSError:
        shutil.copyfile(blob, staged)
    os.replace(staged, target)
    if validation is not None:
        staged_inputs = version_dir / f".{VALIDATION_FILENAME}.incoming"
        staged_inputs.write_bytes(validation)
        os.replace(staged_inputs, version_dir / VALIDATION_FILENAME)


def _write_last_known_good(model_dir: Path, config: str, target: Target) -> None:
    write_atomically(model_dir / "config.pbtxt", config)
    write_atomically(model_dir / SERVED_MARKER, f"{target.model_name} {target.version} {target.sha256}\n")
    for path in model_dir.iterdir():  # the versions served before this one
        if path.is_dir() and path.name.isdigit() and int(path.name) != target.version:
            shutil.rmtree(path, ignore_errors=True)


def write_atomically(path: Path, text: str) -> None:
    staged = path.with_name(f".{path.name}.incoming")
    staged.write_text(text)
    os.replace(staged, path)
