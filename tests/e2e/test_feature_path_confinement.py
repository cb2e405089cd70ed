"""Feature sources and Parquet references stay inside the operator's feature root (`weir control
--feature-root`), with a real control plane: absolute, `../`, globbed and linked sources outside the
root and a base_directory outside it are refused when applied (INVALID_ARGUMENT naming the view's
source and the root); links changed after the definitions were applied are refused when read or
pushed to (nothing outside is read or written); SetReference answers alike for a missing file and for
one outside the root, existing or not."""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import free_port
from tests.controlplane.test_features_offline import write_driver_repo
from tests.e2e.test_control_plane import ControlProcess, start_control
from weir_control.features.client import FeatureStoreClient
from weir_proto.auth import client_metadata
from weir_proto.control.v1 import features_pb2, features_pb2_grpc, monitoring_pb2, monitoring_pb2_grpc
from weir_proto.errors import ErrorKind, WeirError

UTC = datetime.UTC
SECRET = {"driver_id": [1], "event_timestamp": [datetime.datetime(2026, 11, 1, tzinfo=UTC)], "trips": [4242]}
VIEW = """
[[entity]]
name = "driver"
join_keys = ["driver_id"]
value_type = "INT64"

[[feature_view]]
name = "stats"
entities = ["driver"]
source = {source}
features = [{{ name = "trips", dtype = "INT64" }}]

[[feature_service]]
name = "svc"
features = ["stats"]
"""


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[ControlProcess, Path, Path]]:
    """A control plane whose feature root is ``root``; ``outside`` holds a Parquet file it must never read."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    pq.write_table(pa.table(SECRET), outside / "secret.parquet")
    state_dir = tmp_path / "control"
    process = start_control(
        state_dir, str(state_dir / "control.db"), free_port(), "--feature-root", str(root),
        "--online-store", str(tmp_path / "online.db"),
    )  # fmt: skip
    try:
        yield process, root, outside
    finally:
        process.process.terminate()
        process.process.wait(timeout=30)


def apply(process: ControlProcess, text: str, base_directory: str = "") -> features_pb2.FeatureDefinitions:
    with grpc.insecure_channel(process.address) as channel:
        return features_pb2_grpc.FeaturesStub(channel).ApplyFeatures(
            features_pb2.ApplyFeaturesRequest(definitions_toml=text, base_directory=base_directory),
            metadata=client_metadata("t-deployer"),
            timeout=30,
        )


def refused(call) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def test_sources_outside_the_root_are_refused_when_applied(setup) -> None:  # type: ignore[no-untyped-def]
    process, root, outside = setup
    (root / "escape").symlink_to(outside)  # a link inside the root to a directory outside it
    for source in (
        str(outside / "secret.parquet"),  # absolute
        "../outside/secret.parquet",  # climbing out
        f"{root}/../outside/*.parquet",  # climbing out, then a glob
        "stats/*/../../../outside/*.parquet",  # climbing out in the glob's pattern part
        "escape/secret.parquet",  # through a link
        "escape",
    ):
        error = refused(lambda source=source: apply(process, VIEW.format(source=f'"{source}"')))
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, (source, error.details())
        assert "feature_view 'stats' source" in error.details() and str(root) in error.details(), error.details()
        assert "--feature-root" in error.details()
    # a base_directory outside the root, sent by the client or declared by the document
    error = refused(lambda: apply(process, VIEW.format(source='"secret.parquet"'), base_directory=str(outside)))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith("base_directory:")
    declared = f'base_directory = "{outside}"\n' + VIEW.format(source='"secret.parquet"')
    error = refused(lambda: apply(process, declared))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and str(root) in error.details()
    # nothing was applied
    with FeatureStoreClient(process.address, "t-replica") as viewer, pytest.raises(WeirError) as caught:
        viewer.get_historical_features(
            "svc", pa.table({"driver_id": [1], "event_timestamp": SECRET["event_timestamp"]})
        )
    assert caught.value.kind is ErrorKind.FAILED_PRECONDITION


def test_links_changed_after_apply_are_refused_when_read_or_pushed(setup) -> None:  # type: ignore[no-untyped-def]
    process, root, outside = setup
    repo = root / "repo"
    repo.mkdir()
    definitions = write_driver_repo(repo)
    with FeatureStoreClient(process.address, "t-deployer") as client:
        client.apply(definitions)  # relative sources under the root: accepted as before
        rows = pa.table({"driver_id": [1], "event_timestamp": [datetime.datetime(2026, 11, 1, 4, tzinfo=UTC)]})
        assert client.get_historical_features("ranking", rows).column("trips").to_pylist() == [31]
        # the deployer's data directory now holds a link to a file outside the root
        (repo / "stats" / "zz-leak.parquet").symlink_to(outside / "secret.parquet")
    with FeatureStoreClient(process.address, "t-replica") as viewer, pytest.raises(WeirError) as caught:
        viewer.get_historical_features("ranking", rows)
    assert caught.value.kind is ErrorKind.FAILED_PRECONDITION
    assert "resolves outside the feature root" in caught.value.message and str(outside) not in caught.value.message
    os.unlink(repo / "stats" / "zz-leak.parquet")
    # a push goes to <source>/pushed: a link there to a directory outside the root is refused
    (repo / "stats" / "pushed").symlink_to(outside)
    pushed = pa.table(
        {"driver_id": [2], "event_timestamp": [datetime.datetime(2026, 11, 1, 6, tzinfo=UTC)],
         "created": [datetime.datetime(2026, 11, 1, 6, tzinfo=UTC)], "trips": [222], "rating": [4.9]}
    )  # fmt: skip
    with FeatureStoreClient(process.address, "t-deployer") as client, pytest.raises(WeirError) as caught:
        client.push("driver_stats", pushed)
    assert caught.value.kind is ErrorKind.FAILED_PRECONDITION and "feature root" in caught.value.message
    assert sorted(path.name for path in outside.iterdir()) == ["secret.parquet"]  # nothing written outside


def test_set_reference_reads_only_inside_the_root_and_answers_alike(setup) -> None:  # type: ignore[no-untyped-def]
    process, root, outside = setup
    pq.write_table(pa.table({"x": [1.0, 2.0, 3.0]}), root / "reference.parquet")

    def set_reference(path: str) -> monitoring_pb2.ReferenceSummary:
        with grpc.insecure_channel(process.address) as channel:
            return monitoring_pb2_grpc.MonitoringStub(channel).SetReference(
                monitoring_pb2.SetReferenceRequest(endpoint="ep", parquet_path=path),
                metadata=client_metadata("t-deployer"),
                timeout=30,
            )

    assert set_reference("reference.parquet").rows == 3  # relative: to the root
    assert set_reference(str(root / "reference.parquet")).rows == 3
    (root / "link.parquet").symlink_to(outside / "secret.parquet")
    answers = {}
    for path in (
        str(outside / "secret.parquet"),  # outside, exists
        str(outside / "missing.parquet"),  # outside, missing
        "../outside/secret.parquet",
        "link.parquet",  # inside, linking outside
        "missing.parquet",  # inside, missing
        str(root),  # not a file
    ):
        error = refused(lambda path=path: set_reference(path))
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        answers[path] = error.details().replace(repr(path), "PATH")
    assert len(set(answers.values())) == 1, answers  # nothing tells which exist
    assert next(iter(answers.values())).startswith("parquet_path: expected a Parquet file inside the feature root")
