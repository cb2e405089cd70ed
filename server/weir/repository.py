"""The model repository: which model versions are loaded, their states, loading and unloading.

Layout (Triton's): ``ROOT/<model>/config.pbtxt`` and ``ROOT/<model>/<version>/model.pt|model.pt2``.

The served models live in one dict of immutable ``ServedModel`` snapshots. A (re)load builds and
warms the new versions off the event loop, then replaces the model's snapshot in one assignment:
requests already holding the old ``LoadedVersion`` finish on it, new requests see the new one, and
nobody ever sees a half-loaded model. A failed reload leaves the old snapshot serving.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import hashlib
import logging
from collections.abc import Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from weir.backends.base import Backend
from weir.backends.optimization import AccuracyReport, OptimizationSpec
from weir.backends.tensorrt_backend import PLAN_FILE, TensorRTBackend
from weir.backends.torch_backend import TorchBackend, find_model_file
from weir.batching.batcher import DynamicBatcher
from weir.batching.policy import BatchingConfig
from weir.enrichment import EnrichmentSpec
from weir.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    ModelLoadError,
    NotFoundError,
    UnavailableError,
    WeirError,
    clip,
)
from weir.metrics import Metrics, VersionMetrics
from weir.model_config import (
    ModelSignature,
    conform_outputs,
    load_config_file,
    normalize_config,
    select_versions,
    signature_of,
    unsupported_fields,
)
from weir.monitoring import MonitoringSpec
from weir.statistics import VersionStatistics
from weir.warmup import warmup_samples
from weir_proto.inference import messages as pb

# A model is a directory of the repository and an endpoint's variants are models: no name of
# either is longer than a file name (255 bytes). A longer one is refused before it is looked up
# (and before a message can quote it whole).
MAX_MODEL_NAME_CHARS = 255

log = logging.getLogger(__name__)

MAX_VERSION_DIGITS = 19  # a version number is an int64


class VersionState(enum.Enum):
    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass
class LoadedVersion:
    """One loaded, warmed-up model version and everything the request path needs from it."""

    name: str
    version: int
    config: pb.ModelConfig
    signature: ModelSignature
    backend: Backend
    batcher: DynamicBatcher  # every request of this version is scheduled through it
    metrics: VersionMetrics
    statistics: VersionStatistics
    fingerprint: str = ""  # sha256 of the model file and config: what this version's answers depend on
    enrichment: EnrichmentSpec | None = None  # the feature service its requests are enriched with
    monitoring: MonitoringSpec | None = None  # how many answered requests to sample for drift monitoring

    # Computed once per version, not per request.
    @functools.cached_property
    def version_label(self) -> str:
        return str(self.version)

    @functools.cached_property
    def cache_namespace(self) -> str:
        """Response-cache entries live per version and content: a new version, or the same version
        number reloaded with other files, never sees an old one's answers; replicas that load the
        same files share entries in Redis."""
        return f"{self.name}/{self.version}/{self.fingerprint[:16]}"

    @functools.cached_property
    def response_cache_enabled(self) -> bool:
        return self.config.response_cache.enable


@dataclass(frozen=True)
class ServedModel:
    name: str
    versions: Mapping[int, LoadedVersion]  # never mutated: a reload builds a new ServedModel

    @property
    def latest(self) -> LoadedVersion:
        return self.versions[max(self.versions)]


@dataclass
class Status:
    state: VersionState
    reason: str = ""


def _instance_count_and_device(config: pb.ModelConfig) -> tuple[int, str]:
    count = sum(group.count for group in config.instance_group)
    device = "cpu"
    gpu_groups = [group for group in config.instance_group if group.kind == pb.ModelInstanceGroup.KIND_GPU]
    if gpu_groups:
        import torch

        if not torch.cuda.is_available():
            raise ModelLoadError("instance_group kind KIND_GPU: expected a CUDA device, this machine has none")
        device = f"cuda:{gpu_groups[0].gpus[0] if gpu_groups[0].gpus else 0}"
    return count, device


class ModelRepository:
    def __init__(self, root: Path, executor: Executor, metrics: Metrics) -> None:
        self._root = root
        self._executor = executor
        self._metrics = metrics
        self._served: dict[str, ServedModel] = {}
        self._model_status: dict[str, Status] = {}  # model-level problems (config) and "unloaded"
        self._version_status: dict[str, dict[int, Status]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    # --- lookups on the request path -------------------------------------------------------------

    def resolve(self, name: str, version: str) -> LoadedVersion:
        """The loaded version a request for ``name``/``version`` runs on ('' = the latest)."""
        served = self._served.get(name)
        if served is None:
            status = self._model_status.get(name)
            if status is not None or name in self._version_status:
                reason = status.reason if status else "no version is ready"
                raise UnavailableError(f"model '{name}' is not ready: {reason}")
            raise NotFoundError(f"model_name: unknown model '{clip(name)}'")
        if not version:
            return served.latest
        if not _is_version_number(version):
            raise InvalidArgumentError(
                f"model_version: expected a version number (1 to {MAX_VERSION_DIGITS} ASCII digits), "
                f"got {version[:64]!r}"
            )
        number = int(version)
        loaded = served.versions.get(number)
        if loaded is None:
            state = self._version_status.get(name, {}).get(number)
            if state is not None and state.state != VersionState.READY:
                raise UnavailableError(
                    f"model '{name}' version {number} is not ready: {state.reason or state.state.value}"
                )
            raise NotFoundError(
                f"model_version: model '{name}' has no version {number}; ready versions are {sorted(served.versions)}"
            )
        return loaded

    def accuracy_reports(self) -> list[tuple[str, str, AccuracyReport]]:
        """(model, version, gate figures) of every served version with a lowered precision."""
        reports = []
        for name, served in sorted(self._served.items()):
            for number, loaded in sorted(served.versions.items()):
                report = getattr(loaded.backend, "accuracy", None)
                if report is not None:
                    reports.append((name, str(number), report))
        return reports

    def served_models(self) -> list[ServedModel]:
        return list(self._served.values())

    def ready_versions(self, name: str) -> list[LoadedVersion]:
        """The loaded versions of ``name``, oldest first (empty when it is not served)."""
        served = self._served.get(name)
        return [served.versions[version] for version in sorted(served.versions)] if served else []

    def all_ready(self) -> bool:
        """Server readiness (Triton's strict readiness): every model asked for is loaded."""
        if any(status.reason != "unloaded" for status in self._model_status.values()):
            return False
        return all(name in self._served for name in self._version_status)

    def model_names_on_disk(self) -> list[str]:
        if not self._root.is_dir():
            return []
        return sorted(path.name for path in self._root.iterdir() if path.is_dir() and not path.name.startswith("."))

    def index(self, ready_only: bool) -> list[pb.RepositoryIndexResponse.ModelIndex]:
        entries: list[pb.RepositoryIndexResponse.ModelIndex] = []
        for name in self.model_names_on_disk():
            versions = self._version_status.get(name, {})
            model_status = self._model_status.get(name)
            if not versions:
                if ready_only:
                    continue
                entry = pb.RepositoryIndexResponse.ModelIndex(name=name)
                if model_status is not None:
                    entry.state = model_status.state.value
                    entry.reason = model_status.reason
                entries.append(entry)
                continue
            for version, status in sorted(versions.items()):
                if ready_only and status.state != VersionState.READY:
                    continue
                entries.append(
                    pb.RepositoryIndexResponse.ModelIndex(
                        name=name, version=str(version), state=status.state.value, reason=status.reason
                    )
                )
        return entries

    # --- lifecycle ------------------------------------------------------------------------------

    async def load_all(self) -> None:
        for name in self.model_names_on_disk():
            try:
                await self.load(name)
            except WeirError as error:
                log.error("model failed to load", extra={"model": name, "reason": error.message})

    async def load(self, name: str, config_override: pb.ModelConfig | None = None) -> None:
        """Load (or reload) ``name``: the versions its policy selects, warmed up, swapped in at once."""
        model_dir = self._root / name
        # a name longer than a file name can be is no directory (and is_dir would raise ENAMETOOLONG)
        if (
            not name
            or len(name) > MAX_MODEL_NAME_CHARS
            or "/" in name
            or name.startswith(".")
            or not model_dir.is_dir()
        ):
            raise NotFoundError(f"model_name: no model directory '{clip(name)}' in the repository {self._root}")
        async with self._locks.setdefault(name, asyncio.Lock()):
            try:
                config = await asyncio.get_running_loop().run_in_executor(
                    self._executor, self._read_config, model_dir, name, config_override
                )
            except WeirError as error:
                if config_override is not None:
                    # The caller's config is refused; the model keeps its state (and serving versions).
                    raise InvalidArgumentError(f"failed to load model '{clip(name)}': {error.message}") from error
                self._model_status[name] = Status(VersionState.UNAVAILABLE, error.message)
                raise FailedPreconditionError(f"failed to load model '{clip(name)}': {error.message}") from error
            reported = unsupported_fields(config)
            if reported:
                log.warning("config fields Weir does not act on", extra={"model": name, "fields": reported})
            available = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and _is_version_number(p.name)]
            selected, problems = select_versions(config.version_policy, available)
            if not selected:
                reason = f"no version directory matches the version policy (found {sorted(available)})"
                self._model_status[name] = Status(VersionState.UNAVAILABLE, reason)
                raise FailedPreconditionError(f"failed to load model '{name}': {reason}")
            statuses = {version: Status(VersionState.LOADING) for version in selected}
            previous = self._served.get(name)
            before = self._version_status.get(name)
            self._version_status[name] = {**(before or {}), **statuses}
            loaded: dict[int, LoadedVersion] = {}
            try:
                for version in selected:
                    try:
                        loaded[version] = await self._load_version(name, version, model_dir, config)
                        note = f"unsupported config fields ignored: {', '.join(reported)}" if reported else ""
                        statuses[version] = Status(VersionState.READY, note)
                    except WeirError as error:
                        statuses[version] = Status(VersionState.UNAVAILABLE, error.message)
                        log.error(
                            "model version failed to load",
                            extra={"model": name, "version": version, "reason": error.message},
                        )
            except asyncio.CancelledError:
                # A superseded load (the data plane's reconciler): nothing was swapped in, so the
                # model's states are what they were before it started.
                if before is None:
                    self._version_status.pop(name, None)
                else:
                    self._version_status[name] = before
                raise
            for problem in problems:
                log.error("version policy problem", extra={"model": name, "reason": problem})
            if not loaded:
                # A failed reload keeps the old versions serving (Triton's behaviour).
                still_serving = {v: Status(VersionState.READY) for v in previous.versions} if previous else {}
                self._version_status[name] = {**statuses, **still_serving}
                reasons = "; ".join(f"version {v}: {s.reason}" for v, s in sorted(statuses.items()))
                raise FailedPreconditionError(f"failed to load model '{name}': {reasons}")
            self._served[name] = ServedModel(name, loaded)
            self._model_status.pop(name, None)
            self._version_status[name] = statuses
            self._retire(previous, keep=loaded)
            for version in loaded:
                self._metrics.model_ready.labels(name, str(version)).set(1)
            log.info("model ready", extra={"model": name, "versions": sorted(loaded)})

    async def unload(self, name: str) -> None:
        if name not in self._served and name not in self._version_status:
            # answered before a lock is made for it: unloads of invented names must not grow _locks
            raise NotFoundError(f"model_name: model '{clip(name)}' is not loaded")
        async with self._locks.setdefault(name, asyncio.Lock()):
            served = self._served.pop(name, None)
            if served is None and name not in self._version_status:
                raise NotFoundError(f"model_name: model '{clip(name)}' is not loaded")
            self._version_status.pop(name, None)
            self._model_status[name] = Status(VersionState.UNAVAILABLE, "unloaded")
            self._retire(served, keep={})
            log.info("model unloaded", extra={"model": name})

    async def aclose(self) -> None:
        for name in list(self._served):
            await self.unload(name)

    def _retire(self, previous: ServedModel | None, keep: Mapping[int, LoadedVersion]) -> None:
        """Drop versions that are no longer served. Requests that already hold one finish on it;
        its memory goes when the last of them lets go."""
        if previous is None:
            return
        for version in previous.versions:
            if version not in keep:
                self._metrics.model_ready.remove(previous.name, str(version))

    @staticmethod
    def _read_config(model_dir: Path, name: str, override: pb.ModelConfig | None) -> pb.ModelConfig:
        if override is not None:
            normalized = normalize_config(override, name, source=f"model '{name}' parameters['config']")
        else:
            normalized = normalize_config(load_config_file(model_dir / "config.pbtxt"), name)
        BatchingConfig.from_config(normalized)  # scheduling errors fail the model here, with the field named
        return normalized

    async def _load_version(self, name: str, version: int, model_dir: Path, config: pb.ModelConfig) -> LoadedVersion:
        signature = signature_of(config)
        try:
            enrichment = EnrichmentSpec.from_config(config)
            monitoring = MonitoringSpec.from_config(config)
            optimization = OptimizationSpec.from_config(config)
        except WeirError as error:
            raise ModelLoadError(error.message) from error
        instance_count, device = _instance_count_and_device(config)
        try:
            backend, fingerprint = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._build_and_warm, model_dir, version, config, signature, device, optimization
            )
        except WeirError:
            raise
        except Exception as error:  # e.g. MemoryError: the version fails, the server and other versions stay
            log.exception("model version failed to build", extra={"model": name, "version": version})
            raise ModelLoadError(f"cannot load version {version}: {type(error).__name__}: {error}") from error
        if backend.accuracy is not None:  # the gate's figures, in what ModelConfig answers
            for key, value in backend.accuracy.as_parameters().items():
                config.parameters[key].string_value = value
        statistics = VersionStatistics()
        metrics = VersionMetrics.bind(self._metrics, name, str(version))

        def run_batch(inputs: dict[str, np.ndarray], output_names: list[str], rows: int) -> dict[str, np.ndarray]:
            return conform_outputs(signature, backend.infer(inputs, output_names), rows)

        batcher = DynamicBatcher(
            f"'{name}' version {version}",
            BatchingConfig.from_config(config),
            instance_count,
            self._executor,
            run_batch,
            statistics,
            metrics,
        )
        return LoadedVersion(
            name, version, config, signature, backend, batcher, metrics, statistics, fingerprint, enrichment, monitoring
        )

    def _build_and_warm(
        self,
        model_dir: Path,
        version: int,
        config: pb.ModelConfig,
        signature: ModelSignature,
        device: str,
        optimization: OptimizationSpec,
    ) -> tuple[TorchBackend | TensorRTBackend, str]:
        model_file = find_model_file(model_dir / str(version), config.default_model_filename)
        fingerprint = _content_fingerprint(model_file, config)
        backend: TorchBackend | TensorRTBackend
        if model_file.name == PLAN_FILE or optimization.tensorrt != "off":
            optimization.check("export" if model_file.suffix == ".pt2" else "torchscript", device, config.name)
            precision = optimization.tensorrt if optimization.tensorrt != "off" else "fp32"
            backend = TensorRTBackend(model_file, signature, device, precision, config.name)
        else:
            backend = TorchBackend(model_file, signature, device, optimization, config.name)
        output_names = [spec.name for spec in signature.outputs]
        for inputs, batch_size in warmup_samples(config, signature, model_dir):
            try:
                outputs = backend.infer(inputs, output_names)
                conform_outputs(signature, outputs, batch_size)
            except WeirError as error:
                raise ModelLoadError(f"warm-up failed: {error.message}") from error
            except Exception as error:  # the model's own exception: report it, do not serve it
                raise ModelLoadError(f"warm-up failed: {type(error).__name__}: {error}") from error
        return backend, fingerprint


def _is_version_number(text: str) -> bool:
    """ASCII digits only, at most int64's 19: int() would also take ' 1', '+1', '1_0' or non-ASCII digits,
    each naming another version, and refuses (ValueError) strings of more than 4300 digits."""
    return 0 < len(text) <= MAX_VERSION_DIGITS and text.isascii() and text.isdigit()


def _content_fingerprint(model_file: Path, config: pb.ModelConfig) -> str:
    digest = hashlib.sha256(config.SerializeToString(deterministic=True))
    with model_file.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
