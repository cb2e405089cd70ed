"""Files in a job's directory, as the control plane opens them.

The job owns its directory and may have put anything there: a link to the control plane's database
where its log or exported model should be, a fifo that blocks a reader, a directory link halfway down
a path. The control plane (often root) therefore opens a path below a job directory one component at a
time without following any link, never blocks on opening, and accepts only regular files.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path, PurePath


def open_inside(root: Path, relative: str, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
    """A descriptor of the regular file ``root/relative``; OSError when a component below ``root`` is a
    link (ELOOP/ENOTDIR), the file is not a regular one, or it does not exist (without O_CREAT)."""
    parts = PurePath(relative).parts
    if not parts or any(part in ("..", "/") for part in parts):
        raise OSError(errno.EINVAL, f"expected a relative path inside {root}, got {relative!r}")
    directory = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
            os.close(directory)
            directory = inner
        flags |= os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # a fifo must not block the control plane
        descriptor = os.open(parts[-1], flags, mode, dir_fd=directory)
    finally:
        os.close(directory)
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise OSError(errno.EINVAL, f"{root / relative}: expected a regular file")
    fcntl.fcntl(descriptor, fcntl.F_SETFL, fcntl.fcntl(descriptor, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return descriptor


def read_inside(root: Path, relative: str, limit: int, offset: int = 0) -> bytes:
    """At most ``limit`` bytes of ``root/relative`` from ``offset`` (see ``open_inside``)."""
    with os.fdopen(open_inside(root, relative), "rb") as handle:
        if offset:
            handle.seek(offset)
        return handle.read(limit)


def size_inside(root: Path, relative: str) -> int:
    descriptor = open_inside(root, relative)
    try:
        return os.fstat(descriptor).st_size
    finally:
        os.close(descriptor)
