"""A job's code archive (tar, optionally gzip/bz2/xz), checked completely before anything is stored and
unpacked only after that.

The archive comes from a client, so every bound holds while it is read, not after: the bytes it
inflates to (headers included) are counted as they are decompressed and reading stops at the limit
(a gzip bomb costs at most the limit in CPU and one chunk in memory); members are read in chunks;
the member count is bounded. Only regular files and directories with relative names inside the
code directory are accepted: links (symbolic or hard, wherever they point), devices and fifos are
refused, as are '..', absolute names and a name used twice. A refusal names ``spec.code_archive``
and the member.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import lzma
import os
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from weir_proto.errors import InvalidArgumentError

FIELD = "spec.code_archive"
MAX_ARCHIVE_BYTES = 64 * 1024 * 1024  # as sent (compressed)
MAX_UNPACKED_BYTES = 256 * 1024 * 1024  # inflated, tar headers included
MAX_MEMBERS = 10_000
MAX_NAME_CHARS = 1024
CHUNK = 1 << 20
ECHO_CHARS = 120  # an echoed member name is cut here


@dataclass(frozen=True)
class Limits:
    archive_bytes: int = MAX_ARCHIVE_BYTES
    unpacked_bytes: int = MAX_UNPACKED_BYTES
    members: int = MAX_MEMBERS


def _echo(name: str) -> str:
    return repr(name if len(name) <= ECHO_CHARS else name[:ECHO_CHARS] + "...")


class _Bounded(io.RawIOBase):
    """The decompressed stream, refusing to yield more than ``limit`` bytes in all."""

    def __init__(self, stream: io.BufferedIOBase, limit: int) -> None:
        self._stream = stream
        self._limit = limit
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self._stream.read(min(len(buffer), CHUNK))
        self.count += len(data)
        if self.count > self._limit:
            raise InvalidArgumentError(
                f"{FIELD}: expected at most {self._limit} bytes unpacked, got more (it inflates past the limit)"
            )
        buffer[: len(data)] = data
        return len(data)


def _decompressed(archive: bytes) -> io.BufferedIOBase:
    raw = io.BytesIO(archive)
    if archive[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if archive[:3] == b"BZh":
        return bz2.BZ2File(raw, mode="rb")
    if archive[:6] == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(raw, mode="rb")
    return raw


def _member_name(member: tarfile.TarInfo) -> str:
    """The member's name relative to the code directory ('./' stripped), or a refusal."""
    name = member.name
    if not name or len(name) > MAX_NAME_CHARS or "\0" in name:
        raise InvalidArgumentError(
            f"{FIELD}: member {_echo(name)}: expected a name of 1 to {MAX_NAME_CHARS} characters"
        )
    path = PurePosixPath(name)
    if path.is_absolute():
        raise InvalidArgumentError(f"{FIELD}: member {_echo(name)}: expected a relative name, got an absolute path")
    parts = [part for part in path.parts if part != "."]
    if ".." in parts:
        raise InvalidArgumentError(
            f"{FIELD}: member {_echo(name)}: expected a name inside the code directory, got '..'"
        )
    return "/".join(parts)


def _forget(tar: tarfile.TarFile) -> None:
    """Nothing needs the members already read (a stream is read once): keep memory flat."""
    tar.members = []  # type: ignore[attr-defined]


def _kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return f"a symbolic link (to {_echo(member.linkname)})"
    if member.islnk():
        return f"a hard link (to {_echo(member.linkname)})"
    if member.ischr() or member.isblk():
        return "a device"
    if member.isfifo():
        return "a fifo"
    return f"a member of type {member.type!r}"


def _members(archive: bytes, limits: Limits) -> tarfile.TarFile:
    if len(archive) > limits.archive_bytes:
        raise InvalidArgumentError(f"{FIELD}: expected at most {limits.archive_bytes} bytes, got {len(archive)}")
    bounded = _Bounded(_decompressed(archive), limits.unpacked_bytes)
    try:
        return tarfile.open(fileobj=io.BufferedReader(bounded, CHUNK), mode="r|")
    except (tarfile.TarError, OSError, EOFError, lzma.LZMAError, zlib.error) as error:
        raise _unreadable(archive, error) from error


def _unreadable(archive: bytes, error: BaseException) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"{FIELD}: expected a tar archive (plain, gzip, bzip2 or xz), got {len(archive)} unreadable bytes: {error}"
    )


Unpacker = Callable[[str, tarfile.TarInfo, "IO[bytes] | None"], None]


def _walk(archive: bytes, limits: Limits, on_member: Unpacker | None = None) -> str:
    """Read every member once, checking it; ``on_member(name, member, tar)`` is called for each accepted
    one (to unpack it). Returns the code hash."""
    files: dict[str, str] = {}  # name -> sha256 of its bytes
    directories: set[str] = set()
    count = 0
    try:
        with _members(archive, limits) as tar:
            for member in tar:
                count += 1
                if count > limits.members:
                    raise InvalidArgumentError(f"{FIELD}: expected at most {limits.members} members, got more")
                name = _member_name(member)
                if not (member.isfile() or member.isdir()):
                    raise InvalidArgumentError(
                        f"{FIELD}: member {_echo(member.name)}: expected a regular file or a directory, "
                        f"got {_kind(member)}"
                    )
                parents = {"/".join(name.split("/")[:index]) for index in range(1, name.count("/") + 1)}
                if name in files or (member.isfile() and name in directories) or parents & files.keys():
                    raise InvalidArgumentError(
                        f"{FIELD}: member {_echo(member.name)}: expected each name once, got it twice "
                        "(or as both a file and a directory)"
                    )
                directories |= parents
                if member.isdir():
                    if name:
                        directories.add(name)
                    _forget(tar)
                    continue
                digest = hashlib.sha256()
                extracted = tar.extractfile(member)
                if on_member is not None:
                    on_member(name, member, extracted)
                elif extracted is not None:
                    while chunk := extracted.read(CHUNK):
                        digest.update(chunk)
                files[name] = "" if on_member is not None else digest.hexdigest()
                _forget(tar)
    except InvalidArgumentError:
        raise
    except (tarfile.TarError, OSError, EOFError, lzma.LZMAError, zlib.error) as error:
        raise _unreadable(archive, error) from error
    if on_member is not None:
        return ""
    total = hashlib.sha256()
    for name in sorted(files):
        total.update(name.encode() + b"\0" + files[name].encode() + b"\n")
    return total.hexdigest()


def check_archive(archive: bytes, limits: Limits = Limits()) -> str:
    """Refuse an archive that is not a bounded tar of regular files and directories (InvalidArgumentError
    naming the member); returns its code hash: sha256 over the files' sorted names and contents, so the
    same code hashes the same whatever the archive's timestamps, order or compression ('' for none)."""
    if not archive:
        return ""
    return _walk(archive, limits)


def unpack(archive: bytes, directory: Path, limits: Limits = Limits()) -> None:
    """Unpack a checked archive into ``directory`` (created): files 0644 (0755 when executable),
    directories 0755, nothing followed (a name that exists already as a link is refused by the
    kernel: O_NOFOLLOW | O_EXCL)."""
    directory.mkdir(parents=True, exist_ok=True)

    def write(name: str, member: tarfile.TarInfo, source: IO[bytes] | None) -> None:
        target = directory / name
        for parent in reversed(target.relative_to(directory).parents[:-1]):
            (directory / parent).mkdir(mode=0o755, exist_ok=True)
        mode = 0o755 if member.mode & 0o111 else 0o644
        descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        with os.fdopen(descriptor, "wb") as handle:
            while source is not None and (chunk := source.read(CHUNK)):
                handle.write(chunk)
        os.chmod(target, mode)  # the umask does not decide a script's executable bit

    _walk(archive, limits, write)
