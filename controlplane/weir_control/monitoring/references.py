"""The drift monitor's reference (a traffic window, a dataset, or the serving version's training data,
which it follows through promotions and rollbacks)."""

from __future__ import annotations

import datetime
import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from google.protobuf import json_format

from weir_control.features.paths import inside
from weir_control.monitoring.policy import check_endpoint
from weir_control.monitoring.profiles import MAX_FEATURES, ReferenceProfile, WindowProfile
from weir_control.monitoring.state import MAX_CATEGORY_CHARS, EndpointMonitor, restart_concept
from weir_control.store import Store
from weir_proto.control.v1 import audit_pb2, monitoring_pb2
from weir_proto.errors import FailedPreconditionError, InvalidArgumentError, WeirError

log = logging.getLogger(__name__)

DRIFT_MONITOR = "drift-monitor"  # the audit log's actor of what the monitor changes by itself


class DriftReferences:
    """Setting and following an endpoint's reference (a mix-in of ``DriftMonitor``)."""

    _store: Store
    _lock: threading.RLock
    _clock: Callable[[], float]
    _reference_root: Path | None
    _serving_key: Callable[[str], str] | None
    _reference_for_serving: Callable[[str], tuple[str, Path]] | None

    if TYPE_CHECKING:

        def _monitor(self, endpoint: str) -> EndpointMonitor: ...
        def _holder(self) -> bool: ...
        def _save_state(self, monitor: EndpointMonitor) -> None: ...

    def _follow_serving_reference(self, monitor: EndpointMonitor) -> None:
        """A reference taken from the serving version's training data follows the serving version: when
        another version serves, its training data becomes the reference of the windows that open from
        now on (windows already open keep theirs), audited with actor drift-monitor. A reference from
        a traffic window or a dataset stays as set."""
        summary = monitor.reference_summary
        if summary is None or not summary.serving_lineage or self._serving_key is None or not self._holder():
            return  # with several replicas the holder renews it (once, audited once); the others re-read it
        if self._reference_for_serving is None:
            return
        try:
            key = self._serving_key(monitor.endpoint)
        except WeirError:
            return
        if not key or key == summary.serving_version or key == monitor.reference_tried:
            return
        monitor.reference_tried = key  # tried once per version: a version without training data is logged once
        event = audit_pb2.AuditEvent(
            actor=DRIFT_MONITOR, role="system", action="Monitoring/SetReference", target=f"endpoint/{monitor.endpoint}",
            before=_summary_json(summary),
        )  # fmt: skip
        event.at.FromDatetime(datetime.datetime.now(datetime.UTC))
        try:
            description, path = self._reference_for_serving(monitor.endpoint)
            profile = _profile_from_parquet(path, "serving_lineage")
        except WeirError as error:
            log.warning(
                "drift reference kept: the serving version's training data cannot be read",
                extra={"endpoint": monitor.endpoint, "version": key, "error": error.message},
            )
            event.result, event.outcome = "FAILED_PRECONDITION", "failed"
            event.detail = f"{key} serves now; the reference stays {summary.serving_version}'s: {error.message}"[:2000]
            self._store.append_audit(event)
            return
        renewed = monitoring_pb2.ReferenceSummary(
            endpoint=monitor.endpoint, source=description, rows=profile.rows,
            numeric_features=sorted(profile.numeric), categorical_features=sorted(profile.categorical),
            serving_lineage=True, serving_version=key,
        )  # fmt: skip
        renewed.set_at.FromSeconds(int(self._clock()))
        self._store.save_drift_reference(renewed, profile.to_bytes())
        monitor.reference, monitor.reference_summary = profile, renewed
        event.after, event.result, event.outcome = _summary_json(renewed), "OK", "ok"
        event.detail = f"{key} serves now: the reference is its training data (was {summary.serving_version}'s)"
        self._store.append_audit(event)
        log.info("drift reference follows the serving version", extra={"endpoint": monitor.endpoint, "version": key})

    def set_reference(self, request: monitoring_pb2.SetReferenceRequest) -> monitoring_pb2.ReferenceSummary:
        check_endpoint(request.endpoint)
        source = request.WhichOneof("source")
        if source == "window":
            start, end = _time(request.window, "start"), _time(request.window, "end")
            if end <= start:
                raise InvalidArgumentError(f"window.end: expected a time after window.start ({start}), got {end}")
            profiles = self._store.drift_window_profiles(request.endpoint, start, end)
            if not profiles:
                raise FailedPreconditionError(
                    f"window: no closed window of '{request.endpoint}' lies within "
                    f"{start.isoformat()} .. {end.isoformat()}"
                )
            merged = WindowProfile.from_bytes(profiles[0], None)
            for data in profiles[1:]:
                merged.merge(WindowProfile.from_bytes(data, None))
            profile = merged.to_reference()
            description = f"traffic {start.isoformat()} .. {end.isoformat()} ({len(profiles)} windows)"
        elif source in ("serving_lineage", "parquet_path"):
            if source == "serving_lineage":
                if self._reference_for_serving is None:
                    raise FailedPreconditionError("serving_lineage: this control plane cannot resolve lineage")
                serving = self._serving_key(request.endpoint) if self._serving_key is not None else ""
                description, path = self._reference_for_serving(request.endpoint)
            else:
                path = self._reference_path(request.parquet_path)
                description = f"dataset {request.parquet_path}"
            profile = _profile_from_parquet(path, "parquet_path" if source == "parquet_path" else "serving_lineage")
        else:
            raise InvalidArgumentError("source: expected window, serving_lineage or parquet_path, got none")
        summary = monitoring_pb2.ReferenceSummary(
            endpoint=request.endpoint,
            source=description,
            rows=profile.rows,
            numeric_features=sorted(profile.numeric),
            categorical_features=sorted(profile.categorical),
        )
        if source == "serving_lineage":
            summary.serving_lineage, summary.serving_version = True, serving
        summary.set_at.FromSeconds(int(self._clock()))
        with self._lock:
            self._store.save_drift_reference(summary, profile.to_bytes())
            monitor = self._monitor(request.endpoint)
            monitor.reference, monitor.reference_summary = profile, summary
            monitor.reference_tried = ""
            monitor.open.clear()  # windows bin on the reference: start a fresh one
            restart_concept(monitor)  # a new baseline for concept drift too
            self._save_state(monitor)
        return summary

    def _reference_path(self, parquet_path: str) -> Path:
        """The file a ``parquet_path`` names (relative: to the reference root), if it is a file inside the
        reference root. Missing, outside (symbolic links followed) and not a file answer alike, so the
        answer tells nothing about what exists outside the root."""
        root = self._reference_root
        if root is None:
            raise FailedPreconditionError("parquet_path: this control plane reads no Parquet references")
        try:
            resolved = Path(os.path.realpath(root / parquet_path))  # an absolute parquet_path replaces the root
            usable = inside(resolved, root) and resolved.is_file()
        except (OSError, ValueError):  # a NUL byte, a name too long
            usable = False
        if not usable:
            raise InvalidArgumentError(
                f"parquet_path: expected a Parquet file inside the feature root {root} (weir control "
                f"--feature-root), got {parquet_path[:300]!r}"
            )
        return resolved


def _summary_json(message: Any) -> str:
    """As the audit log shows a message (weir_control.services.summary)."""
    document = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return json.dumps(document, sort_keys=True, separators=(",", ":"))


def _time(window: monitoring_pb2.TimeRange, field: str) -> datetime.datetime:
    moment = getattr(window, field)
    try:
        return moment.ToDatetime(datetime.UTC)
    except ValueError:
        raise InvalidArgumentError(
            f"window.{field}: expected a time between years 1 and 9999, got {moment.seconds} seconds since 1970"
        ) from None


def _profile_from_parquet(path: Path, field_name: str) -> ReferenceProfile:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        if len(schema.names) > MAX_FEATURES:
            raise InvalidArgumentError(
                f"{field_name}: expected at most {MAX_FEATURES} columns (features), got {len(schema.names)}"
            )
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as error:
        raise InvalidArgumentError(f"{field_name}: expected a readable Parquet file, got {path}: {error}") from error
    numeric, categorical = {}, {}
    for name in table.column_names:
        column = table.column(name)
        if pa.types.is_integer(column.type) or pa.types.is_floating(column.type) or pa.types.is_boolean(column.type):
            numeric[name] = column.cast(pa.float64()).to_numpy(zero_copy_only=False)
        elif pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            # cut like the records' values, so long categories compare equal
            categorical[name] = [str(value)[:MAX_CATEGORY_CHARS] for value in column.to_pylist() if value is not None]
    if not numeric and not categorical:
        raise InvalidArgumentError(f"{field_name}: expected numeric or text columns in {path}, got {table.schema}")
    return ReferenceProfile.from_columns(numeric, categorical)
