"""Optional: Triton's perf_analyzer (bundled in the tritonclient 2.41.0 wheel) against a `weir serve`.

    python bench/perf_analyzer.py [--concurrency-range 1:8:1] [--measurement-interval 2000]
                                  [--stability-percentage 25] [--out bench/results]

Builds the demo repository into a temporary directory, starts `weir serve` on 127.0.0.1 (serving only
mlp_classifier), runs

    perf_analyzer -m mlp_classifier -i grpc -u 127.0.0.1:PORT --concurrency-range A:B:S \
        --measurement-interval MS --stability-percentage PCT -f RESULTS.csv

parses its CSV and writes perf_analyzer.json and perf_analyzer.md under --out. The server is stopped
with SIGTERM and must exit 0.

The binary needs libb64.so.0d (Debian's libb64-0d) and libcudart.so.12 (PyPI's
nvidia-cuda-runtime-cu12, put on LD_LIBRARY_PATH here; no GPU is used). Without them this script
says so and exits 2: run `make perf-analyzer-setup`.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness

SETUP_HINT = "run `make perf-analyzer-setup` (installs Debian's libb64-0d and PyPI's nvidia-cuda-runtime-cu12)"


def say(message: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f}s] {message}", flush=True)


_T0 = time.monotonic()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency-range", default="1:8:1", metavar="START:END:STEP", help="(default 1:8:1)")
    parser.add_argument(
        "--measurement-interval", type=int, default=2000, metavar="MS", help="perf_analyzer window in ms (default 2000)"
    )
    parser.add_argument(
        "--stability-percentage",
        type=float,
        default=25,
        metavar="PCT",
        help="perf_analyzer's allowed spread between its last 3 windows (default 25; its own default, 10, rarely"
        " settles on a small shared machine)",
    )
    parser.add_argument("--timeout", type=float, default=420, metavar="S", help="kill perf_analyzer after S s (420)")
    parser.add_argument("--out", type=Path, default=harness.RESULTS, help="results folder (default bench/results)")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"\d+(:\d+(:\d+)?)?", args.concurrency_range):
        parser.error(f"--concurrency-range: expected START[:END[:STEP]], got {args.concurrency_range!r}")
    if not 0 < args.stability_percentage <= 100:
        parser.error("--stability-percentage must be in (0, 100]")
    if args.measurement_interval < 100:
        parser.error("--measurement-interval must be at least 100 ms")
    return args


# --------------------------------------------------------------------------------------------------
# Prerequisites


def perf_analyzer_binary() -> Path | None:
    beside = Path(sys.executable).parent / "perf_analyzer"
    if beside.exists():
        return beside
    found = shutil.which("perf_analyzer")
    return Path(found) if found else None


def cuda_runtime_lib_dir() -> Path | None:
    """site-packages/nvidia/cuda_runtime/lib from nvidia-cuda-runtime-cu12, if installed."""
    try:
        spec = importlib.util.find_spec("nvidia.cuda_runtime")
    except ModuleNotFoundError:
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        lib = Path(location) / "lib"
        if (lib / "libcudart.so.12").exists():
            return lib
    return None


def missing_libraries(binary: Path, env: dict[str, str]) -> list[str]:
    """Shared libraries the dynamic loader cannot find for ``binary`` (via ldd), or [] if ldd is absent."""
    ldd = shutil.which("ldd")
    if not ldd:
        return []
    result = subprocess.run([ldd, str(binary)], capture_output=True, text=True, env=env, timeout=30, check=False)
    return [line.split("=>")[0].strip() for line in result.stdout.splitlines() if "not found" in line]


def prerequisites() -> tuple[Path, dict[str, str]]:
    problems: list[str] = []
    if importlib.util.find_spec("tritonclient") is None:
        problems.append("tritonclient[grpc]==2.41.0 is not installed in this Python (`make setup`)")
    binary = perf_analyzer_binary()
    if binary is None:
        problems.append(f"no perf_analyzer next to {sys.executable} (it ships in the tritonclient 2.41.0 wheel)")
    cuda_lib = cuda_runtime_lib_dir()
    if cuda_lib is None:
        problems.append("libcudart.so.12 not found: PyPI's nvidia-cuda-runtime-cu12 is not installed in this Python")
    env = dict(os.environ)
    if cuda_lib is not None:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(cuda_lib), env.get("LD_LIBRARY_PATH")]))
    if binary is not None and not problems:
        missing = missing_libraries(binary, env)
        if missing:
            hint = " (Debian package libb64-0d)" if any("libb64" in name for name in missing) else ""
            problems.append(f"perf_analyzer cannot load: {', '.join(missing)}{hint}")
    if problems:
        print("bench/perf_analyzer.py: perf_analyzer cannot run here:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        print(f"To fix: {SETUP_HINT}.", file=sys.stderr)
        sys.exit(2)
    assert binary is not None
    return binary, env


# --------------------------------------------------------------------------------------------------
# Results

COLUMNS = {  # perf_analyzer CSV header -> our key (latencies in microseconds)
    "Concurrency": "concurrency",
    "Inferences/Second": "throughput_rps",
    "Client Send": "client_send_us",
    "Network+Server Send/Recv": "network_server_send_recv_us",
    "Server Queue": "server_queue_us",
    "Server Compute Input": "server_compute_input_us",
    "Server Compute Infer": "server_compute_infer_us",
    "Server Compute Output": "server_compute_output_us",
    "Client Recv": "client_recv_us",
    "p50 latency": "p50_us",
    "p90 latency": "p90_us",
    "p95 latency": "p95_us",
    "p99 latency": "p99_us",
    "Avg latency": "avg_us",
}


def parse_csv(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with path.open(newline="") as handle:
        for raw in csv.DictReader(handle):
            row: dict[str, Any] = {}
            for header, value in raw.items():
                if header is None or value is None:
                    continue
                key = COLUMNS.get(header.strip(), header.strip())
                try:
                    number = float(value)
                    row[key] = int(number) if number.is_integer() and key != "throughput_rps" else number
                except ValueError:
                    row[key] = value
            rows.append(row)
    return sorted(rows, key=lambda row: row.get("concurrency", 0))


def parse_average_latencies(output: str) -> dict[int, float]:
    """The text summary's "Concurrency: N, throughput: X infer/sec, latency Y usec" lines (client average)."""
    pattern = re.compile(r"Concurrency: (\d+), throughput: [\d.]+ infer/sec, latency (\d+) usec")
    return {int(c): float(latency) for c, latency in pattern.findall(output)}


def write_markdown(path: Path, report: dict[str, Any]) -> None:
    machine = report["machine"]
    lines = [
        "# perf_analyzer against Weir",
        "",
        f"Triton's perf_analyzer (tritonclient {machine['tritonclient']} wheel, C++ client, synchronous gRPC calls,"
        f" batch 1, random FP32 input) against `weir serve` on loopback, model `{report['model']}`."
        " Generated by `bench/perf_analyzer.py`.",
        "",
        "```",
        report["command"],
        report["perf_analyzer_command_display"],
        "```",
        "",
        f"- Machine: {machine['cpu_count']} CPUs ({machine.get('cpus_usable', '?')} usable), {machine['cpu_model']};"
        f" {machine['platform']}; Python {machine['python']}, torch {machine['torch']}",
        f"- Server: `{report['server']['command_display']}`; SIGTERM exit status {report['server']['exit_status']}",
        f"- perf_analyzer exit status {report['perf_analyzer_exit_status']},"
        f" took {report['perf_analyzer_seconds']:.0f} s; run started {report['started_at']}",
        "",
        "| concurrency | req/s | p50 µs | p90 µs | p95 µs | p99 µs | avg µs | client send µs | network + server µs"
        " | server queue µs | server compute input µs | server compute infer µs | server compute output µs |"
        " client recv µs |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in report["results"]:
        cells = [row.get("concurrency"), f"{row.get('throughput_rps', 0):,.0f}"]
        cells += [
            row.get(key, "n/a")
            for key in (
                "p50_us", "p90_us", "p95_us", "p99_us", "avg_us", "client_send_us", "network_server_send_recv_us",
                "server_queue_us", "server_compute_input_us", "server_compute_infer_us", "server_compute_output_us",
                "client_recv_us",
            )
        ]  # fmt: skip
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    lines += [
        "",
        "Latencies are perf_analyzer's client-side numbers; the server columns come from Weir's ModelStatistics"
        " (perf_analyzer reads them before and after each window), averaged per request.",
    ]
    if report["perf_analyzer_exit_status"] != 0 or not report["results"]:
        lines += ["", "**perf_analyzer failed: no results.** Its output is in perf_analyzer.json (`output`)."]
    if report["warnings"]:
        lines += ["", "perf_analyzer warnings and errors:", "", "```", *report["warnings"], "```"]
    lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    binary, env = prerequisites()
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    machine = harness.machine_info()
    say(f"perf_analyzer: {harness.display_path(binary)}; LD_LIBRARY_PATH={env['LD_LIBRARY_PATH']}")

    with tempfile.TemporaryDirectory(prefix="weir-perf-analyzer-") as temporary:
        repository = harness.build_demo_repository(Path(temporary) / "repository")
        say(f"demo repository built in {repository}")
        server = harness.start_weir(repository)
        say(f"weir serve started on {server.url} (pid {server.process.pid})")
        csv_path = Path(temporary) / "perf_analyzer.csv"
        command = [
            str(binary),
            "-m", harness.MODEL,
            "-i", "grpc",
            "-u", server.url,
            "--concurrency-range", args.concurrency_range,
            "--measurement-interval", str(args.measurement_interval),
            "--stability-percentage", f"{args.stability_percentage:g}",
            "-f", str(csv_path),
        ]  # fmt: skip
        say("running: " + " ".join(command))
        server_exit: int | None = None
        began = time.monotonic()
        try:
            try:
                completed = subprocess.run(
                    command, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, timeout=args.timeout
                )
                status: int | None = completed.returncode
                output = completed.stdout + completed.stderr
            except subprocess.TimeoutExpired as expired:
                status = None
                output = _text(expired.stdout) + _text(expired.stderr) + f"\n[killed after {args.timeout:.0f} s]"
            pa_seconds = time.monotonic() - began
            results = parse_csv(csv_path) if status == 0 and csv_path.exists() else []
        finally:
            try:
                server_exit = server.stop()
            except RuntimeError as error:
                say(str(error))
            say(f"weir serve stopped with SIGTERM: exit status {server_exit}")

    averages = parse_average_latencies(output)
    for row in results:
        if "avg_us" not in row and row.get("concurrency") in averages:
            row["avg_us"] = averages[row["concurrency"]]
    warnings = [line.rstrip() for line in output.splitlines() if re.search(r"warn|error|fail|unable", line, re.I)]
    display = command.copy()
    display[0] = "perf_analyzer"
    display[display.index("-f") + 1] = "RESULTS.csv"
    report: dict[str, Any] = {
        "benchmark": "perf_analyzer",
        "command": harness.command_line(),
        "perf_analyzer_command": command,
        "perf_analyzer_command_display": " ".join(display).replace(server.url, "127.0.0.1:PORT"),
        "perf_analyzer_exit_status": status,
        "perf_analyzer_seconds": round(pa_seconds, 1),
        "started_at": started_at,
        "model": harness.MODEL,
        "machine": machine,
        "server": {
            "command": server.command,
            "command_display": " ".join(["weir", *server.command[server.command.index("serve") :]]).replace(
                str(repository), "<demo-repository>"
            ),
            "exit_status": server_exit,
        },
        "results": results,
        "warnings": warnings,
        "output": output,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "perf_analyzer.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    write_markdown(args.out / "perf_analyzer.md", report)
    say(f"wrote {harness.display_path(args.out)}/perf_analyzer.json, perf_analyzer.md")

    if status != 0 or not results:
        print(f"\nperf_analyzer failed (exit status {status}); its output:\n{output}", file=sys.stderr)
        print("server log tail:\n" + server.log_tail(), file=sys.stderr)
        return 1
    print(f"\n{'concurrency':>11} {'req/s':>9} {'p50 us':>8} {'p99 us':>8} {'server infer us':>16}")
    for row in results:
        print(
            f"{row.get('concurrency', '?'):>11} {row.get('throughput_rps', 0):>9.1f} {row.get('p50_us', 0):>8} "
            f"{row.get('p99_us', 0):>8} {row.get('server_compute_infer_us', 0):>16}"
        )
    if warnings:
        print("\nperf_analyzer warnings:\n" + "\n".join(warnings))
    if server_exit != 0:
        say(f"FAILED: weir serve exited with status {server_exit} after SIGTERM (expected 0)")
        return 1
    return 0


def _text(value: str | bytes | None) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


if __name__ == "__main__":
    sys.exit(main())
