"""The Features control service: definitions (validated, versioned, audited, pushed to data planes),
point-in-time historical retrieval streamed as Arrow, materialization and push.

DuckDB and the online store block, so every query and write runs in a worker thread; a historical
result is pulled batch by batch from its thread so the event loop serves other RPCs meanwhile and
the client's flow control paces the join.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import threading
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pyarrow as pa

from weir_control.attach import DesiredStateHub
from weir_control.features import arrow_wire
from weir_control.features.definitions import Definitions, parse_definitions
from weir_control.features.paths import check_base_directory, check_definitions
from weir_control.services import Auditor, _read, abort_with
from weir_control.store import Store
from weir_proto.control.v1 import features_pb2, features_pb2_grpc
from weir_proto.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from weir_proto.online_store import OnlineStore, open_online_store


class FeaturesService(features_pb2_grpc.FeaturesServicer):
    def __init__(
        self, store: Store, auditor: Auditor, hub: DesiredStateHub, feature_root: Path, online_store: str = ""
    ) -> None:
        self._store = store
        self._auditor = auditor
        self._hub = hub
        # every source lies inside it (see features.paths); relative sources resolve against it when a
        # document names no base
        self._feature_root = feature_root
        self._online_target = online_store
        self._online: OnlineStore | None = None
        self._online_lock = threading.Lock()
        self._parsed: tuple[int, Definitions | None] = (-1, None)

    def close(self) -> None:
        if self._online is not None:
            self._online.close()
            self._online = None

    # --- definitions -----------------------------------------------------------------------------

    async def ApplyFeatures(
        self, request: features_pb2.ApplyFeaturesRequest, context: grpc.aio.ServicerContext
    ) -> features_pb2.FeatureDefinitions:
        identity = self._auditor.identity(context)

        def apply() -> features_pb2.FeatureDefinitions:
            # the root is recorded as the base of a document without one, so a training job reading the
            # stored text resolves its relative sources as the control plane does
            text = _with_base_directory(request.definitions_toml, request.base_directory or str(self._feature_root))
            definitions = self._parse(text)
            revision = self._store.apply_features(text, identity.name)
            return _feature_message(revision, text, definitions)

        # the definitions, the revision bump data planes follow and the audit event: one unit of work
        return await self._auditor.run(context, "Features/ApplyFeatures", "features", lambda: None, apply, atomic=True)

    async def GetFeatures(
        self, request: features_pb2.GetFeaturesRequest, context: grpc.aio.ServicerContext
    ) -> features_pb2.FeatureDefinitions:
        def read() -> features_pb2.FeatureDefinitions:
            revision, text = self._store.feature_definitions()
            return _feature_message(revision, text, self._current() if text else None)

        return await _read(context, read)

    def _parse(self, text: str) -> Definitions:
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise InvalidArgumentError(f"definitions_toml: expected TOML, got: {error}") from error
        declared_base = document.get("base_directory")
        if isinstance(declared_base, str) and Path(declared_base).is_absolute():
            check_base_directory(declared_base, self._feature_root)  # the request's, or the document's own
        definitions = parse_definitions(document, "definitions_toml", base=self._feature_root)
        check_definitions(definitions, self._feature_root)  # the operator's root bounds every source
        return definitions

    def _current(self) -> Definitions:
        """The applied definitions, parsed once per revision."""
        revision, text = self._store.feature_definitions()
        if not text:
            raise FailedPreconditionError("feature definitions: none applied yet (weir features apply FILE)")
        cached_revision, cached = self._parsed
        if cached_revision != revision or cached is None:
            try:
                cached = self._parse(text)
            except InvalidArgumentError as error:  # applied before a check existed, or the root moved
                raise FailedPreconditionError(
                    f"feature definitions: the applied revision {revision} is not valid here: {error.message} "
                    "(weir features apply FILE)"
                ) from error
            self._parsed = (revision, cached)
        return cached

    # --- offline ---------------------------------------------------------------------------------

    async def GetHistoricalFeatures(
        self, request_iterator: AsyncIterator[features_pb2.HistoricalFeaturesRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[features_pb2.ArrowChunk]:
        from weir_control.features.offline import stream_historical_features

        try:
            service, entity_rows = await _receive_table(request_iterator, "feature_service", "arrow_ipc (entity rows)")
            if not service:
                raise InvalidArgumentError(
                    "feature_service: expected a feature service name in the first message, got ''"
                )
            definitions = await asyncio.to_thread(self._current)
            # lazy: the sources are listed and checked (features.paths) in the first pull's thread
            batches = stream_historical_features(definitions, service, entity_rows, feature_root=self._feature_root)
            try:
                messages = arrow_wire.encode_batches(batches)
                while True:
                    # DuckDB runs the join lazily as batches are pulled: each pull is a thread hop
                    chunk = await asyncio.to_thread(next, messages, None)
                    if chunk is None:
                        break
                    payload, rows = chunk
                    yield features_pb2.ArrowChunk(arrow_ipc=payload, rows=rows)
            finally:
                await asyncio.to_thread(batches.close)  # a client gone mid-stream: the connection closes now
        except Exception as error:
            await abort_with(context, error)

    # --- online ----------------------------------------------------------------------------------

    def _online_store(self) -> OnlineStore:
        with self._online_lock:
            if self._online is None:
                if not self._online_target:
                    raise FailedPreconditionError(
                        "online store: this control plane has none configured (weir control --online-store URL|FILE)"
                    )
                self._online, _ = open_online_store(self._online_target)
            return self._online

    async def Materialize(
        self, request: features_pb2.MaterializeRequest, context: grpc.aio.ServicerContext
    ) -> features_pb2.MaterializeResponse:
        from weir_control.features import materialize

        def run() -> features_pb2.MaterializeResponse:
            definitions, store = self._current(), self._online_store()
            views = [_checked_name(view, "views") for view in request.views] or None
            if request.incremental:
                end = _time(request, "end") if request.HasField("end") else None
                written = materialize.materialize_incremental(definitions, store, end, views, self._feature_root)
            else:
                for field in ("start", "end"):
                    if not request.HasField(field):
                        raise InvalidArgumentError(f"{field}: expected a time (or incremental=true), got none")
                written = materialize.materialize(
                    definitions,
                    store,
                    _time(request, "start"),
                    _time(request, "end"),
                    views,
                    self._feature_root,
                )
            return features_pb2.MaterializeResponse(written=written)

        target = ",".join(request.views)[:500] or "features"
        action = "Features/Materialize" + ("Incremental" if request.incremental else "")
        return await self._auditor.run(context, action, target, lambda: None, run)

    async def PushFeatures(
        self, request_iterator: AsyncIterator[features_pb2.PushFeaturesRequest], context: grpc.aio.ServicerContext
    ) -> features_pb2.MaterializeResponse:
        from weir_control.features import materialize

        try:
            view, rows = await _receive_table(request_iterator, "view", "arrow_ipc (rows)")
        except Exception as error:
            await abort_with(context, error)

        def push() -> features_pb2.MaterializeResponse:
            if not view:
                raise InvalidArgumentError("view: expected a feature view name in the first message, got ''")
            written = materialize.push(self._current(), self._online_store(), view, rows, self._feature_root)
            return features_pb2.MaterializeResponse(written={view: written})

        return await self._auditor.run(context, "Features/PushFeatures", view or "features", lambda: None, push)

    async def GetOnlineFeatures(
        self, request: features_pb2.OnlineFeaturesRequest, context: grpc.aio.ServicerContext
    ) -> features_pb2.OnlineFeaturesResponse:
        return await _read(context, lambda: online_features(self._current(), self._online_store(), request))


MAX_ONLINE_KEYS = 1000


def online_features(
    definitions: Definitions, store: OnlineStore, request: features_pb2.OnlineFeaturesRequest
) -> features_pb2.OnlineFeaturesResponse:
    """The online values of a service's (or a view's) features for each entity key, in order."""
    name = _checked_name(request.name, "name")
    if name in definitions.services:
        features = list(definitions.services[name].features)
    elif name in definitions.views:
        features = [(name, feature.name) for feature in definitions.views[name].features]
    else:
        raise NotFoundError(
            f"name: expected a feature service {sorted(definitions.services)} or view {sorted(definitions.views)}, "
            f"got '{name}'"
        )
    keys = list(request.entity_keys)
    if not 1 <= len(keys) <= MAX_ONLINE_KEYS:
        raise InvalidArgumentError(f"entity_keys: expected 1 to {MAX_ONLINE_KEYS} keys, got {len(keys):,}")
    for key in keys:
        _checked_name(key, "entity_keys")
    views: dict[str, dict[str, str]] = {}
    for view_name, feature in features:
        views.setdefault(view_name, {})[feature] = definitions.views[view_name].feature(feature).dtype  # type: ignore[union-attr]
    response = features_pb2.OnlineFeaturesResponse(feature_names=[f"{view}:{feature}" for view, feature in features])
    for key in keys:
        found = store.read(key, views)
        row = response.rows.add(entity_key=key)
        for view_name, feature in features:
            value = row.values.add()
            _set_value(value, found[view_name][1].get(feature))
        for view_name, (event_ts, _) in found.items():
            if event_ts is not None:
                row.event_times[view_name].FromDatetime(datetime.datetime.fromtimestamp(event_ts, datetime.UTC))
    return response


def _set_value(message: features_pb2.OnlineValue, value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool):
        message.flag = value
    elif isinstance(value, int):
        message.integer = value
    elif isinstance(value, float):
        message.number = value
    else:
        message.text = str(value)


async def _receive_table(requests: AsyncIterator[Any], name_field: str, rows_field: str) -> tuple[str, pa.Table]:
    """The name from the first message and the table from every message's Arrow stream, at most
    ``arrow_wire.MAX_TABLE_BYTES`` of it."""
    name = ""
    tables = []
    budget = arrow_wire.MAX_TABLE_BYTES
    async for request in requests:
        name = name or _checked_name(getattr(request, name_field), name_field)
        if request.arrow_ipc:
            table = await asyncio.to_thread(arrow_wire.decode, request.arrow_ipc, rows_field, budget)
            budget -= table.nbytes
            tables.append(table)
    return name, arrow_wire.concat(tables, rows_field)


MAX_NAME_CHARS = 256


def _checked_name(name: str, field: str) -> str:
    if len(name) > MAX_NAME_CHARS:
        raise InvalidArgumentError(f"{field}: expected at most {MAX_NAME_CHARS} characters, got {len(name):,}")
    return name


def _time(request: Any, field: str) -> datetime.datetime:
    try:
        return getattr(request, field).ToDatetime(datetime.UTC)
    except ValueError:
        seconds = getattr(request, field).seconds
        raise InvalidArgumentError(
            f"{field}: expected a time between years 1 and 9999, got {seconds} seconds since 1970"
        ) from None


def _with_base_directory(text: str, base_directory: str) -> str:
    """Record the client's base as the document's own ``base_directory`` (a top-level key must come
    before any table, so it goes first) unless the document declares one."""
    if not base_directory:
        return text
    if not Path(base_directory).is_absolute():
        raise InvalidArgumentError(f"base_directory: expected an absolute path, got {base_directory!r}")
    try:
        if "base_directory" in tomllib.loads(text):
            return text
    except tomllib.TOMLDecodeError:
        return text  # the parse that follows names the error
    return f"base_directory = {json.dumps(base_directory)}\n{text}"  # a JSON string is a TOML basic string


def _feature_message(revision: int, text: str, definitions: Definitions | None) -> features_pb2.FeatureDefinitions:
    message = features_pb2.FeatureDefinitions(revision=revision, definitions_toml=text)
    if definitions is not None:
        message.entities.extend(sorted(definitions.entities))
        message.feature_views.extend(sorted(definitions.views))
        message.feature_services.extend(sorted(definitions.services))
    return message
