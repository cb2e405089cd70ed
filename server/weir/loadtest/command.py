"""`weir bench`, top to bottom: flags -> options -> server and model -> requests -> workers -> levels
-> reports -> exit status (0: every SLO held, 1: a level failed an SLO, 2: usage error or the server,
the model or a worker unusable)."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from datetime import UTC, datetime
from typing import Any

from weir.loadtest.options import BenchOptions, UsageError, options_from

EXIT_OK, EXIT_SLO_FAILED, EXIT_USAGE = 0, 1, 2


def _say(message: str) -> None:
    print(message, flush=True)


def _fail(message: str) -> int:
    print(f"weir bench: {message}", file=sys.stderr, flush=True)
    return EXIT_USAGE


def run(namespace: argparse.Namespace) -> int:
    try:
        options = options_from(namespace)
    except UsageError as error:
        return _fail(str(error))
    try:
        import tritonclient.grpc.service_pb2  # noqa: F401 - the client builds its requests with these protos
    except ImportError:
        return _fail("needs tritonclient[grpc]: pip install 'weir[bench]' (or 'tritonclient[grpc]==2.41.0')")
    from weir.loadtest.payload import PayloadError
    from weir.loadtest.runner import BenchError

    try:
        return _run(options)
    except (BenchError, PayloadError) as error:
        return _fail(str(error))


def _run(options: BenchOptions) -> int:
    from weir.loadtest import payload, report, runner, schedule, slo
    from weir.loadtest.worker import WorkerSetup

    slos = [slo.parse_slo(text) for text in options.slos]
    started, started_clock = datetime.now(UTC), time.monotonic()
    target = runner.discover(options)
    requests = [
        payload.build_request(
            options.model, options.model_version, target.specs, max_batch_size=target.max_batch_size,
            payload=options.payload, batch_rows=options.batch_rows, input_data=options.input_data,
            seed=schedule.worker_seed(options.seed, 0, index),
        )
        for index in range(options.processes)
    ]  # fmt: skip
    runner.probe(options, requests[0].body)
    if options.metrics_url:
        runner.scrape(options.metrics_url)  # unreachable metrics fail the run now, not after the first level
    first = requests[0]
    shapes = ", ".join(f"{name} {shape}" for name, shape in first.shapes.items())
    loop = "closed loop" if options.mode == "closed" else f"open loop ({options.mode})"
    _say(
        f"weir bench: {options.model} on {options.target} ({target.server['name']} {target.server['version']});"
        f" {shapes}; {first.payload} payload, {len(first.body):,} bytes; {loop}, {len(options.levels)} level(s) of"
        f" {options.warmup_s:g} s warm-up + {options.duration_s:g} s, {options.processes} process(es)"
    )
    in_flight = options.max_in_flight // options.processes
    setups = [
        WorkerSetup(index, options.target, planned.body, options.timeout_s, in_flight)
        for index, planned in enumerate(requests)
    ]
    pool = runner.WorkerPool(setups)
    outcomes: list[runner.LevelOutcome] = []
    try:
        pool.start()
        for index, level in enumerate(options.levels):
            outcome = runner.run_level(options, pool, level, index, slos)
            outcomes.append(outcome)
            _say(progress_line(index, len(options.levels), outcome.summary))
    finally:
        pool.close()

    levels = [outcome.summary for outcome in outcomes]
    passed = all(level["slo_passed"] for level in levels)
    results: dict[str, Any] = {
        "tool": "weir bench",
        "command": shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
        "label": options.label,
        "started_at": started.isoformat(timespec="seconds"),
        "total_seconds": round(time.monotonic() - started_clock, 1),
        "machine": report.machine_info(),
        "target": {
            "url": options.target,
            "metrics_url": options.metrics_url,
            "server": target.server,
            "model": target.model,
            "max_batch_size": target.max_batch_size,
            "request": {
                "payload": first.payload,
                "payload_requested": options.payload,
                "shapes": first.shapes,
                "bytes": len(first.body),
            },
        },
        "settings": {
            "mode": options.mode,
            options.level_key: [int(level) if options.mode == "closed" else level for level in options.levels],
            "duration_s": options.duration_s,
            "warmup_s": options.warmup_s,
            "processes": options.processes,
            "batch_rows": options.batch_rows,
            "input_data": options.input_data,
            "timeout_ms": options.timeout_s * 1000.0,
            "max_in_flight": options.max_in_flight,
            "seed": options.seed,
        },
        "slos": list(options.slos),
        "levels": levels,
        "slo_passed": passed,
        "exit_status": EXIT_OK if passed else EXIT_SLO_FAILED,
    }
    written = report.write_all(options.out, results, [outcome.latencies_ns for outcome in outcomes])
    _say("wrote " + ", ".join(str(path) for path in written))
    if slos:
        _say("SLO: every level passes" if passed else "SLO: FAILED (exit status 1)")
    return EXIT_OK if passed else EXIT_SLO_FAILED


def progress_line(index: int, total: int, level: dict[str, Any]) -> str:
    latency = level["latency_ms"]

    def ms(key: str) -> str:
        return "n/a" if latency[key] is None else f"{latency[key]:.3f}"

    text = (
        f"[{index + 1}/{total}] {level['level']:<16} {level['requests']:>9,} req"
        f" {level['throughput_rps']:>10,.1f} req/s"
        f"  p50 {ms('p50')} p90 {ms('p90')} p99 {ms('p99')} p99.9 {ms('p999')} max {ms('max')} ms"
        f"  errors {level['failed']}"
    )
    if level["failed"]:
        text += " (" + ", ".join(f"{code} {count}" for code, count in level["errors"].items())
        text += f", dropped {level['dropped']})" if level["dropped"] else ")"
    budget = level["stage_budget"]
    if budget is not None:
        stages = budget["stages"]
        parts = [f"{name} {entry['mean_ms']:.3f}" for name, entry in stages.items() if entry is not None]
        text += f"  server {budget['end_to_end']['mean_ms']:.3f} ms ({', '.join(parts)})"
    if level["slo"]:
        failed = [outcome["slo"] for outcome in level["slo"] if not outcome["passed"]]
        text += "  SLO PASS" if not failed else "  SLO FAIL: " + ", ".join(failed)
    return text
