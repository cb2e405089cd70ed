"""The in-process tier: an LRU of response bytes, bounded by the bytes it holds.

Not thread-safe, by design: the data plane touches it only from the event loop thread, where a
lock would be pure cost. Code running in executor threads must not call it.
"""

from __future__ import annotations

from collections import OrderedDict

from weir.cache.metrics import CacheMetrics


class LocalResponseCache:
    def __init__(self, capacity_bytes: int, metrics: CacheMetrics) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes: expected a non-negative number of bytes, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self.metrics = metrics
        # Least recently used first: eviction pops from the front, a hit moves an entry to the end.
        self._entries: OrderedDict[bytes, bytes] = OrderedDict()
        self._bytes_used = 0

    @property
    def bytes_used(self) -> int:
        """Keys plus values of every entry held."""
        return self._bytes_used

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> bytes | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: bytes, value: bytes) -> None:
        """Store ``value`` under ``key``, evicting least recently used entries until it fits. A value
        that could never fit is not stored, and the cache is left as it was: evicting everything
        for it would still not make room."""
        size = _entry_size(key, value)
        if size > self.capacity_bytes:
            return
        self._remove(key)
        while self._bytes_used + size > self.capacity_bytes:
            evicted_key, evicted_value = self._entries.popitem(last=False)
            self._account(-1, -_entry_size(evicted_key, evicted_value))
            self.metrics.evictions.inc()
        self._entries[key] = value
        self._account(1, size)

    def clear(self) -> None:
        self._account(-len(self._entries), -self._bytes_used)
        self._entries.clear()

    def _remove(self, key: bytes) -> None:
        value = self._entries.pop(key, None)
        if value is not None:
            self._account(-1, -_entry_size(key, value))

    def _account(self, entries: int, size: int) -> None:
        # Deltas, not absolute values: several caches may report into one set of metrics.
        self._bytes_used += size
        self.metrics.local_entries.inc(entries)
        self.metrics.local_bytes.inc(size)


def _entry_size(key: bytes, value: bytes) -> int:
    return len(key) + len(value)
