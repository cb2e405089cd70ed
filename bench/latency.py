"""Weir's overhead over a direct torch call of the same model, on loopback.

    python bench/latency.py [--requests N] [--duration S] [--concurrency 1,8,32] [--out bench/results]

One run builds the demo repository into a temporary directory, starts `weir serve` on 127.0.0.1
(serving only mlp_classifier), and measures, after a warm-up of each:

  direct  torch.jit.load of mlp_classifier/1/model.pt, called in this process on a [1, 256] FP32
          input under torch.inference_mode: sequential single-call latency, then closed-loop
          throughput with each concurrency's number of threads calling the module.
  weir    the same input through tritonclient.grpc (sync, one client per thread, raw FP32 input):
          sequential single-request latency, then closed-loop throughput at each concurrency.

Every measurement stops at --requests requests or --duration seconds, whichever comes first. Writes
latency.json, latency.md and latency.png under --out. The server is stopped with SIGTERM and must exit 0.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import json
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import harness

INPUT, OUTPUT, FEATURES, CLASSES = "INPUT__0", "OUTPUT__0", 256, 10
WARMUP_SECONDS = 1.0  # sequential warm-up of each target before anything is measured
WARMUP_PER_THREAD = 10  # calls each closed-loop thread makes before the start barrier
CLIENT_TIMEOUT_S = 30.0  # per gRPC request: a stuck server fails the request instead of hanging the run

Session = Callable[[], contextlib.AbstractContextManager[Callable[[], Any]]]

_T0 = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f}s] {message}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--requests", type=int, default=20000, metavar="N", help="most requests per measurement (default 20000)"
    )
    parser.add_argument(
        "--duration", type=float, default=10.0, metavar="S", help="most seconds per measurement (default 10)"
    )
    parser.add_argument(
        "--concurrency", default="1,8,32", metavar="LIST", help="closed-loop thread counts (default 1,8,32)"
    )
    parser.add_argument("--out", type=Path, default=harness.RESULTS, help="results folder (default bench/results)")
    args = parser.parse_args(argv)
    try:
        args.concurrency = sorted({int(item) for item in args.concurrency.split(",") if item.strip()})
    except ValueError:
        parser.error(f"--concurrency: expected comma-separated integers, got {args.concurrency!r}")
    if not args.concurrency or min(args.concurrency) < 1 or max(args.concurrency) > 256:
        parser.error("--concurrency: each value must be 1..256")
    if args.requests < 1:
        parser.error("--requests must be at least 1")
    if not 0 < args.duration <= 600:
        parser.error("--duration must be in (0, 600] seconds")
    return args


def check_prerequisites() -> None:
    missing = [name for name in ("numpy", "torch", "tritonclient.grpc", "matplotlib") if not _importable(name)]
    if missing:
        print(
            f"bench/latency.py: missing Python packages: {', '.join(missing)}.\n"
            "Run it with the project's virtual environment (`make setup`, then `.venv/bin/python bench/latency.py`);\n"
            "matplotlib alone: `.venv/bin/pip install matplotlib` (it is in the project's `bench` extra).",
            file=sys.stderr,
        )
        sys.exit(2)


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


# --------------------------------------------------------------------------------------------------
# Measurement


def summarize(latencies_ns: list[int], errors: int, seconds: float) -> dict[str, Any]:
    import numpy as np

    completed = len(latencies_ns)
    result: dict[str, Any] = {
        "requests": completed,
        "errors": errors,
        "seconds": round(seconds, 4),
        "throughput_rps": round(completed / seconds, 2) if seconds > 0 else None,
    }
    if completed:
        values = np.asarray(latencies_ns, dtype=np.float64) / 1000.0
        p50, p90, p99 = np.percentile(values, [50, 90, 99])
        result.update(
            p50_us=round(float(p50), 2),
            p90_us=round(float(p90), 2),
            p99_us=round(float(p99), 2),
            mean_us=round(float(values.mean()), 2),
            min_us=round(float(values.min()), 2),
            max_us=round(float(values.max()), 2),
        )
    return result


def warm_up(session: Session, seconds: float) -> int:
    calls = 0
    with session() as call:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline and calls < 100_000:
            call()
            calls += 1
    return calls


def sequential(session: Session, max_requests: int, max_seconds: float) -> dict[str, Any]:
    """One request after another from this thread."""
    latencies: list[int] = []
    errors = 0
    first_error: str | None = None
    with session() as call:
        for _ in range(WARMUP_PER_THREAD):
            call()
        start = time.perf_counter()
        deadline = start + max_seconds
        for _ in range(max_requests):
            if time.perf_counter() >= deadline:
                break
            began = time.perf_counter_ns()
            try:
                call()
            except Exception as error:
                errors += 1
                first_error = first_error or repr(error)
                continue
            latencies.append(time.perf_counter_ns() - began)
        elapsed = time.perf_counter() - start
    result = summarize(latencies, errors, elapsed)
    if first_error:
        result["first_error"] = first_error
    return result


def closed_loop(session: Session, concurrency: int, max_requests: int, max_seconds: float) -> dict[str, Any]:
    """``concurrency`` threads, each issuing its next request as soon as the previous one returns,
    until ``max_requests`` have been started in all or ``max_seconds`` have passed."""
    tickets = itertools.count()
    clock: dict[str, float] = {}

    def start_clock() -> None:  # runs once, when every thread has warmed up and reached the barrier
        clock["start"] = time.perf_counter()
        clock["deadline"] = clock["start"] + max_seconds

    barrier = threading.Barrier(concurrency, action=start_clock)
    latencies: list[list[int]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    finished = [0.0] * concurrency
    failures: list[str] = []

    def worker(index: int) -> None:
        mine = latencies[index]
        try:
            with session() as call:
                for _ in range(WARMUP_PER_THREAD):
                    call()
                barrier.wait(timeout=120)
                deadline = clock["deadline"]
                while next(tickets) < max_requests and time.perf_counter() < deadline:
                    began = time.perf_counter_ns()
                    try:
                        call()
                    except Exception as error:
                        errors[index] += 1
                        if len(failures) < 5:
                            failures.append(repr(error))
                        continue
                    mine.append(time.perf_counter_ns() - began)
                finished[index] = time.perf_counter()
        except threading.BrokenBarrierError:
            pass
        except BaseException as error:
            failures.append(f"thread {index} setup: {error!r}")
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,), name=f"bench-{i}", daemon=True) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    join_deadline = time.monotonic() + max_seconds + 120 + CLIENT_TIMEOUT_S
    for thread in threads:
        thread.join(timeout=max(0.0, join_deadline - time.monotonic()))
    if any(thread.is_alive() for thread in threads):
        raise RuntimeError(f"closed loop at concurrency {concurrency} did not finish in time")
    if "start" not in clock:
        raise RuntimeError(f"closed loop at concurrency {concurrency} did not start: {failures[:3]}")
    elapsed = max(finished) - clock["start"]
    result = summarize([value for values in latencies for value in values], sum(errors), elapsed)
    result["concurrency"] = concurrency
    if failures:
        result["first_errors"] = failures[:5]
    return result


# --------------------------------------------------------------------------------------------------
# The two targets


def direct_session(module: Any, features: Any, torch_threads: int = 0) -> Session:
    """In-process calls of ``module``. ``torch_threads``: intra-op threads set in each calling
    thread (torch keeps the count per thread; 0 leaves torch's default)."""
    import torch

    @contextlib.contextmanager
    def session() -> Iterator[Callable[[], Any]]:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        with torch.inference_mode():  # thread-local: entered in the calling thread
            yield lambda: module(features)

    return session


def weir_session(url: str, data: Any) -> Session:
    import tritonclient.grpc as grpcclient

    @contextlib.contextmanager
    def session() -> Iterator[Callable[[], Any]]:
        client = grpcclient.InferenceServerClient(url=url)
        request_input = grpcclient.InferInput(INPUT, list(data.shape), "FP32")
        request_input.set_data_from_numpy(data)  # raw_input_contents
        outputs = [grpcclient.InferRequestedOutput(OUTPUT)]
        try:
            yield lambda: client.infer(harness.MODEL, [request_input], outputs=outputs, client_timeout=CLIENT_TIMEOUT_S)
        finally:
            client.close()

    return session


def measure(
    name: str, session: Session, args: argparse.Namespace, warmup_seconds: float = WARMUP_SECONDS
) -> dict[str, Any]:
    calls = warm_up(session, warmup_seconds)
    say(f"{name}: warmed up ({calls} calls in {warmup_seconds:.1f}s)")
    result: dict[str, Any] = {"warmup_calls": calls}
    result["sequential"] = sequential(session, args.requests, args.duration)
    say(f"{name}: sequential        {_brief(result['sequential'])}")
    result["closed_loop"] = {}
    for concurrency in args.concurrency:
        stats = closed_loop(session, concurrency, args.requests, args.duration)
        result["closed_loop"][str(concurrency)] = stats
        say(f"{name}: concurrency {concurrency:>3}   {_brief(stats)}")
    return result


def _brief(stats: dict[str, Any]) -> str:
    text = (
        f"{stats['throughput_rps']:>9.1f} req/s  p50 {stats.get('p50_us', float('nan')):>8.1f} us  "
        f"p99 {stats.get('p99_us', float('nan')):>8.1f} us  ({stats['requests']} requests, {stats['seconds']:.1f}s)"
    )
    if stats["errors"]:
        text += f"  ERRORS {stats['errors']}"
    return text


def compare(direct: dict[str, Any], weir: dict[str, Any]) -> dict[str, Any]:
    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    def pair(d: dict[str, Any], w: dict[str, Any]) -> dict[str, Any]:
        return {
            "latency_ratio_p50": ratio(w.get("p50_us"), d.get("p50_us")),
            "latency_ratio_p99": ratio(w.get("p99_us"), d.get("p99_us")),
            "overhead_us_p50": round(w["p50_us"] - d["p50_us"], 2) if "p50_us" in w and "p50_us" in d else None,
            "overhead_us_p99": round(w["p99_us"] - d["p99_us"], 2) if "p99_us" in w and "p99_us" in d else None,
            "throughput_ratio": ratio(w.get("throughput_rps"), d.get("throughput_rps")),
        }

    return {
        "sequential": pair(direct["sequential"], weir["sequential"]),
        "closed_loop": {c: pair(direct["closed_loop"][c], weir["closed_loop"][c]) for c in direct["closed_loop"]},
    }


# --------------------------------------------------------------------------------------------------
# Reports


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}"


def write_markdown(path: Path, report: dict[str, Any]) -> None:
    machine, settings = report["machine"], report["settings"]
    direct, weir, comparison = report["direct"], report["weir"], report["comparison"]
    rows = [("sequential", direct["sequential"], weir["sequential"], comparison["sequential"])]
    rows += [
        (c, direct["closed_loop"][c], weir["closed_loop"][c], comparison["closed_loop"][c])
        for c in direct["closed_loop"]
    ]
    lines = [
        "# Weir vs direct torch call: latency and throughput",
        "",
        f"Model `{report['model']}` (TorchScript MLP, FP32 `{INPUT}` [1, {FEATURES}] -> `{OUTPUT}` [1, {CLASSES}]),"
        " batch 1, loopback gRPC. Generated by `bench/latency.py`.",
        "",
        "```",
        report["command"],
        "```",
        "",
        f"- Machine: {machine['cpu_count']} CPUs ({machine.get('cpus_usable', '?')} usable), {machine['cpu_model']};"
        f" {machine['platform']}",
        f"- Python {machine['python']}, torch {machine['torch']} ({machine['torch_threads']} intra-op threads),"
        f" tritonclient {machine['tritonclient']}, grpcio {machine['grpcio']}",
        f"- Per measurement: at most {settings['requests']} requests or {settings['duration_s']:g} s;"
        f" concurrency {', '.join(map(str, settings['concurrency']))}; run started {report['started_at']},"
        f" took {report['total_seconds']:.0f} s",
        f"- Server: `{report['server']['command_display']}`; SIGTERM exit status {report['server']['exit_status']}",
        f"- Outputs of Weir and the direct call agree: {report['outputs_match']}",
        "",
        "| concurrency | direct req/s | Weir req/s | Weir/direct throughput | direct p50 µs | Weir p50 µs"
        " | direct p99 µs | Weir p99 µs | Weir/direct p50 | Weir/direct p99 | added p50 µs (Weir - direct) |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for label, d, w, c in rows:
        lines.append(
            f"| {label} | {_fmt(d['throughput_rps'], 0)} | {_fmt(w['throughput_rps'], 0)}"
            f" | {_fmt(c['throughput_ratio'], 3)} | {_fmt(d.get('p50_us'))} | {_fmt(w.get('p50_us'))}"
            f" | {_fmt(d.get('p99_us'))} | {_fmt(w.get('p99_us'))} | {_fmt(c['latency_ratio_p50'], 2)}x"
            f" | {_fmt(c['latency_ratio_p99'], 2)}x | {_fmt(c['overhead_us_p50'])} |"
        )
    errors = sum(s["errors"] for _, d, w, _ in rows for s in (d, w))
    lines += [
        "",
        '"sequential" is one request after another from one thread; the numbered rows are closed loops with that'
        " many threads (each sends its next request when the previous one returns). Latencies are per request as"
        " seen by the caller; the client, the server and (for the direct rows) the threads all share this"
        " machine's CPUs.",
        "",
        f"Request errors: {errors}.",
        "",
        "![throughput and latency](latency.png)",
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")


def write_plot(path: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    concurrency = [int(c) for c in report["direct"]["closed_loop"]]
    series = {"direct torch": report["direct"], "Weir (gRPC)": report["weir"]}
    colors = {"direct torch": "tab:blue", "Weir (gRPC)": "tab:orange"}
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5))

    for name, data in series.items():
        values = [data["closed_loop"][str(c)]["throughput_rps"] for c in concurrency]
        left.plot(concurrency, values, marker="o", label=name, color=colors[name])
        for x, y in zip(concurrency, values, strict=True):
            left.annotate(f"{y:,.0f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    left.set_xscale("log", base=2)
    left.set_xticks(concurrency, [str(c) for c in concurrency])
    left.set_yscale("log")
    left.set_xlabel("concurrency (closed-loop threads)")
    left.set_ylabel("throughput (req/s, log scale)")
    left.set_title("Closed-loop throughput")
    left.grid(True, which="both", alpha=0.3)
    left.legend()

    groups = ["seq", *map(str, concurrency)]
    width = 0.2
    for offset, (name, percentile, hatch) in enumerate(
        [
            ("direct torch", "p50_us", ""),
            ("direct torch", "p99_us", "//"),
            ("Weir (gRPC)", "p50_us", ""),
            ("Weir (gRPC)", "p99_us", "//"),
        ]
    ):
        data = series[name]
        stats = [data["sequential"], *(data["closed_loop"][str(c)] for c in concurrency)]
        xs = [i + (offset - 1.5) * width for i in range(len(groups))]
        right.bar(
            xs,
            [s.get(percentile, 0) for s in stats],
            width,
            label=f"{name} {percentile[:3]}",
            color=colors[name],
            alpha=1.0 if percentile == "p50_us" else 0.55,
            hatch=hatch,
            edgecolor="black",
            linewidth=0.4,
        )
    right.set_xticks(range(len(groups)), ["sequential", *(f"c={c}" for c in concurrency)])
    right.set_yscale("log")
    right.set_ylabel("latency per request (µs, log scale)")
    right.set_title("p50 / p99 latency")
    right.grid(True, axis="y", which="both", alpha=0.3)
    right.legend(fontsize=8)

    figure.suptitle(f"Weir vs direct torch call — {report['model']}, batch 1, loopback")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_prerequisites()
    import numpy as np
    import torch

    started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    machine = harness.machine_info() | {"torch_threads": torch.get_num_threads()}
    say(f"machine: {machine['cpu_count']} CPUs, python {machine['python']}, torch {machine['torch']}")
    data = np.random.default_rng(0).standard_normal((1, FEATURES), dtype=np.float32)
    exit_status = 0

    with tempfile.TemporaryDirectory(prefix="weir-bench-") as temporary:
        repository = harness.build_demo_repository(Path(temporary) / "repository")
        say(f"demo repository built in {repository}")
        server = harness.start_weir(repository)
        say(f"weir serve started on {server.url} (pid {server.process.pid})")
        server_exit: int | None = None
        try:
            module = torch.jit.load(str(repository / harness.MODEL / "1" / "model.pt")).eval()
            features = torch.from_numpy(data)
            direct = measure("direct", direct_session(module, features), args)
            weir = measure("weir  ", weir_session(server.url, data), args)
            with weir_session(server.url, data)() as call:
                served = call().as_numpy(OUTPUT)
            with torch.inference_mode():
                expected = module(features).numpy()
            outputs_match = bool(served.shape == expected.shape and np.allclose(served, expected, rtol=1e-4, atol=1e-5))
        finally:
            try:
                server_exit = server.stop()
            except RuntimeError as error:
                say(str(error))
            say(f"weir serve stopped with SIGTERM: exit status {server_exit}")

    report: dict[str, Any] = {
        "benchmark": "latency",
        "command": harness.command_line(),
        "started_at": started_at,
        "total_seconds": round(time.monotonic() - _T0, 1),
        "model": harness.MODEL,
        "input": {"name": INPUT, "shape": [1, FEATURES], "datatype": "FP32", "encoding": "raw_input_contents"},
        "machine": machine,
        "settings": {
            "requests": args.requests,
            "duration_s": args.duration,
            "concurrency": args.concurrency,
            "warmup_seconds": WARMUP_SECONDS,
            "warmup_calls_per_thread": WARMUP_PER_THREAD,
            "percentiles": "numpy.percentile (linear interpolation) over every request of the measurement",
        },
        "server": {
            "command": server.command,
            "command_display": " ".join(["weir", *server.command[server.command.index("serve") :]]).replace(
                str(repository), "<demo-repository>"
            ),
            "exit_status": server_exit,
        },
        "outputs_match": outputs_match,
        "direct": direct,
        "weir": weir,
    }
    report["comparison"] = compare(direct, weir)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latency.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    write_markdown(args.out / "latency.md", report)
    write_plot(args.out / "latency.png", report)
    say(f"wrote {harness.display_path(args.out)}/latency.json, latency.md, latency.png")

    print()
    print(f"{'':>10} {'direct req/s':>12} {'weir req/s':>11} {'direct p50':>10} {'weir p50':>9} "
          f"{'direct p99':>10} {'weir p99':>9} {'p50 x':>6} {'+p50 us':>8}")  # fmt: skip
    for label, d, w, c in [
        ("seq", direct["sequential"], weir["sequential"], report["comparison"]["sequential"]),
        *(
            (f"c={k}", direct["closed_loop"][k], weir["closed_loop"][k], report["comparison"]["closed_loop"][k])
            for k in direct["closed_loop"]
        ),
    ]:
        print(
            f"{label:>10} {d['throughput_rps']:>12.0f} {w['throughput_rps']:>11.0f} {d.get('p50_us', 0):>10.1f} "
            f"{w.get('p50_us', 0):>9.1f} {d.get('p99_us', 0):>10.1f} {w.get('p99_us', 0):>9.1f} "
            f"{c['latency_ratio_p50'] or 0:>6.2f} {c['overhead_us_p50'] or 0:>8.1f}"
        )

    errors = sum(
        s["errors"] for target in (direct, weir) for s in [target["sequential"], *target["closed_loop"].values()]
    )
    if errors:
        say(f"FAILED: {errors} request errors (see latency.json)")
        exit_status = 1
    if server_exit != 0:
        say(f"FAILED: weir serve exited with status {server_exit} after SIGTERM (expected 0)")
        say("server log tail:\n" + server.log_tail())
        exit_status = 1
    if not outputs_match:
        say("FAILED: Weir's output differs from the direct torch call")
        exit_status = 1
    return exit_status


if __name__ == "__main__":
    sys.exit(main())
