"""Soak: `weir serve` under moderate closed-loop load for a long time, with a reload every 30 s;
does its memory stay flat and its tail latency steady?

    .venv/bin/python bench/soak.py [--minutes 10] [--concurrency 2] [--reload-seconds 30] [--new-versions]
                                   [--warmup-minutes 2] [--bucket-seconds 60] [--out bench/results]

Builds the demo repository in a temporary directory, starts `weir serve` (explicit control mode,
mlp_classifier loaded) on a free loopback port, and runs ``--concurrency`` client threads in this
process, each sending a batch-1 request with tritonclient and the next as soon as the answer comes.
Every ``--reload-seconds`` it reloads the model with RepositoryModelLoad (with ``--new-versions``, a
new version directory is added first, so each reload swaps in a new version). The server's RSS is
read from /proc every second. When two CPUs are usable the server runs on CPU 0 and the client on
CPU 1.

Per bucket (default one minute): requests, errors, p50/p99 latency and the server's RSS (mean, max,
last). RSS counts as flat when, after the warm-up (the first ``--warmup-minutes``, at most half the
run), it never rises more than 10% above its level at the end of the warm-up.

Writes soak.json, soak.md (the table per bucket) and soak.png (RSS and p99 over time, reloads
marked) to ``--out``. Exit status 0 when no request failed and the server exited 0 after SIGTERM, 1
otherwise (the verdict on RSS is printed and written, not an exit status); 2 if a prerequisite is
missing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402

FLAT_TOLERANCE = 0.10


def say(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", flush=True)


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class Bucket:
    index: int
    start_s: float
    end_s: float
    requests: int
    errors: int
    throughput_rps: float
    p50_ms: float | None
    p99_ms: float | None
    rss_mean_mib: float | None
    rss_max_mib: float | None
    rss_last_mib: float | None
    reloads: int


def percentile(values: list[float], q: float) -> float | None:
    import numpy as np

    return float(np.percentile(values, q)) if values else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--reload-seconds", type=float, default=30.0)
    parser.add_argument("--new-versions", action="store_true", help="each reload swaps in a new version")
    parser.add_argument("--warmup-minutes", type=float, default=2.0)
    parser.add_argument("--bucket-seconds", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=harness.RESULTS)
    args = parser.parse_args()
    try:
        import numpy as np
        import tritonclient.grpc as triton
        from tritonclient.utils import InferenceServerException
    except ImportError as error:
        print(f"soak: missing prerequisite: {error.name} (run `make setup`)", file=sys.stderr)
        return 2

    duration = args.minutes * 60
    warmup = min(args.warmup_minutes * 60, duration / 2)
    usable = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    pinned = len(usable) >= 2
    with tempfile.TemporaryDirectory(prefix="weir-soak-") as tmp:
        repository = harness.build_demo_repository(Path(tmp) / "repository")
        server = harness.start_weir(repository)
        if pinned:
            os.sched_setaffinity(server.process.pid, {usable[0]})
            os.sched_setaffinity(0, {usable[1]})
        say(f"weir serve pid {server.process.pid} on {server.url}; {args.concurrency} clients for {args.minutes} min")
        request = np.full((1, 256), 0.5, np.float32)
        samples: list[tuple[float, float]] = []  # (finish time, latency s)
        errors: list[tuple[float, str]] = []
        rss: list[tuple[float, int]] = []
        reloads: list[dict[str, Any]] = []
        lock = threading.Lock()
        stop = threading.Event()
        t0 = time.monotonic()

        def client() -> None:
            connection = triton.InferenceServerClient(server.url)
            tensor = triton.InferInput("INPUT__0", [1, 256], "FP32")
            tensor.set_data_from_numpy(request)
            wanted = [triton.InferRequestedOutput("OUTPUT__0")]
            try:
                while not stop.is_set():
                    started = time.monotonic()
                    try:
                        connection.infer(harness.MODEL, [tensor], outputs=wanted, client_timeout=30)
                    except InferenceServerException as error:
                        with lock:
                            errors.append((time.monotonic() - t0, str(error)[:300]))
                        continue
                    finished = time.monotonic()
                    with lock:
                        samples.append((finished - t0, finished - started))
            finally:
                connection.close()

        def sample_rss() -> None:
            while not stop.wait(1.0):
                value = rss_bytes(server.process.pid)
                if value is not None:
                    rss.append((time.monotonic() - t0, value))

        threads = [threading.Thread(target=client, name=f"client-{i}", daemon=True) for i in range(args.concurrency)]
        threads.append(threading.Thread(target=sample_rss, name="rss", daemon=True))
        for thread in threads:
            thread.start()
        admin = triton.InferenceServerClient(server.url)
        next_version = 2
        try:
            next_reload = args.reload_seconds
            while (now := time.monotonic() - t0) < duration:
                if now >= next_reload:
                    if args.new_versions:
                        source = repository / harness.MODEL / str(next_version - 1)
                        shutil.copytree(source, repository / harness.MODEL / str(next_version))
                        shutil.rmtree(repository / harness.MODEL / str(next_version - 2), ignore_errors=True)
                        next_version += 1
                    started = time.monotonic()
                    try:
                        admin.load_model(harness.MODEL)
                        outcome = "ok"
                    except InferenceServerException as error:
                        outcome = str(error)[:300]
                    reloads.append(
                        {"at_s": round(now, 2), "seconds": round(time.monotonic() - started, 3), "outcome": outcome}
                    )
                    next_reload += args.reload_seconds
                time.sleep(min(0.2, max(0.0, next_reload - now)))
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=40)
            admin.close()
            exit_status = server.stop()
        elapsed = time.monotonic() - t0

    buckets: list[Bucket] = []
    edges = np.arange(0.0, duration + 1e-9, args.bucket_seconds).tolist()
    if edges[-1] < duration:
        edges.append(duration)
    for index, (start, end) in enumerate(itertools.pairwise(edges)):
        latencies = [latency * 1000 for at, latency in samples if start <= at < end]
        memory = [value / (1 << 20) for at, value in rss if start <= at < end]
        buckets.append(
            Bucket(
                index=index,
                start_s=round(start, 1),
                end_s=round(end, 1),
                requests=len(latencies),
                errors=sum(1 for at, _ in errors if start <= at < end),
                throughput_rps=round(len(latencies) / (end - start), 1),
                p50_ms=percentile(latencies, 50),
                p99_ms=percentile(latencies, 99),
                rss_mean_mib=float(np.mean(memory)) if memory else None,
                rss_max_mib=max(memory) if memory else None,
                rss_last_mib=memory[-1] if memory else None,
                reloads=sum(1 for reload in reloads if start <= reload["at_s"] < end),
            )
        )
    after_warmup = [value for at, value in rss if at >= warmup]
    reference = after_warmup[0] if after_warmup else None
    peak = max(after_warmup) if after_warmup else None
    growth = (peak - reference) / reference if reference and peak else None
    flat = growth is not None and growth <= FLAT_TOLERANCE
    verdict = (
        f"RSS {'flat' if flat else 'NOT flat'} after the {warmup / 60:.1f}-minute warm-up: "
        f"{reference / (1 << 20):.0f} MiB at its end, at most {peak / (1 << 20):.0f} MiB after "
        f"({growth * 100:+.1f}%, tolerance {FLAT_TOLERANCE * 100:.0f}%)"
        if reference and peak and growth is not None
        else "RSS: no samples after the warm-up"
    )
    failed_reloads = [reload for reload in reloads if reload["outcome"] != "ok"]
    result: dict[str, Any] = {
        "command": harness.command_line(),
        "machine": harness.machine_info(),
        "server_command": server.command,
        "server_exit_status": exit_status,
        "pinned": {"server_cpu": usable[0], "client_cpu": usable[1]} if pinned else None,
        "minutes": args.minutes,
        "elapsed_s": round(elapsed, 1),
        "concurrency": args.concurrency,
        "reload_seconds": args.reload_seconds,
        "new_versions": args.new_versions,
        "warmup_s": warmup,
        "requests": len(samples),
        "errors": len(errors),
        "first_errors": [message for _, message in errors[:10]],
        "p50_ms": percentile([latency * 1000 for _, latency in samples], 50),
        "p99_ms": percentile([latency * 1000 for _, latency in samples], 99),
        "reloads": reloads,
        "failed_reloads": len(failed_reloads),
        "rss_reference_mib": reference / (1 << 20) if reference else None,
        "rss_peak_after_warmup_mib": peak / (1 << 20) if peak else None,
        "rss_growth_after_warmup": growth,
        "rss_flat": flat,
        "verdict": verdict,
        "buckets": [asdict(bucket) for bucket in buckets],
        "rss_samples": [(round(at, 2), value) for at, value in rss],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "soak.md").write_text(markdown(result))
    plot(result, args.out / "soak.png")
    say(
        f"{len(samples)} requests, {len(errors)} errors, {len(reloads)} reloads ({len(failed_reloads)} failed), "
        f"server exit {exit_status}"
    )
    say(verdict)
    say(f"wrote {harness.display_path(args.out / 'soak.json')}, soak.md, soak.png")
    return 0 if not errors and exit_status == 0 and not failed_reloads else 1


def _cell(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    machine = result["machine"]
    lines = [
        f"# Soak: weir serve under closed-loop load with a reload every {result['reload_seconds']:g} s",
        "",
        "```",
        result["command"],
        "```",
        "",
        f"- Machine: {machine['cpu_count']} CPUs, {machine['cpu_model']}; torch {machine['torch']}, "
        f"grpcio {machine['grpcio']}; "
        + (
            f"server on CPU {result['pinned']['server_cpu']}, client on CPU {result['pinned']['client_cpu']}"
            if result["pinned"]
            else "server and client share the CPUs"
        ),
        f"- Load: {result['concurrency']} closed-loop tritonclient threads, batch 1, mlp_classifier; "
        f"{result['minutes']:g} min; reloads: {len(result['reloads'])} "
        f"({'a new version each' if result['new_versions'] else 'the same version'}), "
        f"{result['failed_reloads']} failed",
        f"- Requests: {result['requests']:,}, errors: {result['errors']}; overall p50 {_cell(result['p50_ms'])} ms, "
        f"p99 {_cell(result['p99_ms'])} ms; server exit status {result['server_exit_status']}",
        f"- **{result['verdict']}**",
        "",
        "| bucket | from s | to s | requests | req/s | errors | p50 ms | p99 ms | RSS mean MiB | RSS max MiB "
        "| reloads |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for bucket in result["buckets"]:
        lines.append(
            f"| {bucket['index']} | {bucket['start_s']:g} | {bucket['end_s']:g} | {bucket['requests']:,} | "
            f"{bucket['throughput_rps']:,.0f} | {bucket['errors']} | {_cell(bucket['p50_ms'])} | "
            f"{_cell(bucket['p99_ms'])} | {_cell(bucket['rss_mean_mib'], 0)} | {_cell(bucket['rss_max_mib'], 0)} | "
            f"{bucket['reloads']} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("matplotlib is missing: no soak.png")
        return
    figure, (memory_axis, latency_axis) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    samples = result["rss_samples"]
    memory_axis.plot([at / 60 for at, _ in samples], [value / (1 << 20) for _, value in samples], lw=1)
    if result["rss_reference_mib"]:
        reference = result["rss_reference_mib"]
        memory_axis.axhline(
            reference * (1 + FLAT_TOLERANCE), color="tab:red", ls="--", lw=1, label="+10% of post-warm-up"
        )
        memory_axis.axvline(result["warmup_s"] / 60, color="grey", ls=":", lw=1, label="end of warm-up")
        memory_axis.legend(loc="upper left", fontsize=8)
    memory_axis.set_ylabel("server RSS (MiB)")
    centres = [(bucket["start_s"] + bucket["end_s"]) / 120 for bucket in result["buckets"]]
    latency_axis.plot(centres, [bucket["p99_ms"] for bucket in result["buckets"]], "o-", label="p99")
    latency_axis.plot(centres, [bucket["p50_ms"] for bucket in result["buckets"]], "s-", label="p50")
    latency_axis.set_ylabel("latency (ms)")
    latency_axis.set_xlabel("minutes")
    latency_axis.legend(fontsize=8)
    for axis in (memory_axis, latency_axis):
        for reload in result["reloads"]:
            axis.axvline(reload["at_s"] / 60, color="tab:green", alpha=0.25, lw=1)
    figure.suptitle(f"weir serve soak: {result['concurrency']} clients, reload every {result['reload_seconds']:g} s")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
