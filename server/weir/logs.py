"""Structured logging: one JSON object per line, carrying the request id of the current request.

The request id travels in a ContextVar, so every log line written while serving a request (in the
servicer, the data plane or the backend) carries it without being passed around.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from collections.abc import Callable
from typing import Any

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("weir_request_id", default="")

_STANDARD_ATTRIBUTES = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


def structured_fields(record: logging.LogRecord) -> dict[str, Any]:
    """What a line carries beyond its time, level, logger and message: the process, the current
    request's id and every ``extra=`` field (the model's name, say). Both formats write all of them."""
    fields: dict[str, Any] = {"pid": record.process}  # tells the workers of `weir serve --workers N` apart
    request_id = request_id_var.get()
    if request_id:
        fields["request_id"] = request_id
    for key, value in vars(record).items():
        if key not in _STANDARD_ATTRIBUTES and not key.startswith("_"):
            fields[key] = value
    return fields


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **structured_fields(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


_BARE_VALUE = re.compile(r"[^\s\"=\\]+")


def _text_value(value: Any) -> str:
    """A field's value as ``key=value`` shows it: bare when that is unambiguous, else JSON-quoted (so a
    value with spaces, quotes or a newline stays on its line and reads back)."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if _BARE_VALUE.fullmatch(text) else json.dumps(text)


class TextFormatter(logging.Formatter):
    """One line for people: time, level, logger, message, then the same structured fields the JSON
    format carries, as ``key=value`` (``request_id=... model=...``)."""

    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{key}={_text_value(value)}" for key, value in structured_fields(record).items())
        line = f"{_timestamp(record)} {record.levelname} {record.name}: {record.getMessage()}"
        line = f"{line} {fields}" if fields else line
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(level: str, log_format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class RateLimitedLog:
    """A warning about something a client can repeat at will (an undecodable body, say), written at
    most once per interval: a flood of bad requests must not become a flood of log lines. Each line
    says how many occurrences it stands for."""

    def __init__(
        self,
        logger: logging.Logger,
        message: str,
        interval_seconds: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._message = message
        self._interval = interval_seconds
        self._clock = clock
        self._unlogged = 0
        self._next_at: float | None = None

    def record(self, **extra: Any) -> bool:
        """Count one occurrence; log it (with the count since the last line) if the interval has
        passed. Returns whether a line was written."""
        self._unlogged += 1
        now = self._clock()
        if self._next_at is not None and now < self._next_at:
            return False
        self._logger.warning(self._message, extra={**extra, "occurrences": self._unlogged})
        self._unlogged = 0
        self._next_at = now + self._interval
        return True
