"""Weir against its peers under the same closed-loop load, each server on one pinned CPU.

    .venv/bin/python bench/peers/compare.py [--peers floor,mlserver,pytriton,kserve,ray]
        [--concurrency 1,8,32] [--duration 10] [--server-cpu 0] [--client-cpu 1] [--out bench/results]

For Weir (`weir serve` on the demo repository, as bench/harness.py starts it) and for each peer that
bench/peers/setup.py installed: start the server pinned to --server-cpu, wait for V2 ServerReady and
ModelReady, run

    python -m weir.cli bench --url 127.0.0.1:PORT --model mlp_classifier --mode closed \
        --concurrency 1,8,32 --duration 10 --processes 1 --out TMP/<target>

pinned to --client-cpu, read its results.json, stop the server. Also measures the direct torch call in
this process on --server-cpu (single-row calls, 1/8/32 threads, like bench/latency.py) as the ceiling.
Writes peers.json, peers.md and peers.png under --out. A peer that fails to start or to answer is recorded
with its error and the run goes on; exit status 1 if any target failed, 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import common  # noqa: E402
import harness  # noqa: E402

TARGET_ORDER = ("weir", "weir-cache", *common.NAMES)
LABELS = {
    "weir": "Weir",
    "weir-cache": "Weir, response cache hits",
    "floor": "bare grpc.aio floor (canned response)",
    "mlserver": "MLServer 1.7.1",
    "pytriton": "PyTriton 0.7.0 (Triton server)",
    "kserve": "KServe 0.21 ModelServer",
    "ray": "Ray Serve 2.60",
}

COLORS = {
    "direct": "tab:gray",
    "weir": "tab:orange",
    "weir-cache": "tab:red",
    "floor": "tab:olive",
    "mlserver": "tab:green",
    "pytriton": "tab:purple",
    "kserve": "tab:brown",
    "ray": "tab:blue",
}


def say(message: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", default=",".join(common.NAMES), help="comma-separated peers (default: all)")
    parser.add_argument("--no-weir", action="store_true", help="skip Weir itself")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per concurrency level (default 10)")
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    parser.add_argument("--out", type=Path, default=harness.RESULTS)
    args = parser.parse_args(argv)
    args.peers = [name.strip() for name in args.peers.split(",") if name.strip()]
    unknown = [name for name in args.peers if name not in common.NAMES]
    if unknown:
        parser.error(f"unknown peers {unknown}; choose from {', '.join(common.NAMES)}")
    args.concurrency_list = sorted({int(item) for item in args.concurrency.split(",") if item.strip()})
    usable = os.sched_getaffinity(0)
    for cpu in (args.server_cpu, args.client_cpu):
        if cpu not in usable:
            parser.error(f"CPU {cpu} is not usable here (usable: {sorted(usable)})")
    return args


# --------------------------------------------------------------------------------------------------
# The load client: `weir bench` as a subprocess, pinned


def bench_command(url: str, args: argparse.Namespace, out: Path, extra: list[str]) -> list[str]:
    return [
        "taskset", "-c", str(args.client_cpu),
        sys.executable, "-m", "weir.cli", "bench",
        "--url", url, "--model", common.MODEL, "--mode", "closed",
        "--concurrency", ",".join(map(str, args.concurrency_list)),
        "--duration", f"{args.duration:g}", "--processes", "1", "--out", str(out), *extra,
    ]  # fmt: skip


def run_bench(
    url: str, args: argparse.Namespace, out: Path, prefix: list[str], extra: list[str] | None = None
) -> dict[str, Any]:
    command = [*prefix, *bench_command(url, args, out, extra or [])]
    say("$ " + shlex.join(command))
    limit = (args.duration + 60) * len(args.concurrency_list) + 120
    result = subprocess.run(command, capture_output=True, text=True, timeout=limit, cwd=str(common.ROOT))
    results_path = out / "results.json"
    record: dict[str, Any] = {"command": shlex.join(command), "exit_status": result.returncode}
    if not results_path.exists():
        record["error"] = f"no results.json (exit {result.returncode}): {(result.stderr or result.stdout)[-3000:]}"
        return record
    raw = json.loads(results_path.read_text())
    record["raw"] = raw
    record["levels"] = normalise_levels(raw)
    if result.returncode != 0:
        record["stderr_tail"] = result.stderr[-2000:]
    return record


def normalise_levels(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """results.json of `weir bench` -> [{concurrency, throughput, p50_ms, p99_ms, errors}].

    weir.loadtest writes per level: "concurrency", "throughput_rps" (successful requests / s),
    "latency_ms": {"p50", "p99", ...} and "failed" (errors + dropped; "errors" is a dict by status code).
    """
    levels = []
    for level in raw["levels"]:
        latency = level.get("latency_ms") or {}
        errors = level.get("failed")
        if errors is None:
            errors = level.get("errors", 0)
            errors = sum(errors.values()) if isinstance(errors, dict) else errors
        levels.append(
            {
                "concurrency": level.get("concurrency"),
                "throughput": level.get("throughput_rps", level.get("throughput")),
                "p50_ms": latency.get("p50", level.get("p50_ms")),
                "p99_ms": latency.get("p99", level.get("p99_ms")),
                "errors": errors,
                "error_codes": level.get("errors") if isinstance(level.get("errors"), dict) else None,
            }
        )
    return levels


# --------------------------------------------------------------------------------------------------
# Targets


def cached_repository(repository: Path, tmp: Path) -> Path:
    """A copy of the demo repository whose model has ``response_cache { enable: true }``."""
    copy = tmp / "cached-repository"
    shutil.copytree(repository / common.MODEL, copy / common.MODEL)
    config = copy / common.MODEL / "config.pbtxt"
    config.write_text(config.read_text() + "\nresponse_cache { enable: true }\n")
    return copy


def measure_weir(
    repository: Path, args: argparse.Namespace, tmp: Path, label: str = "weir", bench_extra: list[str] | None = None
) -> dict[str, Any]:
    # harness.start_weir takes no affinity: pin this thread while it forks, so the child inherits CPU 0.
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {args.server_cpu})
    try:
        server = harness.start_weir(repository)
    finally:
        os.sched_setaffinity(0, saved)
    record: dict[str, Any] = {"server_command": f"taskset -c {args.server_cpu} " + shlex.join(server.command)}
    try:
        record.update(run_bench(server.url, args, tmp / label, [], bench_extra))
    finally:
        record["stop_status"] = server.stop()
    return record


def measure_peer(name: str, model_path: Path, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    peer = common.load(name)
    problem = peer.available()
    if problem:
        return {"skipped": problem}
    began = time.monotonic()
    handle = peer.start(model_path=model_path, cpus={args.server_cpu}, log_dir=tmp / f"{name}-log")
    record: dict[str, Any] = {
        "server_command": f"taskset -c {args.server_cpu} " + shlex.join(handle.command),
        "startup_s": round(time.monotonic() - began, 1),
    }
    try:
        record.update(run_bench(handle.url, args, tmp / name, handle.client_prefix()))
    finally:
        record["stop_status"] = peer.stop(handle)
        record["server_log_tail"] = handle.log_tail(15)
    return record


def measure_direct(model_path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """In-process torch calls (single row) on the server CPU: sequential, then closed loops of threads."""
    import latency
    import torch

    saved = os.sched_getaffinity(0)
    saved_threads = torch.get_num_threads()  # torch was imported (repository build) before pinning:
    os.sched_setaffinity(0, {args.server_cpu})
    torch.set_num_threads(1)  # one thread on one CPU, as a server started pinned to it gets
    try:
        module = torch.jit.load(str(model_path)).eval()
        # One intra-op thread in every calling thread: set only here, the worker threads would each run
        # two OpenMP threads on the one server CPU (torch keeps the count per thread).
        session = latency.direct_session(module, torch.from_numpy(common.check_input()), torch_threads=1)
        latency.warm_up(session, 1.0)
        result: dict[str, Any] = {"torch_threads": torch.get_num_threads(), "levels": []}
        for concurrency in args.concurrency_list:
            stats = latency.closed_loop(session, concurrency, 20000, min(args.duration, 5.0))
            result["levels"].append(
                {
                    "concurrency": concurrency,
                    "throughput": stats["throughput_rps"],
                    "p50_ms": stats.get("p50_us", 0) / 1000.0,
                    "p99_ms": stats.get("p99_us", 0) / 1000.0,
                    "errors": stats["errors"],
                }
            )
    finally:
        os.sched_setaffinity(0, saved)
        torch.set_num_threads(saved_threads)
    return result


# --------------------------------------------------------------------------------------------------
# Reports


def _by_concurrency(record: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {int(level["concurrency"]): level for level in record.get("levels", []) if level.get("concurrency")}


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def table_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    weir = _by_concurrency(report["targets"].get("weir", {}))
    rows = []
    for name in ("direct", *TARGET_ORDER):
        record = report["direct"] if name == "direct" else report["targets"].get(name)
        if not record:
            continue
        levels = _by_concurrency(record)
        if not levels:
            rows.append({"target": name, "concurrency": None, "note": record.get("error") or record.get("skipped")})
            continue
        for concurrency, level in sorted(levels.items()):
            w = weir.get(concurrency, {})
            rows.append(
                {
                    "target": name,
                    "concurrency": concurrency,
                    "throughput": level["throughput"],
                    "p50_ms": level["p50_ms"],
                    "p99_ms": level["p99_ms"],
                    "errors": level["errors"],
                    "weir_over_peer_throughput": _ratio(w.get("throughput"), level["throughput"]),
                    "weir_over_peer_p99": _ratio(w.get("p99_ms"), level["p99_ms"]),
                }
            )
    return rows


PEERS_WITH_A_SERVER = ("mlserver", "pytriton", "kserve", "ray")


def goals(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's three goals, computed from this run's own numbers."""
    targets = report["targets"]
    weir = _by_concurrency(targets.get("weir", {}))
    cache = _by_concurrency(targets.get("weir-cache", {}))
    floor = _by_concurrency(targets.get("floor", {}))
    direct = _by_concurrency(report.get("direct", {}))
    results: list[dict[str, Any]] = []
    top = max(report["settings"]["concurrency"])
    peers = {name: _by_concurrency(targets.get(name, {})).get(top) for name in PEERS_WITH_A_SERVER}
    peers = {name: level for name, level in peers.items() if level}
    if peers and top in weir:
        best = max(peers, key=lambda name: peers[name]["throughput"])
        ratio = _ratio(weir[top]["throughput"], peers[best]["throughput"])
        p99_ratio = _ratio(weir[top]["p99_ms"], peers[best]["p99_ms"])
        results.append(
            {
                "goal": f"concurrency {top}: >= 1.5x the best peer's throughput with a lower p99",
                "measured": f"{ratio}x {LABELS[best]}'s throughput, p99 {p99_ratio}x",
                "met": bool(ratio and ratio >= 1.5 and p99_ratio is not None and p99_ratio < 1),
            }
        )
    if 1 in weir and 1 in floor and 1 in direct:
        bound = floor[1]["p50_ms"] + direct[1]["p50_ms"]
        ratio = _ratio(weir[1]["p50_ms"], bound)
        results.append(
            {
                "goal": "concurrency 1: p50 <= 1.3x (bare grpc.aio p50 + direct model p50)",
                "measured": f"{weir[1]['p50_ms']:.3f} ms = {ratio}x"
                f" ({floor[1]['p50_ms']:.3f} + {direct[1]['p50_ms']:.3f} ms)",
                "met": bool(ratio and ratio <= 1.3),
            }
        )
    for concurrency in sorted(set(cache) & set(floor)):
        ratio = _ratio(cache[concurrency]["p50_ms"], floor[concurrency]["p50_ms"])
        results.append(
            {
                "goal": f"cache hits, concurrency {concurrency}: p50 <= 1.2x the bare grpc.aio server's",
                "measured": f"{cache[concurrency]['p50_ms']:.3f} ms = {ratio}x the floor's"
                f" {floor[concurrency]['p50_ms']:.3f} ms",
                "met": bool(ratio and ratio <= 1.2),
            }
        )
    return results


def _fmt(value: Any, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def write_markdown(path: Path, report: dict[str, Any]) -> None:
    machine = report["machine"]
    lines = [
        "# Weir and its peers: the demo MLP over V2 gRPC, one server CPU",
        "",
        f"Model `{common.MODEL}` (TorchScript MLP 256-1024-1024-10), batch-1 requests of a [1, 256] FP32 `INPUT__0`,"
        " closed loop, loopback gRPC. Generated by `bench/peers/compare.py`:",
        "",
        "```",
        report["command"],
        "```",
        "",
        f"- Machine: {machine['cpu_count']} CPUs, {machine['cpu_model']}; {machine['platform']}; Python"
        f" {machine['python']}, torch {machine['torch']}, grpcio {machine['grpcio']}",
        f"- Each server pinned to CPU {report['settings']['server_cpu']}; the load client (`weir bench`,"
        f" --processes 1) pinned to CPU {report['settings']['client_cpu']}; {report['settings']['duration_s']:g} s"
        " per concurrency level. The direct row is in-process torch calls on the server CPU.",
        "- Weir/peer columns: Weir's throughput over the peer's (above 1 = Weir serves more) and Weir's p99 over"
        " the peer's (below 1 = Weir's tail is shorter).",
        "",
        "| target | concurrency | req/s | p50 ms | p99 ms | errors | Weir/peer throughput | Weir/peer p99 |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in table_rows(report):
        label = "direct torch call (in-process)" if row["target"] == "direct" else LABELS[row["target"]]
        if row["concurrency"] is None:
            lines.append(f"| {label} | - | failed: {str(row['note'])[:200]!s} | | | | | |")
            continue
        lines.append(
            f"| {label} | {row['concurrency']} | {_fmt(row['throughput'], 0)} | {_fmt(row['p50_ms'], 3)}"
            f" | {_fmt(row['p99_ms'], 3)} | {row['errors']} | {_fmt(row['weir_over_peer_throughput'], 2)}"
            f" | {_fmt(row['weir_over_peer_p99'], 2)} |"
        )
    lines += ["", "Goals (issue 3), from this run:", "", "| goal | measured | met |", "|---|---|---|"]
    for goal in report.get("goals", []):
        lines.append(f"| {goal['goal']} | {goal['measured']} | {'yes' if goal['met'] else 'no'} |")
    lines += ["", "Server commands:", ""]
    for name, record in report["targets"].items():
        if record.get("server_command"):
            lines.append(f"- {LABELS[name]}: `{record['server_command']}`")
    lines += ["", "![throughput and p99](peers.png)", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def write_plot(path: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    series = {"direct": report["direct"], **report["targets"]}
    for name, record in series.items():
        levels = sorted(_by_concurrency(record).items())
        if not levels:
            continue
        xs = [c for c, _ in levels]
        label = "direct torch" if name == "direct" else LABELS[name]
        style: dict[str, Any] = {"color": COLORS.get(name, "gray")}
        if name in ("direct", "floor"):
            style["linestyle"] = "--"
        if name == "weir":
            style["linewidth"] = 2.5
        left.plot(xs, [lv["throughput"] for _, lv in levels], marker="o", label=label, **style)
        if name != "direct":
            right.plot(xs, [lv["p99_ms"] for _, lv in levels], marker="o", label=label, **style)
    for axis, ylabel, title in (
        (left, "throughput (req/s, log)", "Closed-loop throughput"),
        (right, "p99 latency (ms, log)", "p99 latency"),
    ):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        ticks = report["settings"]["concurrency"]
        axis.set_xticks(ticks, [str(c) for c in ticks])
        axis.set_xlabel("concurrency")
        axis.set_ylabel(ylabel)
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle("Demo MLP over V2 gRPC, server pinned to one CPU, client on another")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    report: dict[str, Any] = {
        "command": harness.command_line(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": harness.machine_info(),
        "settings": {
            "concurrency": args.concurrency_list,
            "duration_s": args.duration,
            "server_cpu": args.server_cpu,
            "client_cpu": args.client_cpu,
            "client_processes": 1,
            "mlserver_parallel_workers": os.environ.get("MLSERVER_PARALLEL_WORKERS", "0"),
        },
        "targets": {},
    }
    failed = False
    with tempfile.TemporaryDirectory(prefix="weir-peers-compare-") as tmp_name:
        tmp = Path(tmp_name)
        repository = harness.build_demo_repository(tmp / "repository")
        model_path = repository / common.MODEL / "1" / "model.pt"
        say("direct torch calls (in-process, server CPU)")
        report["direct"] = measure_direct(model_path, args)
        targets = ([] if args.no_weir else ["weir", "weir-cache"]) + args.peers
        for name in targets:
            say(f"{name}: starting")
            try:
                if name == "weir":
                    record = measure_weir(repository, args, tmp)
                elif name == "weir-cache":
                    # Identical requests (zeros): every one after the first is answered from the cache.
                    cached = cached_repository(repository, tmp)
                    record = measure_weir(cached, args, tmp, "weir-cache", ["--input-data", "zeros"])
                else:
                    record = measure_peer(name, model_path, args, tmp)
            except Exception as error:
                record = {"error": str(error)[-4000:]}
            if "error" in record or "skipped" in record or record.get("exit_status"):
                failed = True
                say(f"{name}: FAILED/SKIPPED: {str(record.get('error') or record.get('skipped') or record)[:500]}")
            for level in record.get("levels", []):
                say(
                    f"{name}: c={level['concurrency']:>3} {_fmt(level['throughput'], 0):>8} req/s"
                    f"  p50 {_fmt(level['p50_ms'], 3)} ms  p99 {_fmt(level['p99_ms'], 3)} ms  errors {level['errors']}"
                )
            report["targets"][name] = record
    report["total_seconds"] = round(time.monotonic() - started, 1)
    report["table"] = table_rows(report)
    report["goals"] = goals(report)
    (args.out / "peers.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    write_markdown(args.out / "peers.md", report)
    try:
        write_plot(args.out / "peers.png", report)
    except ImportError:
        say("matplotlib missing: peers.png not written (`.venv/bin/pip install matplotlib`)")
    say(f"wrote {harness.display_path(args.out / 'peers.md')} ({report['total_seconds']:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
