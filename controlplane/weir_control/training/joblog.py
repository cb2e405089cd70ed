"""What a job's log says about how its attempt ended (torchrun's "Root Cause" report, the last line)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from weir_control.training.jobfiles import open_inside


def log_tail(path: Path, size: int = 8192) -> list[str]:
    try:
        with os.fdopen(open_inside(path.parent, path.name), "rb") as handle:
            handle.seek(max(0, os.fstat(handle.fileno()).st_size - size))
            return [line.strip() for line in handle.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return []


_ROOT_CAUSE = re.compile(r"^exitcode\s*:\s*(-?\d+)")
_RANK = re.compile(r"^rank\s*:\s*(\d+)")


def torchrun_root_cause(path: Path) -> tuple[int, int] | None:
    """(rank, exit code) of the first failed worker, from torchrun's "Root Cause" report in the log."""
    lines = log_tail(path)
    start = max((index for index, line in enumerate(lines) if line.startswith("Root Cause")), default=None)
    if start is None:
        return None
    rank = code = None
    for line in lines[start:]:
        if rank is None and (match := _RANK.match(line)):
            rank = int(match.group(1))
        if code is None and (match := _ROOT_CAUSE.match(line)):
            code = int(match.group(1))
    return (rank or 0, code) if code is not None else None


def last_log_line(path: Path) -> str:
    lines = log_tail(path, 4096)
    lines = [line for line in lines if not line.startswith("--- weir:")]
    return lines[-1][:300] if lines else ""
