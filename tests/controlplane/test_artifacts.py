"""weir_control.artifacts: content-addressed blobs written atomically, verified on write and on
read, and garbage-collected when no version references them."""

from __future__ import annotations

import hashlib
import io
import os
import re
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server.test_torch_backend import CreatesMarker, Scale, exported_members, hostile_export, zip_members
from weir_control.artifacts import ArtifactStore
from weir_proto.artifact_safety import ArtifactKind, UnsafeArtifactError, inspect_artifact
from weir_proto.errors import InternalError, InvalidArgumentError, NotFoundError

DATA = os.urandom(3 << 20)
GENUINE_EXPORT = zip_members(exported_members())
SHA = hashlib.sha256(DATA).hexdigest()


def chunks(data: bytes, size: int = 1 << 20) -> list[bytes]:
    return [data[offset : offset + size] for offset in range(0, len(data), size)]


def test_a_blob_is_stored_under_its_digest_and_read_back_whole(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    stored = store.put(chunks(DATA), SHA, len(DATA))
    assert (stored.sha256, stored.size) == (SHA, len(DATA))
    assert store.path_of(SHA) == tmp_path / "blobs" / SHA[:2] / SHA
    assert b"".join(store.read(SHA)) == DATA
    assert list((tmp_path / "incoming").iterdir()) == []  # nothing left behind


@pytest.mark.parametrize(
    ("sha256", "size", "message"),
    [
        ("0" * 64, len(DATA), "expected the bytes to hash to 000"),
        (SHA, len(DATA) + 1, f"expected {len(DATA) + 1} bytes (artifact_size), got {len(DATA)}"),
        (SHA, 10, "expected 10 bytes (artifact_size), got more"),
        ("not-hex", 0, "expected 64 lowercase hex characters"),
    ],
)
def test_a_blob_that_does_not_match_its_header_is_never_published(
    tmp_path: Path, sha256: str, size: int, message: str
) -> None:
    store = ArtifactStore(tmp_path)
    with pytest.raises(InvalidArgumentError, match=re.escape(message)):
        store.put(chunks(DATA), sha256, size)
    assert list((tmp_path / "blobs").glob("*/*")) == []
    assert list((tmp_path / "incoming").iterdir()) == []


def test_corrupted_bytes_on_disk_are_detected_when_read(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    store.put(chunks(DATA), SHA)
    path = store.path_of(SHA)
    path.write_bytes(DATA[:-1] + b"\x00")
    with pytest.raises(InternalError, match="stored bytes are corrupt"):
        b"".join(store.read(SHA))
    with pytest.raises(NotFoundError):
        list(store.read("1" * 64))


def test_garbage_collection_keeps_referenced_and_recent_blobs(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    kept = store.put([b"kept"], hashlib.sha256(b"kept").hexdigest())
    orphan = store.put([b"orphan"], hashlib.sha256(b"orphan").hexdigest())
    recent = store.put([b"recent"], hashlib.sha256(b"recent").hexdigest())
    abandoned = tmp_path / "incoming" / "upload-abandoned"
    abandoned.write_bytes(b"half")
    old = time.time() - 7200
    for path in (store.path_of(kept.sha256), store.path_of(orphan.sha256), abandoned):
        os.utime(path, (old, old))

    deleted = store.collect_garbage({kept.sha256}, min_age_seconds=3600)

    assert deleted == sorted([f"blobs/{orphan.sha256[:2]}/{orphan.sha256}", "incoming/upload-abandoned"])
    assert store.exists(kept.sha256) and store.exists(recent.sha256) and not store.exists(orphan.sha256)


# --- model files are checked before they are stored (issue 14, finding 10) --------------------------


def _upload(store: ArtifactStore, data: bytes, artifact_filename: str) -> None:
    writer = store.writer(hashlib.sha256(data).hexdigest(), len(data), artifact_filename)
    writer.write(data)
    writer.commit()


def _nothing_stored(root: Path) -> bool:
    return list((root / "incoming").iterdir()) == [] and list((root / "blobs").glob("*/*")) == []


def test_a_hostile_export_archive_is_refused_and_never_stored(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    marker = tmp_path / "marker"
    for how in ("weight", "sample_inputs", "constant", "legacy"):
        data = hostile_export(tmp_path / f"{how}.pt2", marker, how).read_bytes()
        with pytest.raises(UnsafeArtifactError) as caught:
            _upload(store, data, "model.pt2")
        assert caught.value.message.startswith("artifact 'model.pt2': refusing"), caught.value.message
        assert _nothing_stored(tmp_path / "store")
    assert not marker.exists()


def test_random_bytes_are_not_an_archive_and_a_pickled_module_is_refused(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    with pytest.raises(InvalidArgumentError) as random_bytes:
        _upload(store, DATA, "model.pt")
    assert "not a TorchScript/torch.export archive" in random_bytes.value.message
    module = io.BytesIO()
    torch.save(Scale(), module)
    with pytest.raises(UnsafeArtifactError) as pickled:
        _upload(store, module.getvalue(), "model.pt")
    assert "refusing to load a pickled Python object" in pickled.value.message
    assert _nothing_stored(tmp_path / "store")


def test_an_archive_must_be_the_kind_its_name_says_and_a_good_one_is_stored(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    scripted = io.BytesIO()
    torch.jit.save(torch.jit.script(Scale()), scripted)
    with pytest.raises(InvalidArgumentError) as mismatch:
        _upload(store, scripted.getvalue(), "model.pt2")
    assert "artifact_filename 'model.pt2' expects a export archive" in mismatch.value.message
    _upload(store, scripted.getvalue(), "model.pt")
    exported = tmp_path / "model.pt2"
    exported.write_bytes(zip_members(exported_members()))
    _upload(store, exported.read_bytes(), "model.pt2")
    assert store.exists(hashlib.sha256(scripted.getvalue()).hexdigest())
    assert store.exists(hashlib.sha256(exported.read_bytes()).hexdigest())


@pytest.mark.parametrize("protocol", [2, 4])
def test_sample_inputs_may_hold_tensors_only_whatever_the_pickle_protocol(tmp_path: Path, protocol: int) -> None:
    members = exported_members()
    sample = next(name for name in members if "/data/sample_inputs/" in name)
    tensors = io.BytesIO()
    torch.save(((torch.ones(2, 3),), {}), tensors, pickle_protocol=protocol)
    members[sample] = tensors.getvalue()
    assert inspect_artifact(_write(tmp_path / "tensors.pt2", members)) == ArtifactKind.EXPORT
    hostile = io.BytesIO()
    torch.save(((CreatesMarker(tmp_path / "marker"),), {}), hostile, pickle_protocol=protocol)
    members[sample] = hostile.getvalue()
    with pytest.raises(UnsafeArtifactError) as caught:
        inspect_artifact(_write(tmp_path / "hostile.pt2", members))
    assert "sample inputs" in caught.value.message and "only tensors, storages and dtypes" in caught.value.message
    assert not (tmp_path / "marker").exists()


def _write(path: Path, members: dict[str, bytes]) -> Path:
    path.write_bytes(zip_members(members))
    return path


def test_an_export_program_must_take_every_input_the_config_declares(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    data = zip_members(exported_members())  # Scale takes one input
    one = 'max_batch_size: 4 input [ { name: "x" data_type: TYPE_FP32 dims: [ 3 ] } ] output [ { name: "y" data_type: TYPE_FP32 dims: [ 3 ] } ]'  # noqa: E501
    two = one.replace("input [ {", 'input [ { name: "extra" data_type: TYPE_FP32 dims: [ 3 ] }, {')
    writer = store.writer(hashlib.sha256(data).hexdigest(), len(data), "model.pt2", two)
    writer.write(data)
    with pytest.raises(InvalidArgumentError) as caught:
        writer.commit()
    assert "takes 1 inputs, config_pbtxt declares 2" in caught.value.message
    assert _nothing_stored(tmp_path / "store")
    writer = store.writer(hashlib.sha256(data).hexdigest(), len(data), "model.pt2", one)
    writer.write(data)
    assert writer.commit().size == len(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 255)), min_size=1, max_size=8))
def test_a_damaged_archive_is_judged_or_refused_never_an_unexpected_error(
    tmp_path: Path, edits: list[tuple[int, int]]
) -> None:
    data = bytearray(GENUINE_EXPORT)
    for position, value in edits:
        data[position % len(data)] = value
    path = tmp_path / "damaged.pt2"
    path.write_bytes(bytes(data))
    try:
        inspect_artifact(path)
    except InvalidArgumentError as error:
        assert len(error.message) < 2000
