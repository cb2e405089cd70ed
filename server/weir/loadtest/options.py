"""`weir bench` flags and their validation.

Kept to the standard library: ``weir.cli`` builds the bench parser next to the serve parser, and
`weir serve` must not pay for the bench's imports. Every check raises ``UsageError`` naming the flag,
the expected and the received value; the command answers it with exit status 2.
"""

from __future__ import annotations

import argparse
import re
import time
from dataclasses import dataclass
from pathlib import Path

from weir.loadtest.targets import TargetError, grpc_target, metrics_url

MODES = ("closed", "constant", "poisson")
DEFAULT_CONCURRENCY = (1, 8, 32)
MAX_CONCURRENCY = 4096
MAX_RATE = 1_000_000.0
MAX_DURATION_S = 600.0
MAX_WARMUP_S = 60.0
MAX_PROCESSES = 64
MAX_ARRIVALS_PER_LEVEL = 10_000_000  # open loop: rate x (warm-up + duration); bounds the schedule's memory
RESULTS_ROOT = Path("bench") / "results"


class UsageError(ValueError):
    """A bad flag value; exit status 2."""


@dataclass(frozen=True)
class BenchOptions:
    target: str
    """gRPC target (loopback HOST:PORT) of the server under test."""
    model: str
    """Model to load."""
    model_version: str
    """Version to load; empty: the server's choice."""
    mode: str
    """closed (fixed in-flight requests), constant or poisson (open loop at a fixed arrival rate)."""
    levels: tuple[float, ...]
    """Closed: total concurrency per level. Open: total requests per second per level."""
    duration_s: float
    """Measured seconds per level (default 10)."""
    warmup_s: float
    """Seconds of the same load before each level's measurement, not recorded (default 2)."""
    processes: int
    """Worker processes the load is spread over (default 1)."""
    payload: str
    """raw (raw_input_contents) or typed (contents); default raw."""
    batch_rows: int
    """Size of the batch dimension of every input (default 1)."""
    input_data: str
    """random or zeros (default random)."""
    timeout_s: float
    """gRPC deadline of each request (default 1 s)."""
    slos: tuple[str, ...]
    """--slo texts, checked by weir.loadtest.slo."""
    metrics_url: str | None
    """Prometheus endpoint of the server, for the stage budget; None: no budget."""
    out: Path
    """Results folder."""
    label: str
    """Free text naming the run in the reports."""
    max_in_flight: int
    """Open loop: outstanding requests over all workers beyond which arrivals are dropped (default 4096)."""
    seed: int
    """Seed for random input data and Poisson arrivals (default 0)."""

    @property
    def level_key(self) -> str:
        return "concurrency" if self.mode == "closed" else "rate"


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--url", default="127.0.0.1:8001", help="gRPC HOST:PORT of the server, loopback only (default 127.0.0.1:8001)")
    add("--model", required=True, help="model name")
    add("--model-version", default="", metavar="V", help="model version (default: the server's choice)")
    add("--mode", choices=MODES, default="closed", help="closed loop, or open loop with constant or Poisson arrivals")
    add("--concurrency", metavar="LIST", help="closed: in-flight requests per level, e.g. 1,8,32 (default 1,8,32)")
    add("--rate", metavar="LIST", help="constant/poisson: requests per second per level, e.g. 100,500 (required)")
    add("--duration", type=float, default=10.0, metavar="S", help="measured seconds per level (default 10)")
    add("--warmup", type=float, default=2.0, metavar="S", help="unrecorded seconds before each level (default 2)")
    add("--processes", type=int, default=1, metavar="N", help="worker processes sharing the load (default 1)")
    add("--payload", choices=("raw", "typed"), default="raw", help="raw_input_contents or typed contents")
    add("--batch-rows", type=int, default=1, metavar="N", help="rows in the batch dimension (default 1)")
    add("--input-data", choices=("random", "zeros"), default="random", help="input values (default random)")
    add("--timeout-ms", type=float, default=1000.0, metavar="MS", help="deadline per request (default 1000)")
    add(
        "--slo", action="append", default=[], metavar="EXPR",
        help="objective checked at every level, repeatable: p50/p90/p99/p999/max/mean<=TIME (us, ms, s), "
        "throughput>=N, errors<=P%% or errors<=N; exit status 1 if a level fails one",
    )  # fmt: skip
    add("--metrics-url", metavar="URL", help="server's Prometheus endpoint, e.g. http://127.0.0.1:8002/metrics")
    add("--out", type=Path, metavar="DIR", help="results folder (default bench/results/weir-bench-<label or time>)")
    add("--label", default="", help="names the run in the reports and the default results folder")
    add("--max-in-flight", type=int, default=4096, metavar="N", help="open loop: outstanding requests bound")
    add("--seed", type=int, default=0, help="seed for random inputs and Poisson arrivals (default 0)")


def _number_list(text: str, flag: str, kind: type[int] | type[float]) -> tuple[float, ...]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise UsageError(f"{flag}: expected a comma-separated list, got {text!r}")
    try:
        return tuple(float(kind(item)) for item in items)
    except ValueError:
        raise UsageError(f"{flag}: expected comma-separated {kind.__name__}s, got {text!r}") from None


def _check_range(flag: str, value: float, low: float, high: float, *, low_open: bool = False) -> None:
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise UsageError(f"{flag}: must be in {bracket}{low:g}, {high:g}], got {value:g}")


def default_out(label: str, now: float | None = None) -> Path:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-.") if label else ""
    return RESULTS_ROOT / f"weir-bench-{name or time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}"


def options_from(namespace: argparse.Namespace) -> BenchOptions:
    """Validate the parsed flags; raises UsageError."""
    try:
        target = grpc_target(namespace.url)
        metrics = metrics_url(namespace.metrics_url) if namespace.metrics_url else None
    except TargetError as error:
        raise UsageError(str(error)) from None
    if not namespace.model.strip():
        raise UsageError("--model: expected a model name, got an empty string")
    if namespace.mode == "closed":
        if namespace.rate is not None:
            raise UsageError("--rate applies to --mode constant or poisson; closed loop takes --concurrency")
        levels = _number_list(namespace.concurrency, "--concurrency", int) if namespace.concurrency else None
        levels = levels or tuple(float(item) for item in DEFAULT_CONCURRENCY)
        for level in levels:
            _check_range("--concurrency", level, 1, MAX_CONCURRENCY)
    else:
        if namespace.concurrency is not None:
            raise UsageError(f"--concurrency applies to --mode closed; --mode {namespace.mode} takes --rate")
        if namespace.rate is None:
            raise UsageError(f"--mode {namespace.mode} needs --rate (requests per second), e.g. --rate 100,500")
        levels = _number_list(namespace.rate, "--rate", float)
        for level in levels:
            _check_range("--rate", level, 0, MAX_RATE, low_open=True)
    _check_range("--duration", namespace.duration, 0, MAX_DURATION_S, low_open=True)
    _check_range("--warmup", namespace.warmup, 0, MAX_WARMUP_S)
    if namespace.mode != "closed" and max(levels) * (namespace.duration + namespace.warmup) > MAX_ARRIVALS_PER_LEVEL:
        raise UsageError(
            f"--rate {max(levels):g} over {namespace.warmup + namespace.duration:g} s is more than"
            f" {MAX_ARRIVALS_PER_LEVEL:,} requests per level; lower --rate or --duration"
        )
    _check_range("--processes", namespace.processes, 1, MAX_PROCESSES)
    _check_range("--batch-rows", namespace.batch_rows, 1, 1_000_000)
    _check_range("--timeout-ms", namespace.timeout_ms, 0, 3_600_000, low_open=True)
    _check_range("--max-in-flight", namespace.max_in_flight, 1, 1_000_000)
    _check_range("--seed", namespace.seed, 0, 2**32 - 1)
    if namespace.mode != "closed" and namespace.max_in_flight < namespace.processes:
        raise UsageError(f"--max-in-flight {namespace.max_in_flight} is below --processes {namespace.processes}")
    from weir.loadtest.slo import SloError, parse_slo  # standard library only

    for text in namespace.slo:
        try:
            parse_slo(text)
        except SloError as error:
            raise UsageError(str(error)) from None
    return BenchOptions(
        target=target,
        model=namespace.model.strip(),
        model_version=namespace.model_version.strip(),
        mode=namespace.mode,
        levels=levels,
        duration_s=namespace.duration,
        warmup_s=namespace.warmup,
        processes=namespace.processes,
        payload=namespace.payload,
        batch_rows=namespace.batch_rows,
        input_data=namespace.input_data,
        timeout_s=namespace.timeout_ms / 1000.0,
        slos=tuple(namespace.slo),
        metrics_url=metrics,
        out=namespace.out if namespace.out is not None else default_out(namespace.label),
        label=namespace.label,
        max_in_flight=namespace.max_in_flight,
        seed=namespace.seed,
    )
