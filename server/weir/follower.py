"""Following a control plane: the data plane side of the attach stream.

With ``--control-plane ADDR`` the model repository directory is Weir's to manage: it holds, per
endpoint, the version the control plane wants served. The follower

1. loads what the directory already holds (the last-known-good state), so a restart serves at once
   even when the control plane is away;
2. attaches (one bidirectional stream), says hello with what it serves, heartbeats;
3. on every desired state: for each endpoint whose target changed, fetches the artifact it lacks
   (streamed, sha256-checked, kept by digest under ``.artifacts/``), writes the version directory and
   a config naming that version, loads it (warm-up included) while the old one keeps serving, and
   only then lets the endpoint route to it; a version that fails to load is reported FAILED and the
   old one keeps serving. Endpoints no longer desired are unloaded;
4. reports its status after every change; when the stream breaks it keeps serving and reconnects
   with exponential backoff, then reconciles against the state it is sent.

It talks to the control plane only through the ``weir.control.v1`` protos.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf import text_format

from weir import __version__
from weir.errors import WeirError
from weir.monitoring import RecordBuffer, to_records
from weir.repository import ModelRepository
from weir.routing import (
    DEFAULT_KEY_PARAMETER,
    SEPARATOR,
    EndpointRoute,
    Router,
    ShadowRoute,
    VariantRoute,
    variant_model,
)
from weir.shadow import ShadowMirror
from weir_proto.auth import client_metadata
from weir_proto.common.v1 import types_pb2
from weir_proto.control.v1 import (
    deployments_pb2,
    deployments_pb2_grpc,
    monitoring_pb2,
    registry_pb2,
    registry_pb2_grpc,
)
from weir_proto.inference import messages as inference
from weir_proto.tls import ClientTLS
from weir_proto.validation_inputs import MAX_VALIDATION_BYTES, VALIDATION_FILENAME

log = logging.getLogger(__name__)

ARTIFACTS_DIR = ".artifacts"  # dot-prefixed: the repository never mistakes it for a model
ROUTES_FILE = ".routes.json"  # the traffic policy last applied, for a restart without the control plane
RECORDS_SECONDS = 0.5  # how often sampled inference records are shipped
RECORDS_PER_MESSAGE = 5000
SERVED_MARKER = "weir-served.txt"  # in each variant's directory: registry model, version, sha256
EndpointState = deployments_pb2.EndpointStatus


@dataclass(frozen=True)
class FollowerSettings:
    address: str  # the control plane, HOST:PORT
    token: str | None
    replica_id: str
    serving_address: str  # where this replica serves inference, reported to the control plane
    heartbeat_seconds: float = 5.0
    max_backoff_seconds: float = 2.0  # with jitter at most 3 s: a restarted control plane is followed again soon
    refused_backoff_seconds: float = 30.0  # a refused token: retrying soon would not help
    tls: ClientTLS | None = None


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class _Served:
    model: types_pb2.ModelVersionRef
    sha256: str


class ControlPlaneFollower:
    def __init__(
        self,
        settings: FollowerSettings,
        repository: ModelRepository,
        router: Router,
        root: Path,
        on_change: Callable[[], Awaitable[None]],
        shadows: ShadowMirror | None = None,
        on_features: Callable[[str, str], None] | None = None,
        records: RecordBuffer | None = None,
        element_names: Callable[[str, str], list[str] | None] = lambda model, tensor: None,
    ) -> None:
        self._records = records
        self._element_names = element_names
        self._on_features = on_features
        self._features_applied: tuple[str, str] | None = None
        self._shadows = shadows
        self._router = router
        self._settings = settings
        self._repository = repository
        self._root = root
        self._artifacts = root / ARTIFACTS_DIR
        self._on_change = on_change
        self._served: dict[str, _Served] = {}
        self._statuses: dict[str, deployments_pb2.EndpointStatus] = {}
        self._applied_revision = 0
        self._outbox: asyncio.Queue[deployments_pb2.DataPlaneMessage] | None = None
        self.attached = asyncio.Event()  # set while a stream is open (tests and readiness logs)

    # --- start-up ----------------------------------------------------------------------------------

    async def load_last_known_good(self) -> None:
        """Serve what the managed directory holds (variant models and the routes saved with them)
        before the control plane is reachable."""
        self._artifacts.mkdir(parents=True, exist_ok=True)
        for model_dir in sorted(p for p in self._root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            model = model_dir.name
            try:
                await self._repository.load(model)
            except WeirError as error:
                log.error("last-known-good model failed to load", extra={"model": model, "reason": error.message})
                continue
            marker = model_dir / SERVED_MARKER
            if marker.is_file():
                name, version, sha256 = marker.read_text().split()
                served = _Served(types_pb2.ModelVersionRef(model_name=name, version=int(version)), sha256)
                self._served[model] = served
                endpoint, _, variant = model.partition(SEPARATOR)
                self._statuses[model] = EndpointState(
                    endpoint=endpoint, variant=variant, state=EndpointState.READY, serving=served.model
                )
        self._router.swap(_load_routes(self._root / ROUTES_FILE, set(self._served)))
        await self._on_change()

    # --- the attach loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Attach, follow, and reattach with backoff forever (until cancelled)."""
        delay = 0.2
        while True:
            try:
                await self._session()
                delay = 0.2  # a clean end (the control plane closed the stream): come back quickly
            except asyncio.CancelledError:
                raise
            except Exception as error:  # grpc.aio.AioRpcError, OSError...: keep serving, retry
                refused = isinstance(error, grpc.aio.AioRpcError) and error.code() in (
                    grpc.StatusCode.UNAUTHENTICATED,
                    grpc.StatusCode.PERMISSION_DENIED,
                )
                if refused:  # retrying soon will not help: say what is wrong, and retry slowly
                    delay = self._settings.refused_backoff_seconds
                    log.error(
                        "the control plane refused this data plane's token: attaching needs a token of role "
                        "'replica' (WEIR_CONTROL_PLANE_TOKEN; `weir token --role replica` makes one)",
                        extra={"control_plane": self._settings.address, "reason": _short(error), "retry_in_s": delay},
                    )
                else:
                    log.warning(
                        "control plane unreachable; serving the last-known-good state",
                        extra={"control_plane": self._settings.address, "reason": _short(error), "retry_in_s": delay},
                    )
            finally:
                self.attached.clear()
            await asyncio.sleep(delay * (0.5 + random.random()))  # jitter: replicas do not reconnect in step
            delay = min(delay * 2, self._settings.max_backoff_seconds)

    async def _session(self) -> None:
        settings = self._settings
        async with _channel(settings) as channel:
            sync = deployments_pb2_grpc.DataPlaneSyncStub(channel)
            registry = registry_pb2_grpc.RegistryStub(channel)
            outbox: asyncio.Queue[deployments_pb2.DataPlaneMessage] = asyncio.Queue()
            self._outbox = outbox
            hello = deployments_pb2.Hello(
                replica_id=settings.replica_id,
                address=settings.serving_address,
                weir_version=__version__,
                status=self._status(),
            )
            outbox.put_nowait(deployments_pb2.DataPlaneMessage(hello=hello))
            call = sync.Attach(_drain(outbox), metadata=client_metadata(settings.token))
            heartbeats = asyncio.create_task(self._heartbeat(outbox))
            shipping = asyncio.create_task(self._ship_records(outbox)) if self._records is not None else None
            try:
                async for message in call:
                    self.attached.set()
                    if message.WhichOneof("body") == "desired_state":
                        await self._apply(message.desired_state, registry)
            finally:
                heartbeats.cancel()
                if shipping is not None:
                    shipping.cancel()
                self._outbox = None
                call.cancel()

    async def _heartbeat(self, outbox: asyncio.Queue[deployments_pb2.DataPlaneMessage]) -> None:
        """Each beat carries the full status: the control plane's statistics (shadow comparisons)
        stay at most one interval old."""
        while True:
            await asyncio.sleep(self._settings.heartbeat_seconds)
            outbox.put_nowait(deployments_pb2.DataPlaneMessage(status=self._status()))

    async def _ship_records(self, outbox: asyncio.Queue[deployments_pb2.DataPlaneMessage]) -> None:
        """Sampled requests, as records, every RECORDS_SECONDS while attached (converted in a worker
        thread: the samples are references to arrays nothing writes to any more)."""
        buffer = self._records
        assert buffer is not None
        while True:
            await asyncio.sleep(RECORDS_SECONDS)
            samples = buffer.drain(RECORDS_PER_MESSAGE)
            if not samples and not buffer.dropped:
                continue
            records = await asyncio.to_thread(to_records, samples, self._element_names)
            message = monitoring_pb2.InferenceRecords(records=records, dropped=buffer.dropped)
            outbox.put_nowait(deployments_pb2.DataPlaneMessage(records=message))

    def _status(self) -> deployments_pb2.ReplicaStatus:
        status = deployments_pb2.ReplicaStatus(
            applied_revision=self._applied_revision,
            endpoints=[self._statuses[name] for name in sorted(self._statuses)],
        )
        for name, route in sorted(self._router.table().items()):
            for variant in route.variants:
                try:
                    loaded = self._repository.resolve(variant.model, "")
                except WeirError:
                    continue
                metrics = loaded.metrics
                status.variants.add(
                    endpoint=name, variant=variant.name, version=loaded.version,
                    succeeded=int(metrics.request_success.value), failed=int(metrics.request_failures.value),
                    latency_bounds_seconds=metrics.request_duration.bounds,
                    latency_counts=list(metrics.request_duration.counts),
                )  # fmt: skip
        if self._shadows is not None:
            for (endpoint, shadow), stats in sorted(self._shadows.stats.items()):
                status.shadows.add(
                    endpoint=endpoint, shadow=shadow, mirrored=stats.mirrored, errors=stats.errors,
                    dropped=stats.dropped, rows=stats.rows, rows_agreeing=stats.rows_agreeing,
                    max_abs_diff=stats.max_abs_diff, rows_within_tolerance=stats.rows_within_tolerance,
                )  # fmt: skip
        return status

    def _report(self) -> None:
        if self._outbox is not None:
            self._outbox.put_nowait(deployments_pb2.DataPlaneMessage(status=self._status()))

    # --- reconciling -------------------------------------------------------------------------------

    async def _apply(self, state: deployments_pb2.DesiredState, registry: registry_pb2_grpc.RegistryStub) -> None:
        features = (state.feature_definitions_toml, state.online_store)
        if state.feature_definitions_toml and features != self._features_applied and self._on_features is not None:
            try:
                self._on_features(*features)
                self._features_applied = features
            except Exception as error:  # bad definitions keep the previous ones in use
                log.error("feature definitions from the control plane not applied", extra={"reason": str(error)})
        desired = {endpoint.endpoint: endpoint for endpoint in state.endpoints if endpoint.variants}
        wanted_models: set[str] = set()
        for name, endpoint in desired.items():
            for variant in endpoint.variants:
                model = variant_model(name, variant.name)
                wanted_models.add(model)
                await self._ensure_variant(name, model, variant, registry)
            self._route(name, endpoint)
        for name in [name for name in self._router.table() if name not in desired]:
            self._router.remove(name)  # no new request goes there from now on
            log.info("endpoint undeployed", extra={"model": name})
        for model in [model for model in self._served if model not in wanted_models]:
            with contextlib.suppress(WeirError):
                await self._repository.unload(model)
            self._served.pop(model, None)
            self._statuses.pop(model, None)
            await asyncio.to_thread(shutil.rmtree, self._root / model, True)
        for model in [model for model in self._statuses if model not in wanted_models]:
            self._statuses.pop(model, None)  # a variant that never loaded
        await asyncio.to_thread(_save_routes, self._root / ROUTES_FILE, self._router.table())
        self._applied_revision = state.revision
        await self._on_change()
        self._report()

    async def _ensure_variant(
        self,
        endpoint: str,
        model: str,
        variant: deployments_pb2.ResolvedVariant,
        registry: registry_pb2_grpc.RegistryStub,
    ) -> None:
        """Load the variant's version under ``model`` unless it is already what serves there."""
        served = self._served.get(model)
        if served is not None and served.model == variant.model and served.sha256 == variant.artifact_sha256:
            # what serves is what is desired: a failure of a version desired before is over
            self._statuses[model] = EndpointState(
                endpoint=endpoint, variant=variant.name, state=EndpointState.READY, desired=variant.model,
                serving=variant.model,
            )  # fmt: skip
            return
        previous = served.model if served else None
        status = EndpointState(
            endpoint=endpoint,
            variant=variant.name,
            state=EndpointState.LOADING,
            desired=variant.model,
            serving=previous,
        )
        self._statuses[model] = status
        self._report()
        try:
            await self._install(model, variant, registry)
            await self._repository.load(model)
        except (WeirError, grpc.aio.AioRpcError, OSError) as error:
            message = error.message if isinstance(error, WeirError) else _short(error)
            log.error("desired version failed to load; the previous one keeps serving",
                      extra={"model": model, "reason": message})  # fmt: skip
            self._statuses[model] = EndpointState(
                endpoint=endpoint, variant=variant.name, state=EndpointState.FAILED, desired=variant.model,
                serving=previous, message=message,
            )  # fmt: skip
            return
        self._served[model] = _Served(variant.model, variant.artifact_sha256)
        (self._root / model / SERVED_MARKER).write_text(
            f"{variant.model.model_name} {variant.model.version} {variant.artifact_sha256}\n"
        )
        self._prune_versions(model, keep=variant.model.version)
        self._statuses[model] = EndpointState(
            endpoint=endpoint, variant=variant.name, state=EndpointState.READY, desired=variant.model,
            serving=variant.model,
        )  # fmt: skip
        log.info("variant now serves", extra={"model": model, "source": f"{variant.model.model_name}:"
                                                                        f"{variant.model.version}"})  # fmt: skip

    def _route(self, name: str, endpoint: deployments_pb2.EndpointState) -> None:
        """Switch the endpoint's traffic once every variant it names serves what it should; while one
        failed, keep the previous split (with the new flags: a kill switch must apply regardless)."""
        current = self._router.get(name)
        ready = [
            variant
            for variant in endpoint.variants
            if (served := self._served.get(variant_model(name, variant.name))) is not None
            and served.model == variant.model
        ]
        serving_ready = [variant for variant in ready if not variant.shadow_percent]
        shadows = tuple(
            ShadowRoute(variant.name, variant_model(name, variant.name), variant.shadow_percent)
            for variant in ready
            if variant.shadow_percent
        )
        if len(ready) == len(endpoint.variants) or current is None:
            variants = tuple(
                VariantRoute(variant.name, variant_model(name, variant.name), variant.weight)
                for variant in serving_ready
            )
        else:
            variants = current.variants
        if not variants:
            return
        self._router.update(
            EndpointRoute(
                name,
                variants,
                flags=dict(endpoint.flags),
                key_parameter=endpoint.routing.key_parameter or DEFAULT_KEY_PARAMETER,
                key_header=endpoint.routing.key_header.lower(),
                shadows=shadows,
            )
        )

    async def _install(
        self, model: str, variant: deployments_pb2.ResolvedVariant, registry: registry_pb2_grpc.RegistryStub
    ) -> None:
        """Put the variant's artifact and config where the repository loads ``model`` from."""
        blob = await self._fetch(variant, registry)
        validation = await self._fetch_validation(variant, registry)  # the accuracy gate's validation.npz
        version_dir = self._root / model / str(variant.model.version)
        config = inference.ModelConfig()
        text_format.Parse(variant.config_pbtxt, config)
        config.name = model  # endpoint@variant; clients call the endpoint and the router picks this
        config.version_policy.Clear()
        config.version_policy.specific.versions.append(variant.model.version)

        def write() -> None:
            version_dir.mkdir(parents=True, exist_ok=True)
            target = version_dir / variant.artifact_filename
            staged = version_dir / f".{variant.artifact_filename}.incoming"
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
            _write_atomically(self._root / model / "config.pbtxt", text_format.MessageToString(config))

        await asyncio.to_thread(write)

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
            async for part in registry.DownloadArtifact(request, metadata=client_metadata(self._settings.token)):
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
        descriptor, temporary = tempfile.mkstemp(dir=self._artifacts, prefix=".download-")
        try:
            with os.fdopen(descriptor, "wb") as handle:
                async for part in registry.DownloadArtifact(request, metadata=client_metadata(self._settings.token)):
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

    def _prune_versions(self, model: str, keep: int) -> None:
        for path in (self._root / model).iterdir():
            if path.is_dir() and path.name.isdigit() and int(path.name) != keep:
                shutil.rmtree(path, ignore_errors=True)


async def _drain(
    outbox: asyncio.Queue[deployments_pb2.DataPlaneMessage],
) -> AsyncIterator[deployments_pb2.DataPlaneMessage]:
    while True:
        yield await outbox.get()


@contextlib.asynccontextmanager
async def _channel(settings: FollowerSettings) -> AsyncIterator[grpc.aio.Channel]:
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    if settings.tls is not None:
        channel = grpc.aio.secure_channel(settings.address, settings.tls.credentials(), options=options)
    else:
        channel = grpc.aio.insecure_channel(settings.address, options=options)
    try:
        yield channel
    finally:
        await channel.close()


def _save_routes(path: Path, table: Mapping[str, EndpointRoute]) -> None:
    document = {
        name: {
            "variants": [[variant.name, variant.model, variant.weight] for variant in route.variants],
            "shadows": [[shadow.name, shadow.model, shadow.percent] for shadow in route.shadows],
            "flags": dict(route.flags),
            "key_parameter": route.key_parameter,
            "key_header": route.key_header,
        }
        for name, route in table.items()
    }
    _write_atomically(path, json.dumps(document, sort_keys=True))


def _load_routes(path: Path, loaded_models: set[str]) -> dict[str, EndpointRoute]:
    if not path.is_file():
        return {}
    routes = {}
    for name, item in json.loads(path.read_text()).items():
        variants = tuple(
            VariantRoute(v, model, weight) for v, model, weight in item["variants"] if model in loaded_models
        )
        if variants:
            shadows = tuple(
                ShadowRoute(shadow, model, percent)
                for shadow, model, percent in item.get("shadows", [])
                if model in loaded_models
            )
            routes[name] = EndpointRoute(
                name, variants, flags=item.get("flags", {}), key_parameter=item.get("key_parameter") or
                DEFAULT_KEY_PARAMETER, key_header=item.get("key_header", ""), shadows=shadows,
            )  # fmt: skip
    return routes


def _write_atomically(path: Path, text: str) -> None:
    staged = path.with_name(f".{path.name}.incoming")
    staged.write_text(text)
    os.replace(staged, path)


def _short(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return f"{type(error).__name__}: {error}"
