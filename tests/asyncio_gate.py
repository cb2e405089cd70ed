"""The suite fails on asyncio's signs of lost work: a task destroyed while pending, an exception
nobody retrieved, an async generator closed while running. asyncio only logs them (often from a
garbage collection long after the cause), so a test that causes one passes unless we look.

In-process: a handler on the ``asyncio`` logger; each test's teardown collects garbage and fails
the test if a record appeared during it. Subprocesses (`weir serve`, `weir control`): their log
lines are scanned the same way (``watch_lines`` registers a process's captured lines).
"""

from __future__ import annotations

import gc
import logging
import threading

LOST_WORK = (
    "Task was destroyed but it is pending",
    "exception was never retrieved",
    "asynchronous generator is already running",
    "an error occurred during closing of asynchronous generator",
    "was never awaited",
)


def lost_work(text: str) -> bool:
    return any(sign in text for sign in LOST_WORK)


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # a malformed record is not ours to judge
            return
        if lost_work(text):
            self.messages.append(text.splitlines()[0][:300])


class AsyncioGate:
    def __init__(self) -> None:
        self._collector = _Collector()
        self._watched: list[tuple[str, list[str]]] = []
        self._seen: dict[int, int] = {}
        self._lock = threading.Lock()

    def install(self) -> None:
        logging.getLogger("asyncio").addHandler(self._collector)

    def watch_lines(self, name: str, lines: list[str]) -> None:
        """Scan a subprocess's captured log lines (the list it keeps appending to)."""
        with self._lock:
            self._watched.append((name, lines))

    def found(self) -> list[str]:
        """What appeared since the last call (after a garbage collection, which is when asyncio
        notices destroyed tasks)."""
        gc.collect()
        found, self._collector.messages = self._collector.messages, []
        with self._lock:
            for name, lines in self._watched:
                start = self._seen.get(id(lines), 0)
                snapshot = list(lines[start:])
                self._seen[id(lines)] = start + len(snapshot)
                found.extend(f"{name}: {line[:300]}" for line in snapshot if lost_work(line))
        return found


GATE = AsyncioGate()
