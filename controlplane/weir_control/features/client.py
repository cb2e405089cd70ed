"""Python API for the feature store through the control plane (what `weir features` uses when no
definitions file is given)::

    with FeatureStoreClient("127.0.0.1:8011", token) as features:
        features.apply(Path("features.toml"))
        training = features.get_historical_features("driver_ranking", entity_rows)   # pyarrow.Table
        for batch in features.stream_historical_features("driver_ranking", entity_rows): ...
        features.materialize(start, end)
        features.materialize_incremental()
        features.push("driver_stats", rows)
        features.online_features("driver_ranking", ["1001", "1002"])   # OnlineFeaturesResponse

Failures raise ``WeirError`` subclasses carrying the server's message (a NOT_FOUND is a
``NotFoundError``, and so on).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pyarrow as pa

from weir_control.features import arrow_wire
from weir_proto.auth import client_metadata
from weir_proto.control.v1 import features_pb2, features_pb2_grpc
from weir_proto.errors import WeirError, error_for_status

_LIMITS = [("grpc.max_receive_message_length", 64 * 1024 * 1024), ("grpc.max_send_message_length", 64 * 1024 * 1024)]


class FeatureStoreClient:
    def __init__(
        self, address: str, token: str | None = None, root_certificates: bytes | None = None, timeout: float = 3600.0
    ) -> None:
        if root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.secure_channel(address, credentials, options=_LIMITS)
        else:
            self._channel = grpc.insecure_channel(address, options=_LIMITS)
        self._stub = features_pb2_grpc.FeaturesStub(self._channel)
        self._metadata = client_metadata(token)
        self._timeout = timeout

    def __enter__(self) -> FeatureStoreClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, metadata=self._metadata, timeout=self._timeout)
        except grpc.RpcError as error:
            raise _weir_error(error) from error

    def apply(self, path: Path) -> features_pb2.FeatureDefinitions:
        """Send a definitions file; its relative sources point into its own directory."""
        request = features_pb2.ApplyFeaturesRequest(
            definitions_toml=path.read_text(encoding="utf-8"), base_directory=str(path.resolve().parent)
        )
        return self._call(self._stub.ApplyFeatures, request)

    def definitions(self) -> features_pb2.FeatureDefinitions:
        return self._call(self._stub.GetFeatures, features_pb2.GetFeaturesRequest())

    def stream_historical_features(self, feature_service: str, entity_rows: pa.Table) -> Iterator[pa.RecordBatch]:
        """Record batches of the training table, in the entity rows' order, as they arrive."""
        requests = _table_requests(
            features_pb2.HistoricalFeaturesRequest, "feature_service", feature_service, entity_rows
        )
        try:
            for chunk in self._stub.GetHistoricalFeatures(requests, metadata=self._metadata, timeout=self._timeout):
                yield from arrow_wire.decode(chunk.arrow_ipc, "arrow_ipc").to_batches()
        except grpc.RpcError as error:
            raise _weir_error(error) from error

    def get_historical_features(self, feature_service: str, entity_rows: pa.Table) -> pa.Table:
        batches = list(self.stream_historical_features(feature_service, entity_rows))
        if not batches:
            raise WeirError("historical features: the control plane streamed no rows back")
        return pa.Table.from_batches(batches)

    def materialize(
        self, start: datetime.datetime, end: datetime.datetime, views: list[str] | None = None
    ) -> dict[str, int]:
        request = features_pb2.MaterializeRequest(views=views or [])
        request.start.FromDatetime(start)
        request.end.FromDatetime(end)
        return dict(self._call(self._stub.Materialize, request).written)

    def materialize_incremental(
        self, end: datetime.datetime | None = None, views: list[str] | None = None
    ) -> dict[str, int]:
        request = features_pb2.MaterializeRequest(views=views or [], incremental=True)
        if end is not None:
            request.end.FromDatetime(end)
        return dict(self._call(self._stub.Materialize, request).written)

    def online_features(self, name: str, entity_keys: list[str]) -> features_pb2.OnlineFeaturesResponse:
        """The online values of a feature service's (or a view's) features for each entity key."""
        request = features_pb2.OnlineFeaturesRequest(name=name, entity_keys=entity_keys)
        return self._call(self._stub.GetOnlineFeatures, request)

    def push(self, view: str, rows: pa.Table) -> int:
        requests = _table_requests(features_pb2.PushFeaturesRequest, "view", view, rows)
        try:
            response = self._stub.PushFeatures(requests, metadata=self._metadata, timeout=self._timeout)
        except grpc.RpcError as error:
            raise _weir_error(error) from error
        return int(response.written.get(view, 0))


def _table_requests(message: Any, name_field: str, name: str, table: pa.Table) -> Iterator[Any]:
    """A client stream carrying a table: the name in the first message, then the table's Arrow chunks
    (the server side is ``features.service._receive_table``)."""
    yield message(**{name_field: name})
    for payload, _ in arrow_wire.encode_table(table):
        yield message(arrow_ipc=payload)


def _weir_error(error: grpc.RpcError) -> WeirError:
    return error_for_status(error.code(), error.details() or "")
