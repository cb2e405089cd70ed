"""Names of models, endpoints, aliases, variants and flags: they become directory and file names on
data planes, so one conservative pattern for all of them."""

from __future__ import annotations

import re

from weir_proto.errors import InvalidArgumentError

MAX_NAME_LENGTH = 128
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def check_name(field: str, value: str) -> None:
    """A model, endpoint, alias, variant or flag name (InvalidArgumentError naming ``field``)."""
    if not _NAME.fullmatch(value) or ".." in value:
        raise InvalidArgumentError(
            f"{field}: expected 1-{MAX_NAME_LENGTH} ASCII letters, digits, '_', '.' or '-', starting with a letter "
            f"or digit, without '..', got {shown(value)}"
        )


def shown(value: str, limit: int = 80) -> str:
    """A client's string for an error message, truncated."""
    return repr(value) if len(value) <= limit else f"{value[:limit]!r}... ({len(value)} characters)"
