"""The feature store through the control plane (`weir control` as a real process, its feature root
holding the test's files): definitions applied with relative sources, point-in-time historical
retrieval streamed as Arrow both ways (the Python API and `weir features historical` agree with the
local join), materialize, incremental materialize and push into the embedded store and into real
Redis, and errors that name the field."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import free_port, start_redis_server
from tests.controlplane.test_features_offline import at, write_driver_repo
from tests.e2e.test_control_plane import ControlProcess, cli, start_control
from weir_control.features.client import FeatureStoreClient
from weir_control.features.definitions import load_definitions
from weir_control.features.offline import get_historical_features
from weir_proto.auth import client_metadata
from weir_proto.control.v1 import audit_pb2, audit_pb2_grpc, features_pb2, features_pb2_grpc
from weir_proto.errors import ErrorKind, WeirError
from weir_proto.online_store import RedisOnlineStore, SqliteOnlineStore

STATS = {"driver_stats": {"trips": "INT64", "rating": "FLOAT64"}}


@pytest.fixture(params=["sqlite", "redis"])
def control(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[ControlProcess, object]]:
    """A control plane with an online store (embedded SQLite or a real Redis) and a reader of it."""
    redis_server = None
    if request.param == "redis":
        port = free_port()
        redis_server = start_redis_server(port)
        target = f"redis://127.0.0.1:{port}/0"
        reader: object = RedisOnlineStore(target)
    else:
        target = str(tmp_path / "online.db")
        reader = SqliteOnlineStore(tmp_path / "online.db")
    state_dir = tmp_path / "control"
    process = start_control(
        state_dir, str(state_dir / "control.db"), free_port(), "--online-store", target, "--feature-root", str(tmp_path)
    )
    try:
        yield process, reader
    finally:
        process.process.terminate()
        process.process.wait(timeout=30)
        reader.close()  # type: ignore[attr-defined]
        if redis_server is not None:
            redis_server.terminate()
            redis_server.wait(timeout=10)


def entity_rows(count: int) -> pa.Table:
    """Entity rows cycling over drivers 1-4 and times 00:30-08:00 (every point-in-time case)."""
    times = [at(0, 30), at(1), at(2, 59), at(3, 30), at(8), at(3)]
    return pa.table(
        {
            "driver_id": [1 + index % 4 for index in range(count)],
            "event_timestamp": [times[index % 6] for index in range(count)],
        }
    )


def test_historical_retrieval_through_the_control_plane_matches_the_local_join(control, tmp_path: Path) -> None:
    process, _ = control
    repo = tmp_path / "repo"
    repo.mkdir()
    definitions_file = write_driver_repo(repo)
    applied = cli(process, "features", "apply", str(definitions_file))
    assert applied["feature_services"] == ["ranking"]
    # 300k rows: several Arrow messages each way
    rows = entity_rows(300_000)
    local = get_historical_features(load_definitions(definitions_file), "ranking", rows)
    with FeatureStoreClient(process.address, "t-replica") as client:  # retrieval is a read: a viewer may
        remote = client.get_historical_features("ranking", rows)
        assert remote.equals(local)
        assert remote.slice(0, 6).column("trips").to_pylist() == [None, None, 7, None, None, 200]

    small = tmp_path / "rows.parquet"
    pq.write_table(entity_rows(12), small)
    out = tmp_path / "training.parquet"
    result = cli(process, "features", "historical", "--service", "ranking", "--entities", str(small), "--out", str(out))
    assert result["rows"] == 12
    assert pq.read_table(out).equals(local.slice(0, 12))


def test_materialize_incremental_and_push_through_the_control_plane(control, tmp_path: Path) -> None:
    process, online = control
    repo = tmp_path / "repo"
    repo.mkdir()
    cli(process, "features", "apply", str(write_driver_repo(repo)))
    written = cli(process, "features", "materialize", "2026-11-01T00:00", "2026-11-01T02:00", "--view", "driver_stats")
    assert written["written"] == {"driver_stats": 2}  # drivers 1 and 3 have rows before 02:00 (the end is open)
    assert online.read("1", STATS)["driver_stats"][1] == {"trips": 10, "rating": 4.0}  # type: ignore[attr-defined]

    with FeatureStoreClient(process.address, "t-deployer") as client:
        # from the start (no watermark) to 04:00: driver 1's 03:00 correction (31) replaces 10
        assert client.materialize_incremental(datetime.datetime(2026, 11, 1, 4, tzinfo=datetime.UTC)) == {
            "driver_stats": 3,
            "driver_profile": 2,
        }
        assert online.read("1", STATS)["driver_stats"][1] == {"trips": 31, "rating": 4.4}  # type: ignore[attr-defined]
        # the next run starts at the watermark: only driver 1's 05:00 row is new
        assert client.materialize_incremental(datetime.datetime(2026, 11, 1, 6, tzinfo=datetime.UTC)) == {
            "driver_stats": 1,
            "driver_profile": 0,
        }
        pushed = pa.table(
            {"driver_id": [2], "event_timestamp": [at(6)], "created": [at(6)], "trips": [222], "rating": [4.9]}
        )
        assert client.push("driver_stats", pushed) == 1
        assert online.read("2", STATS)["driver_stats"][1] == {"trips": 222, "rating": 4.9}  # type: ignore[attr-defined]
        # the pushed row is in the offline log too: training data sees it
        training = client.get_historical_features(
            "ranking", pa.table({"driver_id": [2], "event_timestamp": [at(6, 30)]})
        )
        assert training.column("trips").to_pylist() == [222]
    assert list((repo / "stats" / "pushed").glob("*.parquet"))

    with grpc.insecure_channel(process.address) as channel:
        events = (
            audit_pb2_grpc.AuditStub(channel)
            .ListAuditEvents(audit_pb2.ListAuditEventsRequest(), metadata=client_metadata("t-admin"), timeout=10)
            .events
        )
    actions = [(event.action, event.actor, event.result) for event in events]
    assert ("Features/PushFeatures", "ci", "OK") in actions
    assert ("Features/MaterializeIncremental", "ci", "OK") in actions


def test_online_values_and_the_applied_definitions_through_the_cli(control, tmp_path: Path) -> None:
    """Issue 15, item 9: no command read online feature values (Feast's get-online-features) or
    listed the applied definitions. `weir features get` reads a service's or a view's values for
    entity keys (a viewer may: a read like historical retrieval); `weir features list` shows them."""
    process, _ = control
    repo = tmp_path / "repo"
    repo.mkdir()
    cli(process, "features", "apply", str(write_driver_repo(repo)))
    cli(process, "features", "materialize", "2026-11-01T00:00", "2026-11-01T04:00")
    rows = cli(process, "features", "get", "ranking", "--entity", "1", "--entity", "2", "--entity", "9",
               token="t-replica")  # fmt: skip
    assert [row["entity_key"] for row in rows] == ["1", "2", "9"]
    assert rows[0]["features"] == {"driver_stats:trips": 31, "driver_stats:rating": 4.4, "driver_profile:city": "Oslo"}
    assert rows[0]["event_times"] == {"driver_profile": "2026-11-01T00:00:00Z", "driver_stats": "2026-11-01T03:00:00Z"}
    assert rows[1]["features"] == {"driver_stats:trips": 200, "driver_stats:rating": 3.9, "driver_profile:city": "Lima"}
    assert rows[2]["features"] == dict.fromkeys(rows[0]["features"]) and rows[2]["event_times"] == {}  # none online
    view = cli(process, "features", "get", "driver_profile", "--entity", "2")
    assert view == [{"entity_key": "2", "features": {"driver_profile:city": "Lima"},
                     "event_times": {"driver_profile": "2026-11-01T00:00:00Z"}}]  # fmt: skip
    text = subprocess.run(
        [sys.executable, "-m", "weir.cli", "features", "get", "ranking", "--entity", "1", "--entity", "9",
         "--control-plane", process.address, "--token", "t-replica"], capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines() == [
        "entity_key\tdriver_stats:trips\tdriver_stats:rating\tdriver_profile:city",
        "1\t31\t4.4\tOslo",
        "9\t-\t-\t-",
    ]
    unknown = subprocess.run(
        [sys.executable, "-m", "weir.cli", "features", "get", "rankings", "--entity", "1", "--control-plane",
         process.address, "--token", "t-replica"], capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert unknown.returncode == 1 and unknown.stderr.startswith("weir features: NOT_FOUND: name: expected a feature")
    assert "'rankings'" in unknown.stderr and "Traceback" not in unknown.stderr
    with grpc.insecure_channel(process.address) as channel:  # values are not for anyone without a token
        with pytest.raises(grpc.RpcError) as caught:
            features_pb2_grpc.FeaturesStub(channel).GetOnlineFeatures(
                features_pb2.OnlineFeaturesRequest(name="ranking", entity_keys=["1"]), timeout=10
            )
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED

    listed = cli(process, "features", "list", token="t-replica")
    assert listed["revision"] >= 1
    assert listed["entities"] == [{"name": "driver", "join_keys": ["driver_id"], "value_type": "INT64"}]
    stats = next(view for view in listed["feature_views"] if view["name"] == "driver_stats")
    assert stats["features"] == [{"name": "trips", "dtype": "INT64"}, {"name": "rating", "dtype": "FLOAT64"}]
    assert stats["ttl_seconds"] == 7200 and stats["freshness"] == "batch" and stats["source"] == str(repo / "stats")
    assert listed["feature_services"] == [
        {"name": "ranking", "features": ["driver_stats:trips", "driver_stats:rating", "driver_profile:city"]}
    ]
    text = subprocess.run(
        [sys.executable, "-m", "weir.cli", "features", "list", "--control-plane", process.address, "--token",
         "t-replica"], capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    assert "feature_view driver_stats: entities driver; freshness batch; ttl 7200 s;" in text, text
    assert "  rating\tFLOAT64" in text and "feature_service ranking: driver_stats:trips, " in text
    local = subprocess.run(
        [sys.executable, "-m", "weir.cli", "features", "list", str(repo / "features.toml"), "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert json.loads(local.stdout)["feature_services"] == listed["feature_services"]


def rpc_error(call) -> WeirError:  # type: ignore[no-untyped-def]
    with pytest.raises(WeirError) as caught:
        call()
    return caught.value


@pytest.mark.parametrize("control", ["sqlite"], indirect=True)
def test_feature_rpcs_refuse_bad_input_naming_the_field(control, tmp_path: Path) -> None:
    process, _ = control
    with FeatureStoreClient(process.address, "t-deployer") as client:
        nothing_applied = rpc_error(lambda: client.get_historical_features("ranking", entity_rows(2)))
        assert (
            nothing_applied.kind is ErrorKind.FAILED_PRECONDITION and "weir features apply" in nothing_applied.message
        )
        repo = tmp_path / "repo"
        repo.mkdir()
        client.apply(write_driver_repo(repo))
        unknown = rpc_error(lambda: client.get_historical_features("nope", entity_rows(2)))
        assert unknown.kind is ErrorKind.NOT_FOUND and "no feature service 'nope'" in unknown.message
        no_time = rpc_error(lambda: client.get_historical_features("ranking", pa.table({"driver_id": [1]})))
        assert no_time.kind is ErrorKind.INVALID_ARGUMENT and "event_timestamp" in no_time.message
        backwards = rpc_error(lambda: client.materialize(at(5), at(1)))
        assert backwards.kind is ErrorKind.INVALID_ARGUMENT and backwards.message.startswith("end:")
        unknown_view = rpc_error(lambda: client.push("ghost", pa.table({"driver_id": [1]})))
        assert unknown_view.kind is ErrorKind.NOT_FOUND and "no feature view 'ghost'" in unknown_view.message
        missing = rpc_error(lambda: client.push("driver_stats", pa.table({"driver_id": [1]})))
        assert missing.kind is ErrorKind.INVALID_ARGUMENT and "missing ['event_timestamp']" in missing.message
    with FeatureStoreClient(process.address, "t-replica") as viewer:
        denied = rpc_error(lambda: viewer.materialize_incremental())
        assert denied.kind is ErrorKind.PERMISSION_DENIED
    with grpc.insecure_channel(process.address) as channel:
        stub = features_pb2_grpc.FeaturesStub(channel)
        garbage = iter([features_pb2.HistoricalFeaturesRequest(feature_service="ranking", arrow_ipc=b"not arrow")])
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.GetHistoricalFeatures(garbage, metadata=client_metadata("t-deployer"), timeout=10))
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "arrow_ipc (entity rows): expected an Arrow IPC stream" in caught.value.details()
        # a 100k-character name and a time past year 9999: named, not echoed whole, never INTERNAL
        long_name = iter([features_pb2.HistoricalFeaturesRequest(feature_service="s" * 100_000)])
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.GetHistoricalFeatures(long_name, metadata=client_metadata("t-replica"), timeout=10))
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details() == "feature_service: expected at most 256 characters, got 100,000"
        far = features_pb2.MaterializeRequest()
        far.start.seconds, far.end.seconds = 0, 2**62
        with pytest.raises(grpc.RpcError) as caught:
            stub.Materialize(far, metadata=client_metadata("t-deployer"), timeout=10)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT and caught.value.details().startswith("end:")
    assert process.process.poll() is None  # nothing above hurt the server


def test_a_control_plane_without_an_online_store_says_so(tmp_path: Path) -> None:
    state_dir = tmp_path / "control"
    process = start_control(state_dir, str(state_dir / "control.db"), free_port(), "--feature-root", str(tmp_path))
    try:
        repo = tmp_path / "repo"
        repo.mkdir()
        cli(process, "features", "apply", str(write_driver_repo(repo)))
        result = subprocess.run(
            [sys.executable, "-m", "weir.cli", "features", "materialize-incremental", "--control-plane",
             process.address, "--token", "t-deployer", "--json"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        error = json.loads(result.stdout)["error"]
        assert result.returncode == 1 and error["code"] == "FAILED_PRECONDITION"
        assert "--online-store" in error["message"]
    finally:
        process.process.terminate()
        process.process.wait(timeout=30)
