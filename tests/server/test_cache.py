"""Response cache: keys that tell every answer-changing difference apart, the byte-bounded LRU, Redis
(real servers: the shared one on 6379 and private ones started here) with its circuit breaker, and
the two tiers together."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import pytest_asyncio
import redis
import redis.asyncio
from prometheus_client import CollectorRegistry

from tests.conftest import free_port, start_redis_server, stop_redis_server
from weir.cache import CacheMetrics, LocalResponseCache, RedisResponseCache, ResponseCache, response_cache_key

SHARED_REDIS_URL = "redis://127.0.0.1:6379/0"


# --- helpers ---------------------------------------------------------------------------------------


class FakeClock:
    """A monotonic clock the test moves by hand, so breaker intervals pass without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def new_metrics() -> CacheMetrics:
    return CacheMetrics.create(CollectorRegistry())


def sample(metrics: CacheMetrics, name: str, labels: dict[str, str] | None = None) -> float:
    value = metrics.registry.get_sample_value(name, labels or {})
    assert value is not None, f"no sample {name}{labels or ''}"
    return value


def redis_errors(metrics: CacheMetrics, operation: str, reason: str) -> float:
    return sample(metrics, "weir_cache_redis_errors_total", {"operation": operation, "reason": reason})


@contextmanager
def closed_port() -> Iterator[int]:
    """A port that refuses connections: bound (so nobody else takes it) but not listening."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        yield int(holder.getsockname()[1])


@pytest_asyncio.fixture
async def shared_prefix() -> AsyncIterator[str]:
    """A key prefix of this test's own on the shared Redis; its keys are deleted afterwards."""
    prefix = f"weir-test:{uuid.uuid4().hex}"
    yield prefix
    client = redis.asyncio.Redis.from_url(SHARED_REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest_asyncio.fixture
async def silent_server_port() -> AsyncIterator[int]:
    """A TCP server that accepts connections and never answers: every Redis call times out."""
    connections: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        while await reader.read(65536):
            pass

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    yield int(server.sockets[0].getsockname()[1])
    for writer in connections:
        writer.close()
    server.close()
    await server.wait_closed()


def shared_redis_cache(prefix: str, metrics: CacheMetrics) -> RedisResponseCache:
    return RedisResponseCache(SHARED_REDIS_URL, 60.0, 1.0, metrics, key_prefix=prefix)


# --- keys ------------------------------------------------------------------------------------------

FEATURES = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
TEXT = np.array([[b"ab", b"c"]], dtype=object)


def key_of(
    model_name: str = "mlp",
    model_version: str = "1",
    inputs: dict[str, tuple[str, np.ndarray]] | None = None,
    requested_outputs: tuple[str, ...] = ("probabilities", "label"),
    parameters: dict[str, object] | None = None,
) -> bytes:
    if inputs is None:
        inputs = {"features": ("FP32", FEATURES), "text": ("BYTES", TEXT)}
    return response_cache_key(model_name, model_version, inputs, requested_outputs, parameters or {})


def bytes_array(*elements: bytes) -> np.ndarray:
    array = np.empty((1, len(elements)), dtype=object)
    array[0, :] = list(elements)
    return array


def test_key_is_a_32_byte_digest_that_depends_only_on_content() -> None:
    key = key_of()
    assert isinstance(key, bytes) and len(key) == 32
    same_content = {
        "text": ("BYTES", bytes_array(b"ab", b"c")),  # other objects, other dict order
        "features": ("FP32", np.frombuffer(FEATURES.tobytes(), dtype="<f4").reshape(1, 3)),  # read-only view
    }
    assert key_of(inputs=same_content) == key


def test_a_strided_array_keys_like_its_contiguous_copy() -> None:
    matrix = np.arange(12, dtype=np.float32).reshape(3, 4)
    strided = matrix.T  # not C-contiguous: hashed through a copy
    assert not strided.flags.c_contiguous
    assert key_of(inputs={"x": ("FP32", strided)}) == key_of(inputs={"x": ("FP32", strided.copy())})


@pytest.mark.parametrize(
    "changed",
    [
        pytest.param({"model_name": "mlp2"}, id="model"),
        pytest.param({"model_version": "2"}, id="version"),
        pytest.param({"inputs": {"features2": ("FP32", FEATURES), "text": ("BYTES", TEXT)}}, id="input-name"),
        pytest.param(
            {"inputs": {"features": ("INT32", FEATURES.view(np.int32)), "text": ("BYTES", TEXT)}}, id="datatype"
        ),
        pytest.param({"inputs": {"features": ("FP32", FEATURES.reshape(3, 1)), "text": ("BYTES", TEXT)}}, id="shape"),
        pytest.param({"inputs": {"features": ("FP32", FEATURES + 1), "text": ("BYTES", TEXT)}}, id="numeric-data"),
        pytest.param(
            {"inputs": {"features": ("FP32", FEATURES), "text": ("BYTES", bytes_array(b"a", b"bc"))}},
            id="bytes-element-boundary",
        ),
        pytest.param(
            {"inputs": {"features": ("FP32", FEATURES), "text": ("BYTES", bytes_array(b"ab", b"d"))}},
            id="bytes-element-content",
        ),
        pytest.param({"inputs": {"features": ("FP32", FEATURES)}}, id="input-missing"),
        pytest.param({"requested_outputs": ("probabilities",)}, id="output-selection"),
        pytest.param({"requested_outputs": ("label", "probabilities")}, id="output-order"),
        pytest.param({"parameters": {"temperature": 0.5}}, id="relevant-parameter"),
    ],
)
def test_every_answer_changing_difference_changes_the_key(changed: dict[str, object]) -> None:
    assert key_of(**changed) != key_of()  # type: ignore[arg-type]


def test_components_are_delimited_so_concatenations_do_not_collide() -> None:
    assert key_of(model_name="ab", model_version="c") != key_of(model_name="a", model_version="bc")
    assert key_of(requested_outputs=("ab", "c")) != key_of(requested_outputs=("a", "bc"))
    assert key_of(inputs={"ab": ("BYTES", bytes_array(b"c"))}) != key_of(inputs={"a": ("BYTES", bytes_array(b"bc"))})
    # The same bytes under another split between elements, and the same flat data under other shapes.
    assert key_of(inputs={"t": ("BYTES", bytes_array(b"", b"x"))}) != key_of(
        inputs={"t": ("BYTES", bytes_array(b"x", b""))}
    )
    empty = {"x": ("FP32", np.zeros((0, 3), np.float32))}
    assert key_of(inputs=empty) != key_of(inputs={"x": ("FP32", np.zeros((0, 4), np.float32))})
    assert key_of(parameters={"a": "bc"}) != key_of(parameters={"ab": "c"})


def test_parameter_values_of_different_types_give_different_keys() -> None:
    keys = {key_of(parameters={"p": value}) for value in (1, 1.0, True, "1", b"1", None)}
    assert len(keys) == 6
    assert key_of(parameters={"p": False}) != key_of(parameters={"p": True})


def test_transport_and_scheduling_parameters_do_not_change_the_key() -> None:
    ignored = {"priority": 3, "timeout": 5000, "routing_key": "user-7", "headers": "x", "triton_enable_x": True}
    assert key_of(parameters=ignored) == key_of()
    assert key_of(parameters={**ignored, "temperature": 0.5}) == key_of(parameters={"temperature": 0.5})
    assert key_of(parameters={"b": 1, "a": 2}) == key_of(parameters={"a": 2, "b": 1})


def test_values_without_a_canonical_encoding_are_refused() -> None:
    with pytest.raises(TypeError, match="parameter 'p'"):
        key_of(parameters={"p": [1, 2]})
    with pytest.raises(TypeError, match="input 't'"):
        key_of(inputs={"t": ("BYTES", np.array(["text"], dtype=object))})


# --- local tier ------------------------------------------------------------------------------------


def test_local_cache_stays_within_its_byte_bound_and_evicts_least_recently_used() -> None:
    metrics = new_metrics()
    cache = LocalResponseCache(capacity_bytes=100, metrics=metrics)
    for name in (b"k1", b"k2", b"k3"):
        cache.put(name, b"v" * 28)  # 30 bytes each, key included
    assert (len(cache), cache.bytes_used) == (3, 90)
    assert cache.get(b"k1") == b"v" * 28  # k1 is now the most recently used: k2 goes first

    cache.put(b"k4", b"w" * 28)
    assert cache.get(b"k2") is None
    assert [cache.get(key) is not None for key in (b"k1", b"k3", b"k4")] == [True, True, True]
    assert (len(cache), cache.bytes_used) == (3, 90)

    cache.put(b"k5", b"x" * 58)  # 60 bytes: two evictions (k1, then k3: the least recently read)
    assert cache.get(b"k1") is None and cache.get(b"k3") is None
    assert cache.get(b"k4") is not None and cache.get(b"k5") is not None
    assert cache.bytes_used == 90 <= cache.capacity_bytes
    assert sample(metrics, "weir_cache_evictions_total") == 3
    assert sample(metrics, "weir_cache_bytes") == 90
    assert sample(metrics, "weir_cache_entries") == 2


def test_a_value_larger_than_the_capacity_is_not_stored_and_evicts_nothing() -> None:
    metrics = new_metrics()
    cache = LocalResponseCache(capacity_bytes=50, metrics=metrics)
    cache.put(b"small", b"v" * 10)
    cache.put(b"huge", b"v" * 50)
    assert cache.get(b"huge") is None
    assert cache.get(b"small") == b"v" * 10
    assert sample(metrics, "weir_cache_evictions_total") == 0
    cache.put(b"exact", b"v" * 45)  # exactly the capacity: stored, after evicting the rest
    assert cache.get(b"exact") is not None and cache.bytes_used == 50 and len(cache) == 1


def test_replacing_a_key_counts_its_bytes_once_and_clear_empties_the_gauges() -> None:
    metrics = new_metrics()
    cache = LocalResponseCache(capacity_bytes=1000, metrics=metrics)
    cache.put(b"key", b"first")
    cache.put(b"key", b"second value")
    assert cache.get(b"key") == b"second value"
    assert (len(cache), cache.bytes_used) == (1, 3 + 12)
    assert sample(metrics, "weir_cache_bytes") == 15 and sample(metrics, "weir_cache_entries") == 1
    cache.clear()
    assert (len(cache), cache.bytes_used) == (0, 0)
    assert sample(metrics, "weir_cache_bytes") == 0 and sample(metrics, "weir_cache_entries") == 0


def test_a_negative_capacity_is_refused() -> None:
    with pytest.raises(ValueError, match=r"capacity_bytes.*-1"):
        LocalResponseCache(capacity_bytes=-1, metrics=new_metrics())


# --- Redis tier ------------------------------------------------------------------------------------


async def test_redis_round_trip_with_ttl(shared_prefix: str) -> None:
    metrics = new_metrics()
    cache = shared_redis_cache(shared_prefix, metrics)
    key = key_of()
    try:
        assert await cache.get("mlp/1", key) is None
        await cache.put("mlp/1", key, b"\x00answer\xff")
        assert await cache.get("mlp/1", key) == b"\x00answer\xff"
    finally:
        await cache.aclose()

    client = redis.asyncio.Redis.from_url(SHARED_REDIS_URL)
    try:
        redis_key = f"{shared_prefix}:mlp/1:{key.hex()}"
        assert cache.key_for("mlp/1", key) == redis_key
        assert 0 < await client.pttl(redis_key) <= 60_000
    finally:
        await client.aclose()
    assert redis_errors(metrics, "get", "error") == redis_errors(metrics, "put", "error") == 0


async def test_redis_namespaces_keep_versions_apart(shared_prefix: str) -> None:
    cache = shared_redis_cache(shared_prefix, new_metrics())
    key = key_of()
    try:
        await cache.put("mlp/1", key, b"version 1 answer")
        assert await cache.get("mlp/2", key) is None
        assert await cache.get("mlp/1", key) == b"version 1 answer"
    finally:
        await cache.aclose()


async def test_unreachable_redis_costs_one_attempt_then_nothing(caplog: pytest.LogCaptureFixture) -> None:
    metrics = new_metrics()
    with closed_port() as port:
        cache = RedisResponseCache(f"redis://127.0.0.1:{port}", 60.0, 0.5, metrics, clock=FakeClock())
        started = time.monotonic()
        with caplog.at_level(logging.INFO, logger="weir.cache"):
            for _ in range(200):
                assert await cache.get("mlp/1", b"k") is None
                await cache.put("mlp/1", b"k", b"v")
        elapsed = time.monotonic() - started
        await cache.aclose()
    assert elapsed < 0.5
    assert redis_errors(metrics, "get", "error") == 1
    assert sample(metrics, "weir_cache_redis_bypassed_total") == 399
    outage_lines = [record for record in caplog.records if record.name.startswith("weir.cache")]
    assert len(outage_lines) == 1 and outage_lines[0].levelno == logging.WARNING
    assert f"127.0.0.1:{port}" in outage_lines[0].getMessage()


async def test_breaker_retry_interval_doubles_up_to_its_maximum() -> None:
    metrics = new_metrics()
    clock = FakeClock()
    with closed_port() as port:
        cache = RedisResponseCache(
            f"redis://127.0.0.1:{port}", 60.0, 0.5, metrics, retry_after_seconds=1.0, max_retry_after_seconds=3.0,
            clock=clock,
        )  # fmt: skip
        await cache.get("m/1", b"k")  # fails: the breaker opens for 1 s
        for interval in (1.0, 2.0, 3.0, 3.0):
            errors_before = redis_errors(metrics, "get", "error")
            clock.advance(interval - 0.25)  # dyadic steps: the fake clock lands exactly on the retry time
            await cache.get("m/1", b"k")
            assert redis_errors(metrics, "get", "error") == errors_before, f"bypass expected within {interval} s"
            clock.advance(0.25)
            await cache.get("m/1", b"k")  # the probe, failing again
            assert redis_errors(metrics, "get", "error") == errors_before + 1
        await cache.aclose()
    assert redis_errors(metrics, "get", "error") == 5
    assert sample(metrics, "weir_cache_redis_bypassed_total") == 4


async def test_a_redis_that_never_answers_times_out_within_the_bound(silent_server_port: int) -> None:
    metrics = new_metrics()
    cache = RedisResponseCache(f"redis://127.0.0.1:{silent_server_port}", 60.0, 0.1, metrics, clock=FakeClock())
    started = time.monotonic()
    assert await cache.get("m/1", b"k") is None
    assert await cache.get("m/1", b"k") is None  # bypassed
    elapsed = time.monotonic() - started
    await cache.aclose()
    assert 0.05 < elapsed < 0.5
    assert redis_errors(metrics, "get", "timeout") == 1
    assert sample(metrics, "weir_cache_redis_bypassed_total") == 1


async def test_redis_stopped_mid_run_is_bypassed_and_used_again_after_restart(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = new_metrics()
    clock = FakeClock()
    port = free_port()
    server = start_redis_server(port)
    cache = RedisResponseCache(f"redis://127.0.0.1:{port}", 60.0, 0.5, metrics, clock=clock)
    try:
        with caplog.at_level(logging.INFO, logger="weir.cache"):
            await cache.put("m/1", b"k", b"before")
            assert await cache.get("m/1", b"k") == b"before"

            stop_redis_server(server)
            assert await cache.get("m/1", b"k") is None
            assert redis_errors(metrics, "get", "error") == 1
            await cache.put("m/1", b"k", b"during")  # breaker open: skipped
            assert sample(metrics, "weir_cache_redis_bypassed_total") == 1
            clock.advance(1.0)
            await cache.put("m/1", b"k", b"during")  # the probe: still down
            assert redis_errors(metrics, "put", "error") == 1

            server = start_redis_server(port)
            assert await cache.get("m/1", b"k") is None  # the retry interval has doubled to 2 s
            assert sample(metrics, "weir_cache_redis_bypassed_total") == 2
            clock.advance(2.0)
            await cache.put("m/1", b"k", b"after")  # the probe succeeds: breaker closed
            assert await cache.get("m/1", b"k") == b"after"
            assert await cache.get("m/1", b"k") == b"after"
    finally:
        await cache.aclose()
        stop_redis_server(server)
    assert sample(metrics, "weir_cache_redis_bypassed_total") == 2
    assert redis_errors(metrics, "get", "error") + redis_errors(metrics, "put", "error") == 2
    levels = [record.levelno for record in caplog.records if record.name.startswith("weir.cache")]
    assert levels == [logging.WARNING, logging.INFO]  # one line for the outage, one for the recovery


def test_redis_settings_are_validated() -> None:
    with pytest.raises(ValueError, match=r"ttl_seconds.*0"):
        RedisResponseCache(SHARED_REDIS_URL, 0, 1.0, new_metrics())
    with pytest.raises(ValueError, match=r"timeout_seconds.*-1"):
        RedisResponseCache(SHARED_REDIS_URL, 60.0, -1, new_metrics())


# --- both tiers ------------------------------------------------------------------------------------


async def test_local_only_cache_counts_hits_and_misses_and_keeps_namespaces_apart() -> None:
    metrics = new_metrics()
    cache = ResponseCache(LocalResponseCache(1 << 20, metrics), None)
    key = key_of()
    assert await cache.lookup("mlp/1", key) is None
    cache.store("mlp/1", key, b"answer")
    assert await cache.lookup("mlp/1", key) == b"answer"
    assert await cache.lookup("mlp/2", key) is None
    await cache.aclose()
    assert sample(metrics, "weir_cache_hits_total", {"tier": "local"}) == 1
    assert sample(metrics, "weir_cache_hits_total", {"tier": "redis"}) == 0
    assert sample(metrics, "weir_cache_misses_total") == 2


async def test_a_redis_hit_fills_the_local_tier(shared_prefix: str) -> None:
    writer_metrics, reader_metrics = new_metrics(), new_metrics()
    writer = ResponseCache(
        LocalResponseCache(1 << 20, writer_metrics), shared_redis_cache(shared_prefix, writer_metrics)
    )
    writer.store("mlp/1", key_of(), b"shared answer")
    await writer.aclose()  # waits for the background write

    reader = ResponseCache(
        LocalResponseCache(1 << 20, reader_metrics), shared_redis_cache(shared_prefix, reader_metrics)
    )
    try:
        assert len(reader.local) == 0
        assert await reader.lookup("mlp/1", key_of()) == b"shared answer"
        assert len(reader.local) == 1
        assert await reader.lookup("mlp/1", key_of()) == b"shared answer"
        assert await reader.lookup("mlp/2", key_of()) is None
    finally:
        await reader.aclose()
    assert sample(reader_metrics, "weir_cache_hits_total", {"tier": "redis"}) == 1
    assert sample(reader_metrics, "weir_cache_hits_total", {"tier": "local"}) == 1
    assert sample(reader_metrics, "weir_cache_misses_total") == 1


async def test_background_writes_have_all_landed_when_aclose_returns(shared_prefix: str) -> None:
    metrics = new_metrics()
    cache = ResponseCache(LocalResponseCache(1 << 20, metrics), shared_redis_cache(shared_prefix, metrics))
    keys = [key_of(parameters={"n": n}) for n in range(50)]
    for n, key in enumerate(keys):
        cache.store("mlp/1", key, f"answer {n}".encode())
    assert cache.pending_writes > 0  # nothing awaited yet: the writes are still in the background
    await cache.aclose()
    assert cache.pending_writes == 0

    client = redis.asyncio.Redis.from_url(SHARED_REDIS_URL)
    try:
        values = await client.mget([f"{shared_prefix}:mlp/1:{key.hex()}" for key in keys])
    finally:
        await client.aclose()
    assert values == [f"answer {n}".encode() for n in range(50)]

    cache.store("mlp/1", b"late", b"value")  # after aclose: local only, no new task
    assert cache.pending_writes == 0 and await cache.lookup("mlp/1", b"late") == b"value"


async def test_pending_redis_writes_are_bounded_and_dropped_writes_counted(silent_server_port: int) -> None:
    metrics = new_metrics()
    redis_tier = RedisResponseCache(f"redis://127.0.0.1:{silent_server_port}", 60.0, 0.1, metrics)
    cache = ResponseCache(LocalResponseCache(1 << 20, metrics), redis_tier, max_pending_writes=2)
    for n in range(5):
        cache.store("m/1", bytes([n]), b"value")
    assert cache.pending_writes == 2
    assert sample(metrics, "weir_cache_redis_writes_dropped_total") == 3
    assert await cache.lookup("m/1", bytes([4])) == b"value"  # dropped from Redis, still stored locally
    started = time.monotonic()
    await cache.aclose()
    assert time.monotonic() - started < 1.0
    assert cache.pending_writes == 0
    assert redis_errors(metrics, "put", "timeout") == 2


async def test_a_lookup_with_redis_down_is_a_plain_miss() -> None:
    metrics = new_metrics()
    with closed_port() as port:
        cache = ResponseCache(
            LocalResponseCache(1 << 20, metrics), RedisResponseCache(f"redis://127.0.0.1:{port}", 60.0, 0.5, metrics)
        )
        assert await cache.lookup("m/1", b"k") is None
        cache.store("m/1", b"k", b"v")
        assert await cache.lookup("m/1", b"k") == b"v"
        await cache.aclose()
    assert sample(metrics, "weir_cache_misses_total") == 1
    assert redis_errors(metrics, "get", "error") == 1
