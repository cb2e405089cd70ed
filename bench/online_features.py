"""Online feature reads from Redis on loopback: a 20-feature service for one entity (Weir's one
pipelined round trip) and for a batch of entities, against the naive read (one HGET per feature) in
the same run.

    .venv/bin/python bench/online_features.py [--redis redis://127.0.0.1:6379/0] [--entities 10000]
        [--reads 5000] [--batch 32] [--out bench/results]

Also the data plane's way of reading on its event loop (uvloop): the asyncio Redis client
(``read_async``) against the blocking client in a worker thread (``asyncio.to_thread``), same run.

Writes online_features.json and online_features.md (p50/p99 in ms and the ratios). The goal in the
feature-store issue: p99 <= 2 ms for one entity.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402

FEATURES = 20


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": statistics.median(ordered) * 1000,
        "p99_ms": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000,
        "mean_ms": statistics.fmean(ordered) * 1000,
    }


async def loop_reads(store: Any, views: dict, entities: int, reads: int, rng: random.Random) -> dict[str, list[float]]:
    """One entity per read from inside an event loop, the two ways a data plane can."""
    timings: dict[str, list[float]] = {"loop_async": [], "loop_thread": []}
    for _ in range(200):
        await store.read_async(str(rng.randrange(entities)), views)
        await asyncio.to_thread(store.read, str(rng.randrange(entities)), views)
    for _ in range(reads):
        key = str(rng.randrange(entities))
        began = time.perf_counter()
        await store.read_async(key, views)
        timings["loop_async"].append(time.perf_counter() - began)
        began = time.perf_counter()
        await asyncio.to_thread(store.read, key, views)
        timings["loop_thread"].append(time.perf_counter() - began)
    return timings


async def concurrent_reads(store: Any, views: dict, entities: int, reads: int, concurrency: int) -> dict[str, Any]:
    """Reads/s and process CPU per read with ``concurrency`` requests in flight on one loop, as under
    load in the data plane; the asyncio client against the thread hop."""
    rng = random.Random(1)
    results: dict[str, Any] = {}
    for kind in ("async", "thread"):

        async def worker(count: int, kind: str = kind) -> None:
            for _ in range(count):
                key = str(rng.randrange(entities))
                if kind == "async":
                    await store.read_async(key, views)
                else:
                    await asyncio.to_thread(store.read, key, views)

        per_worker = max(1, reads // concurrency)
        began, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*[worker(per_worker) for _ in range(concurrency)])
        elapsed, cpu_used = time.perf_counter() - began, time.process_time() - cpu
        total = per_worker * concurrency
        results[kind] = {"reads_per_s": total / elapsed, "cpu_us_per_read": cpu_used / total * 1e6}
    await store.aclose()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--entities", type=int, default=10_000)
    parser.add_argument("--reads", type=int, default=5_000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=32, help="reads in flight on the loop")
    parser.add_argument("--out", type=Path, default=harness.RESULTS)
    args = parser.parse_args(argv)
    from weir_proto.online_store import RedisOnlineStore, redis_key

    view = f"bench_{uuid.uuid4().hex[:8]}"
    features = {f"f{index}": "FLOAT64" for index in range(FEATURES)}
    store = RedisOnlineStore(args.redis, timeout_seconds=2.0)
    rng = random.Random(0)
    rows = [(str(key), 1.0, {name: rng.random() for name in features}) for key in range(args.entities)]
    for offset in range(0, len(rows), 1000):
        store.write(view, rows[offset : offset + 1000])
    client = store._client  # the naive baseline uses the same connection pool
    views = {view: features}
    timings: dict[str, list[float]] = {"weir_single": [], "naive_single": [], "weir_batch": []}
    try:
        for _ in range(200):  # warm up connections and Redis' caches
            store.read(str(rng.randrange(args.entities)), views)
        for _ in range(args.reads):
            key = str(rng.randrange(args.entities))
            began = time.perf_counter()
            store.read(key, views)
            timings["weir_single"].append(time.perf_counter() - began)
            began = time.perf_counter()
            for name in features:  # one round trip per feature: what a naive client does
                client.hget(redis_key(view, key), name)
            timings["naive_single"].append(time.perf_counter() - began)
        for _ in range(max(1, args.reads // args.batch)):
            keys = [str(rng.randrange(args.entities)) for _ in range(args.batch)]
            began = time.perf_counter()
            store.read_many(keys, views)
            timings["weir_batch"].append(time.perf_counter() - began)
        import uvloop

        async def on_the_loop() -> tuple[dict[str, list[float]], dict[str, Any]]:
            # one loop for both: the asyncio client belongs to the loop that made it
            sequential = await loop_reads(store, views, args.entities, args.reads, rng)
            return sequential, await concurrent_reads(store, views, args.entities, args.reads * 2, args.concurrency)

        sequential, concurrent = uvloop.run(on_the_loop())
        timings.update(sequential)
    finally:
        for offset in range(0, args.entities, 1000):
            client.delete(*[redis_key(view, str(key)) for key in range(offset, min(offset + 1000, args.entities))])
        store.close()
    results = {name: percentiles(samples) for name, samples in timings.items()}
    report: dict[str, Any] = {
        "command": harness.command_line(),
        "machine": harness.machine_info(),
        "settings": {
            "entities": args.entities,
            "reads": args.reads,
            "batch": args.batch,
            "features": FEATURES,
            "concurrency": args.concurrency,
            "hiredis": _has_hiredis(),
        },
        "results": results,
        "p99_naive_over_weir_single": results["naive_single"]["p99_ms"] / results["weir_single"]["p99_ms"],
        "p50_thread_over_async": results["loop_thread"]["p50_ms"] / results["loop_async"]["p50_ms"],
        "concurrent": concurrent,
        "concurrent_async_over_thread": concurrent["async"]["reads_per_s"] / concurrent["thread"]["reads_per_s"],
        "goal_p99_single_ms": 2.0,
        "goal_met": results["weir_single"]["p99_ms"] <= 2.0,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "online_features.json").write_text(json.dumps(report, indent=2) + "\n")
    per_entity = results["weir_batch"]["p50_ms"] / args.batch
    lines = [
        "# Online feature reads: a 20-feature service from Redis on loopback, same run",
        "",
        "```",
        report["command"],
        "```",
        "",
        f"- Machine: {report['machine']['cpu_count']} CPUs, {report['machine']['cpu_model']}; {args.entities:,} "
        f"entities, {args.reads:,} single reads, batches of {args.batch}.",
        "",
        "| read | p50 ms | p99 ms |",
        "|---|--:|--:|",
        f"| Weir, one entity (one pipelined round trip) | {results['weir_single']['p50_ms']:.3f} "
        f"| {results['weir_single']['p99_ms']:.3f} |",
        f"| naive, one entity (one HGET per feature) | {results['naive_single']['p50_ms']:.3f} "
        f"| {results['naive_single']['p99_ms']:.3f} |",
        f"| Weir, {args.batch} entities in one round trip | {results['weir_batch']['p50_ms']:.3f} "
        f"| {results['weir_batch']['p99_ms']:.3f} |",
        f"| on the event loop: asyncio client (the data plane's read) | {results['loop_async']['p50_ms']:.3f} "
        f"| {results['loop_async']['p99_ms']:.3f} |",
        f"| on the event loop: blocking client in a thread | {results['loop_thread']['p50_ms']:.3f} "
        f"| {results['loop_thread']['p99_ms']:.3f} |",
        "",
        f"- naive/Weir p99 for one entity: **{report['p99_naive_over_weir_single']:.1f}x**; batched: "
        f"{per_entity:.3f} ms per entity at p50.",
        f"- On the event loop, one read at a time, thread/asyncio p50: {report['p50_thread_over_async']:.2f}x.",
        f"- {args.concurrency} reads in flight on one loop (the data plane under load; hiredis parser: "
        f"{report['settings']['hiredis']}): asyncio client {concurrent['async']['reads_per_s']:,.0f} reads/s at "
        f"{concurrent['async']['cpu_us_per_read']:.0f} us CPU each, thread hop "
        f"{concurrent['thread']['reads_per_s']:,.0f} reads/s at {concurrent['thread']['cpu_us_per_read']:.0f} us: "
        f"**{report['concurrent_async_over_thread']:.2f}x** the throughput.",
        f"- Goal p99 <= 2 ms for one entity: **{'met' if report['goal_met'] else 'not met'}** "
        f"({results['weir_single']['p99_ms']:.3f} ms).",
        "",
    ]
    (args.out / "online_features.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


def _has_hiredis() -> bool:
    try:
        import hiredis  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
