"""weir_control.artifacts: content-addressed blobs written atomically, verified on write and on
read, and garbage-collected when no version references them."""

from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path

import pytest

from weir_control.artifacts import ArtifactStore
from weir_proto.errors import InternalError, InvalidArgumentError, NotFoundError

DATA = os.urandom(3 << 20)
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
