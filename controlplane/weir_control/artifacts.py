"""The artifact store: model files in a content-addressed directory, named by their sha256.

    <root>/blobs/ab/abcdef...    one file per distinct content, never modified once in place
    <root>/incoming/             uploads in progress (a crash leaves them here; `gc` clears them)

A write goes to a temporary file in ``incoming/`` while its sha256 is computed, is fsynced, checked
against the expected digest and size and, for a model file, against ``weir_proto.artifact_safety``
(no pickled payload, a TorchScript/torch.export archive matching its name), then renamed into place
(atomic on one file system) and the directory fsynced: a blob path either does not exist or holds
complete, verified bytes. Reads hash what they stream and fail at the end if the bytes no longer
match their name (disk corruption).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format

from weir_proto.artifact_safety import ArtifactKind, check_expected_kind, export_user_input_count, inspect_artifact
from weir_proto.errors import InternalError, InvalidArgumentError, NotFoundError, ResourceExhaustedError
from weir_proto.inference import messages as inference
from weir_proto.validation_inputs import MAX_VALIDATION_BYTES, VALIDATION_FILENAME, check_validation_npz

CHUNK_BYTES = 1 << 20  # streamed in 1 MiB pieces: large models never sit in memory whole
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def check_sha256(field: str, value: str) -> str:
    if not _SHA256.match(value):
        raise InvalidArgumentError(f"{field}: expected 64 lowercase hex characters (a sha256), got {value!r}")
    return value


def check_model_artifact(path: Path, artifact_filename: str, config_pbtxt: str = "") -> None:
    """Refuse a model file the data planes must never load: any pickled payload, anything but a
    TorchScript/torch.export archive, an archive whose kind its name contradicts, or a torch.export
    program taking fewer inputs than ``config_pbtxt`` declares (the data plane passes one per input).
    Reads the zip only: nothing is unpickled and torch is not imported in the control plane."""
    where = f"artifact {artifact_filename!r}"
    kind = inspect_artifact(path, where)
    check_expected_kind(kind, artifact_filename, where)
    if kind == ArtifactKind.EXPORT and config_pbtxt:
        config = inference.ModelConfig()
        try:
            text_format.Parse(config_pbtxt, config)
        except text_format.ParseError:
            return  # the upload's config is checked (and refused) when the upload begins
        takes = export_user_input_count(path)
        if takes is not None and takes < len(config.input):
            raise InvalidArgumentError(
                f"{where}: the torch.export program takes {takes} inputs, config_pbtxt declares {len(config.input)} "
                f"({', '.join(repr(tensor.name[:64]) for tensor in config.input)}): the data plane passes one "
                "argument per declared input"
            )


def check_validation_header(sha256: str, size: int) -> None:
    """An upload's announced validation inputs: none (both empty), or a sha256 and a size within
    ``MAX_VALIDATION_BYTES`` (the size bounds what the writer accepts)."""
    if not sha256 and not size:
        return
    check_sha256("validation_sha256", sha256)
    if not 0 < size <= MAX_VALIDATION_BYTES:
        raise InvalidArgumentError(f"validation_size: expected 1 to {MAX_VALIDATION_BYTES} bytes, got {size}")


@dataclass(frozen=True)
class StoredBlob:
    sha256: str
    size: int


@contextlib.contextmanager
def _out_of_space_is_resource_exhausted(writer: BlobWriter) -> Iterator[None]:
    """A full (or over-quota) artifact directory is the operator's to fix, not an UNKNOWN for the
    client: RESOURCE_EXHAUSTED naming the directory, and the partial file goes at once."""
    try:
        yield
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        writer.discard()
        raise ResourceExhaustedError(
            f"artifact store: no space left in {writer.directory} ({error.strerror}); the upload was dropped"
        ) from error


class BlobWriter:
    """Receives an upload's bytes; ``commit`` verifies and publishes them, ``discard`` drops them.
    With ``artifact_filename``, the bytes are a model file and must pass ``check_model_artifact``."""

    def __init__(
        self,
        store: ArtifactStore,
        expected_sha256: str,
        expected_size: int,
        artifact_filename: str = "",
        config_pbtxt: str = "",
        check: Callable[[Path], None] | None = None,
    ) -> None:
        self._store = store
        self._check = check
        self._expected_sha256 = expected_sha256
        self._expected_size = expected_size
        self._artifact_filename = artifact_filename
        self._config_pbtxt = config_pbtxt
        self.directory = store.incoming
        descriptor, name = tempfile.mkstemp(dir=store.incoming, prefix="upload-")
        self._path = Path(name)
        self._file = os.fdopen(descriptor, "wb")
        self._digest = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self._expected_size and self.size > self._expected_size:
            raise InvalidArgumentError(
                f"artifact: expected {self._expected_size} bytes (artifact_size), got more ({self.size} so far)"
            )
        self._digest.update(chunk)
        with _out_of_space_is_resource_exhausted(self):
            self._file.write(chunk)

    def commit(self) -> StoredBlob:
        with _out_of_space_is_resource_exhausted(self):
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        digest = self._digest.hexdigest()
        if self._expected_size and self.size != self._expected_size:
            self.discard()
            raise InvalidArgumentError(
                f"artifact: expected {self._expected_size} bytes (artifact_size), got {self.size}"
            )
        if digest != self._expected_sha256:
            self.discard()
            raise InvalidArgumentError(
                f"artifact_sha256: expected the bytes to hash to {self._expected_sha256}, they hash to {digest}"
            )
        if self._artifact_filename:
            try:
                check_model_artifact(self._path, self._artifact_filename, self._config_pbtxt)
            except BaseException:
                self.discard()  # a refused artifact never enters the store
                raise
        if self._check is not None:
            try:
                self._check(self._path)
            except BaseException:
                self.discard()
                raise
        target = self._store.path_of(digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._path, target)  # same content, same name: replacing an existing blob is harmless
        _fsync_directory(target.parent)
        return StoredBlob(digest, self.size)

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.incoming = root / "incoming"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.incoming.mkdir(parents=True, exist_ok=True)

    def path_of(self, sha256: str) -> Path:
        return self.blobs / sha256[:2] / sha256

    def writer(
        self, expected_sha256: str, expected_size: int, artifact_filename: str = "", config_pbtxt: str = ""
    ) -> BlobWriter:
        """A writer for one upload; with ``artifact_filename`` (model.pt, model.pt2) the bytes must be
        a safe model file of that kind, consistent with ``config_pbtxt`` (``check_model_artifact``),
        before they are stored."""
        checked = check_sha256("artifact_sha256", expected_sha256)
        return BlobWriter(self, checked, expected_size, artifact_filename, config_pbtxt)

    def validation_writer(self, expected_sha256: str, expected_size: int) -> BlobWriter:
        """A writer for a version's validation inputs: a bounded npz of plain arrays
        (``weir_proto.validation_inputs``), checked before it is stored."""
        check_validation_header(expected_sha256, expected_size)
        return BlobWriter(
            self, expected_sha256, expected_size,
            check=lambda path: check_validation_npz(path, f"validation inputs ({VALIDATION_FILENAME})"),
        )  # fmt: skip

    def put(self, chunks: Iterable[bytes], sha256: str, size: int = 0) -> StoredBlob:
        writer = self.writer(sha256, size)
        try:
            for chunk in chunks:
                writer.write(chunk)
        except BaseException:
            writer.discard()
            raise
        return writer.commit()

    def exists(self, sha256: str) -> bool:
        return self.path_of(sha256).is_file()

    def size_of(self, sha256: str) -> int:
        try:
            return self.path_of(sha256).stat().st_size
        except FileNotFoundError as error:
            raise NotFoundError(f"artifact {sha256}: not in the artifact store") from error

    def read(self, sha256: str) -> Iterator[bytes]:
        """The blob's bytes in chunks; raises INTERNAL after the last chunk if they do not hash to
        their name (a reader must treat what it got as invalid then)."""
        path = self.path_of(check_sha256("artifact_sha256", sha256))
        digest = hashlib.sha256()
        try:
            handle = path.open("rb")
        except FileNotFoundError as error:
            raise NotFoundError(f"artifact {sha256}: not in the artifact store") from error
        with handle:
            while chunk := handle.read(CHUNK_BYTES):
                digest.update(chunk)
                yield chunk
        if digest.hexdigest() != sha256:
            raise InternalError(f"artifact {sha256}: stored bytes are corrupt (they hash to {digest.hexdigest()})")

    def collect_garbage(self, referenced: set[str], min_age_seconds: float = 3600.0) -> list[str]:
        """Delete blobs no version references and abandoned uploads, both older than
        ``min_age_seconds`` (an upload in progress may not be registered as READY yet). Returns
        what was deleted, as paths relative to the root."""
        cutoff = time.time() - min_age_seconds
        deleted: list[str] = []
        for path in list(self.blobs.glob("*/*")) + list(self.incoming.glob("*")):
            if path.parent.parent == self.blobs and path.name in referenced:
                continue
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime <= cutoff:
                    path.unlink()
                    deleted.append(str(path.relative_to(self.root)))
        return sorted(deleted)


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
