"""Every path the control plane reads or writes for features stays inside the operator's feature root
(``weir control --feature-root``, default ``<state dir>/features``).

A feature view's ``source`` (a file, a glob or a directory) is checked twice: when definitions are
applied (its fixed part, the path up to the first glob character, must resolve inside the root, symbolic
links followed, and its pattern part may not climb with ``..``), and again each time it is read or
written, because links inside the root can change after the definitions were applied: then every file
the source matches must itself resolve inside the root, and DuckDB is handed that explicit list of
files, never the pattern, so it cannot glob its way out. Hidden files (``.name``) are never read: a push
stages its file under a hidden name before renaming it.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

from weir_control.features.definitions import Definitions, FeatureView
from weir_proto.errors import FailedPreconditionError, InvalidArgumentError

ROOT_FLAG = "weir control --feature-root"
_MAGIC = frozenset("*?[")


def inside(path: str | Path, root: Path) -> bool:
    """Whether ``path``, with every symbolic link resolved, lies in ``root`` (itself resolved)."""
    return Path(os.path.realpath(path)).is_relative_to(Path(os.path.realpath(root)))


def fixed_part(source: str) -> tuple[Path, list[str]]:
    """The path up to the first component with a glob character, and the components after it."""
    parts = Path(source).parts
    for index, part in enumerate(parts):
        if _MAGIC & set(part):
            return Path(*parts[:index]), list(parts[index:])
    return Path(source), []


def check_base_directory(base_directory: str, root: Path, field: str = "base_directory") -> None:
    if not inside(base_directory, root):
        raise InvalidArgumentError(
            f"{field}: expected a directory inside the feature root {root} ({ROOT_FLAG}), got {base_directory!r}"
        )


def check_source(view: FeatureView, root: Path, where: str) -> None:
    """At apply time: the source's fixed part inside the root, its pattern part not climbing out."""
    fixed, pattern = fixed_part(view.source)
    if ".." in pattern or not fixed.is_absolute() or not inside(fixed, root):
        raise InvalidArgumentError(
            f"{where}: feature_view '{view.name}' source: expected a path inside the feature root {root} "
            f"({ROOT_FLAG}), got {view.source!r}"
        )


def check_definitions(definitions: Definitions, root: Path, where: str = "definitions_toml") -> None:
    for view in definitions.views.values():
        check_source(view, root, where)


def parquet_files(view: FeatureView, root: Path) -> list[str]:
    """At use time: the Parquet files the view's source names, each checked to lie inside the root."""
    check_source(view, root, "feature definitions")  # a root moved since the definitions were applied
    source = Path(view.source)
    if source.is_dir():
        candidates = []
        for directory, subdirectories, files in os.walk(source):  # links to directories are not followed
            subdirectories[:] = sorted(name for name in subdirectories if not name.startswith("."))
            candidates += [
                os.path.join(directory, name)
                for name in sorted(files)
                if name.endswith(".parquet") and not name.startswith(".")
            ]
    else:
        candidates = sorted(glob.glob(view.source, recursive=True))  # hidden names are skipped by glob
    files = []
    for candidate in candidates:
        if not inside(candidate, root):
            raise FailedPreconditionError(
                f"feature_view '{view.name}' source: {candidate} resolves outside the feature root {root} "
                f"({ROOT_FLAG}); it is not read"
            )
        if os.path.isfile(candidate):
            files.append(candidate)
    if not files:
        raise FailedPreconditionError(
            f"feature_view '{view.name}' source: expected Parquet files, none match {view.source!r}"
        )
    return files


def push_directory(view: FeatureView, root: Path | None) -> Path:
    """The directory a push appends the view's offline log to (``<source>/pushed``), inside the root when
    there is one (the control plane's; a user's own definitions, pushed locally, have none)."""
    if root is not None:
        check_source(view, root, "feature definitions")
    directory = Path(view.source)
    if not directory.is_dir():
        raise InvalidArgumentError(
            f"view '{view.name}' source: push needs a directory (the offline log goes there), got {view.source}"
        )
    pushed = directory / "pushed"
    pushed.mkdir(exist_ok=True)
    if root is not None and (pushed.is_symlink() or not inside(pushed, root)):
        raise FailedPreconditionError(
            f"view '{view.name}' source: {pushed} resolves outside the feature root {root} ({ROOT_FLAG})"
        )
    return pushed
