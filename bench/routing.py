"""The traffic router's overhead: the same data plane, the same model, called through its endpoint
(routed: the variant chosen per request) and directly by its variant model name (`ENDPOINT@primary`),
alternating in one run, with the load harness (`weir bench`).

    .venv/bin/python bench/routing.py [--concurrency 1,8] [--duration 8] [--rounds 2] [--out bench/results]

Starts `weir up` (control plane + data plane) on free loopback ports, pushes and deploys the demo
MLP with a sticky-key routing policy, then runs `weir bench` against both names, round after round
(alternating, so drift on a noisy machine hits both), with the server on CPU 0 and the client on
CPU 1 when two are usable. Writes routing.json and routing.md (p50/p99/throughput and the
routed/direct ratios).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402

ENDPOINT = harness.MODEL


def say(message: str) -> None:
    print(f"[routing {time.strftime('%H:%M:%S')}] {message}", flush=True)


def start_up(state_dir: Path, server_cpu: int | None) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    ready_file = state_dir / "ready.json"
    command = [
        *harness.weir_command(), "up", "--state-dir", str(state_dir), "--control-port", "0", "--grpc-port", "0",
        "--metrics-port", "0", "--ready-file", str(ready_file), "--log-format", "json", "--log-level", "WARNING",
    ]  # fmt: skip
    if server_cpu is not None:
        command = ["taskset", "-c", str(server_cpu), *command]
    say("$ " + shlex.join(command))
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 120
    while not ready_file.is_file():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit("weir up did not start")
        time.sleep(0.2)
    return process, json.loads(ready_file.read_text())


def weir_client(ready: dict[str, Any], *args: str) -> dict[str, Any]:
    token = Path(ready["admin_token_file"]).read_text().strip()
    command = [*harness.weir_command(), *args, "--control-plane", ready["control_plane"], "--json"]
    result = subprocess.run(command, env={**os.environ, "WEIR_TOKEN": token}, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{shlex.join(command)} failed: {result.stdout}{result.stderr}")
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def bench(url: str, model: str, args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    command = [
        *harness.weir_command(), "bench", "--url", url, "--model", model, "--mode", "closed",
        "--concurrency", args.concurrency, "--duration", f"{args.duration:g}", "--warmup", "1",
        "--processes", "1", "--out", str(out),
    ]  # fmt: skip
    if args.client_cpu is not None:
        command = ["taskset", "-c", str(args.client_cpu), *command]
    subprocess.run(command, check=True, capture_output=True, text=True)
    levels = json.loads((out / "results.json").read_text())["levels"]
    return [
        {
            "concurrency": level["concurrency"],
            "throughput": level["throughput_rps"],
            "p50_ms": level["latency_ms"]["p50"],
            "p99_ms": level["latency_ms"]["p99"],
            "errors": level["failed"],
        }
        for level in levels
    ]


def summarise(rounds: list[dict[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Per concurrency: the median over rounds of each figure, and routed/direct ratios."""
    rows = []
    for index, level in enumerate(rounds[0]["routed"]):
        row: dict[str, Any] = {"concurrency": level["concurrency"]}
        for name in ("routed", "direct"):
            for figure in ("throughput", "p50_ms", "p99_ms"):
                row[f"{name}_{figure}"] = statistics.median(r[name][index][figure] for r in rounds)
            row[f"{name}_errors"] = sum(r[name][index]["errors"] for r in rounds)
        row["throughput_ratio"] = round(row["routed_throughput"] / row["direct_throughput"], 3)
        row["p50_ratio"] = round(row["routed_p50_ms"] / row["direct_p50_ms"], 3)
        row["p99_ratio"] = round(row["routed_p99_ms"] / row["direct_p99_ms"], 3)
        rows.append(row)
    return rows


def write_markdown(path: Path, report: dict[str, Any]) -> None:
    lines = [
        "# Router overhead: endpoint (routed) vs its variant model (direct), same data plane, same run",
        "",
        "```",
        report["command"],
        "```",
        "",
        f"- Machine: {report['machine']['cpu_count']} CPUs, {report['machine']['cpu_model']}; "
        f"rounds {report['settings']['rounds']} x {report['settings']['duration_s']:g} s per name and level, "
        "alternating; medians over rounds.",
        "",
        "| concurrency | routed req/s | direct req/s | routed/direct throughput | routed p50 ms | direct p50 ms "
        "| p50 ratio | routed p99 ms | direct p99 ms | p99 ratio | errors |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['concurrency']} | {row['routed_throughput']:,.0f} | {row['direct_throughput']:,.0f} "
            f"| {row['throughput_ratio']:.3f} | {row['routed_p50_ms']:.3f} | {row['direct_p50_ms']:.3f} "
            f"| {row['p50_ratio']:.3f} | {row['routed_p99_ms']:.3f} | {row['direct_p99_ms']:.3f} "
            f"| {row['p99_ratio']:.3f} | {row['routed_errors'] + row['direct_errors']} |"
        )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=harness.RESULTS)
    args = parser.parse_args(argv)
    usable = sorted(os.sched_getaffinity(0))
    server_cpu, args.client_cpu = (usable[0], usable[1]) if len(usable) >= 2 else (None, None)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="weir-routing-") as tmp_name:
        tmp = Path(tmp_name)
        repository = harness.build_demo_repository(tmp / "repository")
        process, ready = start_up(tmp / "state", server_cpu)
        try:
            model_dir = repository / ENDPOINT
            weir_client(ready, "models", "push", ENDPOINT, str(model_dir / "1" / "model.pt"),
                        "--config", str(model_dir / "config.pbtxt"))  # fmt: skip
            weir_client(ready, "traffic", ENDPOINT, "--variant", f"primary={ENDPOINT}:1:100", "--key-header", "x-user")
            import tritonclient.grpc as grpcclient

            client = grpcclient.InferenceServerClient(ready["data_plane"])
            deadline = time.monotonic() + 120
            while not client.is_model_ready(ENDPOINT):
                if time.monotonic() > deadline:
                    raise SystemExit("the data plane did not load the endpoint")
                time.sleep(0.2)
            client.close()
            rounds = []
            for round_index in range(args.rounds):
                results = {}
                for name, model in (("routed", ENDPOINT), ("direct", f"{ENDPOINT}@primary")):
                    say(f"round {round_index + 1}: {name} ({model})")
                    results[name] = bench(ready["data_plane"], model, args, tmp / f"{name}-{round_index}")
                rounds.append(results)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
    report = {
        "command": harness.command_line(),
        "machine": harness.machine_info(),
        "settings": {"concurrency": args.concurrency, "duration_s": args.duration, "rounds": args.rounds},
        "rounds": rounds,
        "rows": summarise(rounds),
    }
    (args.out / "routing.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(args.out / "routing.md", report)
    for row in report["rows"]:
        say(
            f"c={row['concurrency']}: routed/direct throughput {row['throughput_ratio']:.3f}, "
            f"p50 {row['p50_ratio']:.3f}, p99 {row['p99_ratio']:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
