"""The pure parts of `weir bench`: loopback checks, flag validation, SLO parsing and evaluation, the
percentile summary, the Prometheus budget diff, arrival schedules and request building."""

from __future__ import annotations

import argparse
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from weir.cli import build_parser
from weir.loadtest import prometheus, schedule, slo, summary
from weir.loadtest.options import BenchOptions, UsageError, default_out, options_from
from weir.loadtest.payload import InputSpec, PayloadError, build_request, concrete_shape, specs_from_metadata
from weir.loadtest.targets import TargetError, grpc_target, is_loopback_host, metrics_url

# --- targets --------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "127.255.3.4", "localhost", "LOCALHOST", "::1"])
def test_loopback_hosts_are_accepted(host: str) -> None:
    assert is_loopback_host(host)


@pytest.mark.parametrize("host", ["10.0.0.1", "0.0.0.0", "128.0.0.1", "::", "::ffff:127.0.0.1", "example.com", ""])
def test_other_hosts_are_refused(host: str) -> None:
    assert not is_loopback_host(host)


@pytest.mark.parametrize(
    ("url", "target"),
    [
        ("127.0.0.1:8001", "127.0.0.1:8001"),
        ("grpc://localhost:9000", "localhost:9000"),
        ("[::1]:8001", "[::1]:8001"),
    ],
)
def test_grpc_target_accepts_loopback(url: str, target: str) -> None:
    assert grpc_target(url) == target


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("10.1.2.3:8001", "not a loopback address"),
        ("localhost.evil.com:8001", "not a loopback address"),
        ("127.0.0.1", "expected HOST:PORT"),
        ("127.0.0.1:http", "port must be an integer"),
        ("127.0.0.1:70000", "port must be 1..65535"),
        ("::1:8001", "IPv6 address in brackets"),
        ("unix:///tmp/socket", "expected HOST:PORT"),
    ],
)
def test_grpc_target_refuses_with_a_reason(url: str, message: str) -> None:
    with pytest.raises(TargetError, match=message):
        grpc_target(url)


def test_metrics_url_must_be_http_on_loopback() -> None:
    assert metrics_url("http://127.0.0.1:8002/metrics") == "http://127.0.0.1:8002/metrics"
    assert metrics_url("http://[::1]:8002/metrics") == "http://[::1]:8002/metrics"
    for bad in ("http://192.168.1.2:8002/metrics", "http://127.0.0.1@evil.com/metrics", "ftp://127.0.0.1/m"):
        with pytest.raises(TargetError):
            metrics_url(bad)


# --- options --------------------------------------------------------------------------------------


def bench_options(*argv: str) -> BenchOptions:
    return options_from(build_parser().parse_args(["bench", "--model", "m", *argv]))


def test_closed_loop_defaults() -> None:
    options = bench_options()
    assert options.target == "127.0.0.1:8001"
    assert (options.mode, options.levels, options.level_key) == ("closed", (1.0, 8.0, 32.0), "concurrency")
    assert (options.duration_s, options.warmup_s, options.processes, options.timeout_s) == (10.0, 2.0, 1, 1.0)
    assert options.metrics_url is None
    assert options.out.parent == Path("bench/results") and options.out.name.startswith("weir-bench-")


def test_open_loop_takes_rates() -> None:
    options = bench_options("--mode", "poisson", "--rate", "100, 250.5", "--slo", "p99<=50ms", "--slo", "errors<=1%")
    assert (options.levels, options.level_key, options.slos) == ((100.0, 250.5), "rate", ("p99<=50ms", "errors<=1%"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--url", "192.0.2.1:8001"], "not a loopback address"),
        (["--metrics-url", "http://example.com/metrics"], "not a loopback address"),
        (["--mode", "constant"], "needs --rate"),
        (["--rate", "100"], "--rate applies to --mode constant or poisson"),
        (["--mode", "poisson", "--rate", "5", "--concurrency", "2"], "--concurrency applies to --mode closed"),
        (["--concurrency", "1,x"], "expected comma-separated ints"),
        (["--concurrency", "0"], r"--concurrency: must be in \[1, 4096\], got 0"),
        (["--mode", "constant", "--rate", "0"], r"--rate: must be in \(0,"),
        (["--mode", "constant", "--rate", "100000", "--duration", "200"], "more than 10,000,000 requests per level"),
        (["--duration", "0"], "--duration"),
        (["--duration", "601"], "--duration"),
        (["--processes", "0"], "--processes"),
        (["--timeout-ms", "0"], "--timeout-ms"),
        (["--seed", "-1"], "--seed"),
        (["--slo", "p99<=5"], "a latency needs a unit"),
        (["--mode", "poisson", "--rate", "5", "--processes", "4", "--max-in-flight", "2"], "below --processes"),
    ],
)
def test_bad_flags_are_usage_errors_naming_the_flag(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        bench_options(*argv)


def test_default_out_uses_a_safe_label_or_the_time() -> None:
    assert default_out("my run/../x") == Path("bench/results/weir-bench-my-run-..-x")
    assert default_out("", now=0).name.startswith("weir-bench-19")


def test_weir_serve_start_up_does_not_import_the_bench() -> None:
    code = (
        "import sys; from weir.cli import build_parser; build_parser().parse_args(['serve']);"
        "heavy = [m for m in ('matplotlib', 'tritonclient', 'weir.loadtest.runner', 'weir.loadtest.worker')"
        " if m in sys.modules]; print(heavy)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"


# --- SLOs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "metric", "comparison", "threshold"),
    [
        ("p99<=50ms", "p99", "<=", 50.0),
        ("p50 < 800us", "p50", "<", 0.8),
        ("p90<=2µs", "p90", "<=", 0.002),
        ("p999<=1.5s", "p999", "<=", 1500.0),
        ("max<1e2ms", "max", "<", 100.0),
        ("throughput>=500", "throughput", ">=", 500.0),
        ("throughput>1200rps", "throughput", ">", 1200.0),
        ("errors<=0.1%", "error_rate", "<=", 0.001),
        ("errors<=0", "error_count", "<=", 0.0),
        ("P99<=50MS", "p99", "<=", 50.0),
    ],
)
def test_slo_parsing(text: str, metric: str, comparison: str, threshold: float) -> None:
    parsed = slo.parse_slo(text)
    assert (parsed.text, parsed.metric, parsed.comparison) == (text, metric, comparison)
    assert parsed.threshold == pytest.approx(threshold)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("p99=50ms", "expected METRIC OP VALUE"),
        ("p99<=fast", "expected METRIC OP VALUE"),
        ("p75<=5ms", "unknown metric 'p75'"),
        ("p99<=50", "a latency needs a unit"),
        ("p99<=50min", "a latency needs a unit"),
        ("throughput>=5ms", "requests per second"),
        ("errors<=5ms", "a rate with % or a plain count"),
    ],
)
def test_slo_parse_errors_name_the_text(text: str, message: str) -> None:
    with pytest.raises(slo.SloError, match=message):
        slo.parse_slo(text)


def make_level(latencies_ms: list[float], errors: dict[str, int] | None = None, dropped: int = 0) -> dict:
    values = np.asarray([round(value * 1e6) for value in latencies_ms], dtype=np.int64)
    return summary.level_summary(values, errors or {}, dropped, elapsed_s=2.0)


def test_slo_evaluation_against_a_level() -> None:
    level = make_level([1.0] * 98 + [40.0, 60.0], errors={"UNAVAILABLE": 1})
    slos = [slo.parse_slo(text) for text in ("p50<=1ms", "p99<=40ms", "throughput>=50", "errors<=1%", "errors<1")]
    outcomes = {outcome.slo: outcome for outcome in slo.evaluate(slos, level)}
    assert outcomes["p50<=1ms"].passed
    assert not outcomes["p99<=40ms"].passed and outcomes["p99<=40ms"].observed == pytest.approx(40.2)
    assert outcomes["throughput>=50"].passed and outcomes["throughput>=50"].observed == 50.0
    assert outcomes["errors<=1%"].passed and outcomes["errors<=1%"].observed == pytest.approx(1 / 101)
    assert not outcomes["errors<1"].passed
    assert outcomes["p50<=1ms"].as_dict() == {"slo": "p50<=1ms", "observed": 1.0, "passed": True}


def test_a_latency_slo_fails_when_nothing_succeeded() -> None:
    level = make_level([], errors={"UNAVAILABLE": 3})
    (outcome,) = slo.evaluate([slo.parse_slo("p99<=1s")], level)
    assert (outcome.observed, outcome.passed) == (None, False)


# --- summary --------------------------------------------------------------------------------------


def test_level_summary_percentiles_counts_and_throughput() -> None:
    level = make_level([float(value) for value in range(1, 1001)], errors={"DEADLINE_EXCEEDED": 3}, dropped=7)
    assert (level["requests"], level["succeeded"], level["failed"], level["dropped"]) == (1010, 1000, 10, 7)
    assert level["error_rate"] == pytest.approx(10 / 1010)
    assert level["throughput_rps"] == 500.0
    latency = level["latency_ms"]
    assert latency["p50"] == pytest.approx(500.5)
    assert latency["p90"] == pytest.approx(900.1)
    assert latency["p99"] == pytest.approx(990.01)
    assert latency["p999"] == pytest.approx(999.001)
    assert (latency["max"], latency["min"], latency["mean"]) == (1000.0, 1.0, pytest.approx(500.5))


def test_empty_level_summary() -> None:
    level = summary.level_summary(np.empty(0, dtype=np.int64), {}, 0, elapsed_s=1.0)
    assert (level["requests"], level["error_rate"], level["throughput_rps"]) == (0, 0.0, 0.0)
    assert set(level["latency_ms"].values()) == {None}


def test_merge_counts() -> None:
    assert summary.merge_counts([{"B": 1, "A": 2}, {}, {"A": 3}]) == {"A": 5, "B": 1}


# --- Prometheus budget ----------------------------------------------------------------------------


def prometheus_text(scale: float, other_model: bool = True) -> str:
    lines = [
        "# HELP weir_inference_request_duration_seconds End-to-end server-side request latency.",
        "# TYPE weir_inference_request_duration_seconds histogram",
        f'weir_inference_request_duration_seconds_bucket{{le="+Inf",model="m",version="1"}} {100 * scale}',
        f'weir_inference_request_duration_seconds_count{{model="m",version="1"}} {100 * scale}',
        f'weir_inference_request_duration_seconds_sum{{model="m",version="1"}} {0.2 * scale}',
        f'weir_inference_request_duration_seconds_count{{model="m",version="2"}} {10 * scale}',
        f'weir_inference_request_duration_seconds_sum{{model="m",version="2"}} {0.02 * scale}',
        "# HELP weir_inference_stage_duration_seconds Latency of each stage of a request.",
        "# TYPE weir_inference_stage_duration_seconds histogram",
    ]
    for stage, seconds in (("decode", 0.01), ("queue", 0.03), ("infer", 0.12), ("encode", 0.01)):
        lines += [
            f'weir_inference_stage_duration_seconds_count{{model="m",stage="{stage}",version="1"}} {100 * scale}',
            f'weir_inference_stage_duration_seconds_sum{{model="m",stage="{stage}",version="1"}} {seconds * scale}',
        ]
    if other_model:
        lines += [
            f'weir_inference_request_duration_seconds_count{{model="other",version="1"}} {1000 * scale}',
            f'weir_inference_request_duration_seconds_sum{{model="other",version="1"}} {99 * scale}',
        ]
    lines += ["# TYPE process_cpu_seconds_total counter", "process_cpu_seconds_total 12.5"]
    return "\n".join(lines) + "\n"


def test_latency_totals_sum_versions_of_one_model() -> None:
    totals = prometheus.latency_totals(prometheus_text(1.0), "m")
    assert totals["end_to_end"] == prometheus.Totals(pytest.approx(0.22), 110.0)
    assert totals["infer"] == prometheus.Totals(pytest.approx(0.12), 100.0)
    only_v2 = prometheus.latency_totals(prometheus_text(1.0), "m", version="2")
    assert set(only_v2) == {"end_to_end"}


def test_stage_budget_is_the_difference_between_scrapes() -> None:
    before = prometheus.latency_totals(prometheus_text(1.0), "m", "1")
    after = prometheus.latency_totals(prometheus_text(3.0), "m", "1")
    budget = prometheus.stage_budget(before, after)
    assert budget is not None
    assert budget["end_to_end"] == {"mean_ms": pytest.approx(2.0), "count": 200}
    assert budget["stages"]["infer"] == {"mean_ms": pytest.approx(1.2), "count": 200, "share": pytest.approx(0.6)}
    assert budget["stages"]["queue"]["mean_ms"] == pytest.approx(0.3)
    assert budget["unaccounted_ms"] == pytest.approx(2.0 - 0.1 - 0.3 - 1.2 - 0.1)


def test_stage_budget_from_first_scrape_without_a_before() -> None:
    budget = prometheus.stage_budget({}, prometheus.latency_totals(prometheus_text(1.0), "m", "1"))
    assert budget is not None and budget["end_to_end"]["count"] == 100


def test_stage_budget_is_skipped_for_servers_without_weir_metrics_or_without_traffic() -> None:
    triton_text = '# TYPE nv_inference_count counter\nnv_inference_count{model="m",version="1"} 5\n'
    assert prometheus.latency_totals(triton_text, "m") == {}
    assert prometheus.stage_budget({}, {}) is None
    same = prometheus.latency_totals(prometheus_text(1.0), "m")
    assert prometheus.stage_budget(same, same) is None


# --- schedules ------------------------------------------------------------------------------------


def test_constant_arrivals_are_evenly_spaced_and_interleave_across_workers() -> None:
    single = schedule.arrival_offsets("constant", 100.0, 1.0)
    assert single.size == 100
    assert np.allclose(np.diff(single), 0.01) and single[0] == 0.0
    workers = [schedule.arrival_offsets("constant", 50.0, 1.0, phase_s=index / 100.0) for index in range(2)]
    merged = np.sort(np.concatenate(workers))
    assert merged.size == 100 and np.allclose(np.diff(merged), 0.01)
    assert (schedule.arrival_offsets("constant", 3.0, 1.0) < 1.0).all()


def test_poisson_arrivals_are_seeded_sorted_bounded_and_at_the_rate() -> None:
    first = schedule.arrival_offsets("poisson", 2000.0, 5.0, seed=7)
    again = schedule.arrival_offsets("poisson", 2000.0, 5.0, seed=7)
    other = schedule.arrival_offsets("poisson", 2000.0, 5.0, seed=8)
    assert np.array_equal(first, again) and not np.array_equal(first[:100], other[:100])
    assert (np.diff(first) >= 0).all() and first[0] >= 0 and first[-1] < 5.0
    assert abs(first.size - 10_000) < 5 * np.sqrt(10_000)
    gaps = np.diff(first)
    assert gaps.mean() == pytest.approx(1 / 2000, rel=0.05)
    assert gaps.std() == pytest.approx(gaps.mean(), rel=0.1)  # exponential: standard deviation = mean


def test_poisson_at_a_tiny_rate_tops_up_and_zero_rate_is_empty() -> None:
    offsets = schedule.arrival_offsets("poisson", 0.5, 600.0, seed=1)
    assert 200 < offsets.size < 400 and offsets[-1] < 600.0
    assert schedule.arrival_offsets("poisson", 0.0, 10.0).size == 0


def test_unknown_arrival_kind() -> None:
    with pytest.raises(ValueError, match="arrival kind"):
        schedule.arrival_offsets("bursty", 1.0, 1.0)


def test_split_evenly_and_worker_seeds() -> None:
    assert schedule.split_evenly(8, 3) == [3, 3, 2]
    assert schedule.split_evenly(1, 2) == [1, 0]
    seeds = {schedule.worker_seed(0, stream, worker) for stream in range(3) for worker in range(3)}
    assert len(seeds) == 9 and schedule.worker_seed(0, 1, 1) == schedule.worker_seed(0, 1, 1)


# --- requests -------------------------------------------------------------------------------------


def metadata_inputs(*items: tuple[str, str, list[int]]) -> list[argparse.Namespace]:
    return [argparse.Namespace(name=name, datatype=datatype, shape=shape) for name, datatype, shape in items]


def parse(body: bytes) -> service_pb2.ModelInferRequest:
    return service_pb2.ModelInferRequest.FromString(body)


def test_shapes_from_metadata_and_config() -> None:
    spec = InputSpec("x", "FP32", (-1, 256))
    assert concrete_shape(spec, 4, max_batch_size=64) == (4, 256)
    assert concrete_shape(spec, 4, max_batch_size=None) == (4, 256)  # no config: a leading -1 is the batch
    assert concrete_shape(spec, 4, max_batch_size=0) == (1, 256)  # no batch dimension: every -1 is 1
    assert concrete_shape(InputSpec("y", "FP32", (-1, -1, 3)), 2, max_batch_size=8) == (2, 1, 3)
    assert concrete_shape(InputSpec("z", "FP32", (3, -1)), 2, max_batch_size=None) == (3, 1)


def test_raw_request_carries_every_input_in_raw_contents() -> None:
    specs = specs_from_metadata(
        metadata_inputs(("F", "FP32", [-1, 3]), ("I", "INT64", [-1, 2]), ("T", "BYTES", [-1, 1]), ("B", "BOOL", [2]))
    )
    planned = build_request("m", "2", specs, max_batch_size=8, batch_rows=2)
    request = parse(planned.body)
    assert (request.model_name, request.model_version, planned.payload) == ("m", "2", "raw")
    assert [(item.name, item.datatype, list(item.shape)) for item in request.inputs] == [
        ("F", "FP32", [2, 3]), ("I", "INT64", [2, 2]), ("T", "BYTES", [2, 1]), ("B", "BOOL", [2]),
    ]  # fmt: skip
    assert planned.shapes == {"F": [2, 3], "I": [2, 2], "T": [2, 1], "B": [2]}
    floats = np.frombuffer(request.raw_input_contents[0], dtype="<f4")
    assert floats.size == 6 and ((floats >= 0) & (floats < 1)).all()
    integers = np.frombuffer(request.raw_input_contents[1], dtype="<i8")
    assert integers.size == 4 and ((integers >= 0) & (integers < 16)).all()
    raw_text = request.raw_input_contents[2]
    elements = []
    while raw_text:
        (length,) = struct.unpack("<I", raw_text[:4])
        elements.append(raw_text[4 : 4 + length])
        raw_text = raw_text[4 + length :]
    assert len(elements) == 2 and all(1 <= len(item) <= 16 for item in elements)
    assert all(item.decode("ascii").replace(" ", "").isalpha() or item.strip() == b"" for item in elements)
    assert len(request.raw_input_contents[3]) == 2
    assert not any(item.HasField("contents") for item in request.inputs)
    assert not request.outputs  # every output


def test_typed_request_fills_contents() -> None:
    specs = specs_from_metadata(
        metadata_inputs(("F", "FP32", [-1, 3]), ("U", "UINT16", [2]), ("T", "BYTES", [1]), ("B", "BOOL", [1]))
    )
    planned = build_request("m", "", specs, max_batch_size=4, payload="typed", input_data="zeros")
    request = parse(planned.body)
    assert planned.payload == "typed" and not request.raw_input_contents
    assert list(request.inputs[0].contents.fp32_contents) == [0.0, 0.0, 0.0]
    assert list(request.inputs[1].contents.uint_contents) == [0, 0]
    assert list(request.inputs[2].contents.bytes_contents) == [b""]
    assert list(request.inputs[3].contents.bool_contents) == [False]


def test_typed_request_with_fp16_or_bf16_goes_raw_as_a_whole() -> None:
    specs = specs_from_metadata(metadata_inputs(("H", "FP16", [4]), ("F", "FP32", [2]), ("Z", "BF16", [3])))
    planned = build_request("m", "", specs, max_batch_size=0, payload="typed")
    request = parse(planned.body)
    assert planned.payload == "raw"
    assert [len(item) for item in request.raw_input_contents] == [8, 8, 6]
    bf16 = np.frombuffer(request.raw_input_contents[2], dtype="<u2").astype(np.uint32) << 16
    assert ((bf16.view(np.float32) >= 0) & (bf16.view(np.float32) < 1)).all()


def test_requests_are_reproducible_per_seed() -> None:
    specs = [InputSpec("x", "FP32", (-1, 8))]
    first = build_request("m", "", specs, max_batch_size=4, seed=3).body
    assert first == build_request("m", "", specs, max_batch_size=4, seed=3).body
    assert first != build_request("m", "", specs, max_batch_size=4, seed=4).body


def test_request_building_errors() -> None:
    specs = [InputSpec("x", "FP32", (-1, 8))]
    with pytest.raises(PayloadError, match="--batch-rows 9 exceeds the model's max_batch_size 8"):
        build_request("m", "", specs, max_batch_size=8, batch_rows=9)
    with pytest.raises(PayloadError, match="unsupported datatype 'COMPLEX64'"):
        specs_from_metadata(metadata_inputs(("c", "COMPLEX64", [1])))
    with pytest.raises(PayloadError, match="no inputs"):
        specs_from_metadata([])
