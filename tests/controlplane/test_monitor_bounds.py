"""The drift monitor against hostile input, in-process on a real store: every policy number is finite
and ranged; a record batch never raises (an endpoint in trouble is counted, the others go on); records of
endpoints that are not deployed are refused; features, categories, names and monitored endpoints are
bounded and what is dropped is counted; feedback with NaN or infinite labels is refused; webhook
alerts go only where the allow-list lets them, record the status code only and follow no redirects."""

from __future__ import annotations

import http.server
import math
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from weir_control.monitoring import monitor as monitor_module
from weir_control.monitoring.monitor import MAX_CATEGORY_CHARS, DriftCollector, DriftMonitor
from weir_control.monitoring.profiles import MAX_FEATURES, MAX_WINDOW_CATEGORIES, OTHER
from weir_control.monitoring.webhook import WebhookAllowList, WebhookRefused, parse_allow_entry
from weir_control.store import open_store
from weir_proto.control.v1 import monitoring_pb2
from weir_proto.errors import InvalidArgumentError, ResourceExhaustedError

Policy = monitoring_pb2.MonitoringPolicy
Thresholds = monitoring_pb2.Thresholds


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class Links:
    """What the control plane links (``MonitoringLinks``): here, which endpoints are deployed."""

    def __init__(self, deployed: set[str]) -> None:
        self.deployed = deployed

    def deployed_endpoints(self) -> set[str]:
        return set(self.deployed)

    def submit_retraining(self, endpoint: str, policy: Policy, trigger: object) -> str:
        return "job"

    def reference_for_serving(self, endpoint: str) -> tuple[str, Path]:
        raise AssertionError("not used")

    def serving_accuracy(self, endpoint: str) -> float | None:
        return None


@pytest.fixture
def store(tmp_path: Path) -> Iterator[object]:
    opened = open_store(str(tmp_path / "control.db"))
    yield opened
    opened.close()


def make(  # type: ignore[no-untyped-def]
    store, tmp_path: Path, deployed: set[str] | None = None, allow: tuple[str, ...] = (), clock: Clock | None = None
) -> DriftMonitor:
    monitor = DriftMonitor(store, clock=clock or Clock(), reference_root=tmp_path, webhook_allow=allow)
    monitor.link(Links(deployed if deployed is not None else {"ep"}))
    return monitor


def batch(endpoint: str, count: int = 1, **values: float | str) -> monitoring_pb2.InferenceRecords:
    records = monitoring_pb2.InferenceRecords()
    for index in range(count):
        record = records.records.add(endpoint=endpoint, request_id=f"{endpoint}-{index}")
        for name, value in values.items():
            if isinstance(value, str):
                record.inputs.add(name=name, text=value)
            else:
                record.inputs.add(name=name, number=value)
    return records


@pytest.mark.parametrize(
    ("field", "policy"),
    [
        ("window_seconds", Policy(endpoint="ep", window_seconds=math.nan)),
        ("window_seconds", Policy(endpoint="ep", window_seconds=math.inf)),
        ("window_seconds", Policy(endpoint="ep", window_seconds=1e300)),
        ("window_seconds", Policy(endpoint="ep", window_seconds=-5)),
        ("cooldown_seconds", Policy(endpoint="ep", cooldown_seconds=math.nan)),
        ("cooldown_seconds", Policy(endpoint="ep", cooldown_seconds=-math.inf)),
        ("min_records", Policy(endpoint="ep", min_records=-1)),
        ("max_windows", Policy(endpoint="ep", max_windows=10**12)),
        (
            "thresholds\\['psi'\\]",
            Policy(endpoint="ep", thresholds={"psi": Thresholds(critical=math.nan)}),
        ),
        ("thresholds\\['ks'\\]", Policy(endpoint="ep", thresholds={"ks": Thresholds(critical=2.0)})),
        (
            "thresholds\\['jsd'\\]",
            Policy(endpoint="ep", thresholds={"jsd": Thresholds(warning=math.inf)}),
        ),
        ("endpoint", Policy(endpoint="e" * 300)),
    ],
)
def test_every_policy_number_is_finite_and_ranged(store, tmp_path: Path, field: str, policy: Policy) -> None:  # type: ignore[no-untyped-def]
    monitor = make(store, tmp_path)
    with pytest.raises(InvalidArgumentError, match=f"^{field}: expected"):
        monitor.set_policy(policy)
    assert monitor.policy("ep").window_seconds == 300  # nothing stored


def test_a_bad_stored_policy_or_an_endpoint_in_trouble_never_ends_a_batch(store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # a policy stored before the checks existed (NaN window) falls back to the defaults on load
    store.save_monitoring_policy(Policy(endpoint="ep", window_seconds=math.nan, retrain=True))
    monitor = make(store, tmp_path, deployed={"ep", "other"})
    assert monitor.policy("ep").window_seconds == 300 and not monitor.policy("ep").retrain
    monitor.ingest("replica", batch("ep", 3, x=1.0))
    # an endpoint whose state cannot take records (its window size corrupt): its records are counted as
    # errors, the other endpoint's records in the same batch are taken, and ingest does not raise
    monitor.set_policy(Policy(endpoint="other", window_seconds=60))
    monitor._endpoints["ep"].policy.window_seconds = math.nan  # the state finding 16 reached through the API
    monitor._endpoints["ep"].open.clear()
    mixed = batch("ep", 5, x=1.0)
    mixed.records.extend(batch("other", 4, x=2.0).records)
    monitor.ingest("replica", mixed)
    assert monitor.ingest_errors["ep"] == 5
    assert monitor.report("other").records_received == 4 and monitor.report("ep").records_received == 3
    metrics = {metric.name: metric for metric in DriftCollector(monitor).collect()}
    assert [(s.labels, s.value) for s in metrics["weir_monitoring_ingest_errors"].samples] == [({"endpoint": "ep"}, 5)]


def test_records_of_endpoints_not_deployed_are_refused_and_counted(store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    links = Links({"ep"})
    monitor = DriftMonitor(store, clock=Clock(), reference_root=tmp_path)
    monitor.link(links)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for round_number in range(20):
            invented = monitoring_pb2.InferenceRecords()
            for index in range(500):
                record = invented.records.add(endpoint=f"invented-{round_number}-{index}")
                for column in range(20):
                    record.inputs.add(name=f"f{column}", number=float(column))
            monitor.ingest("replica", invented)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert [name for name, _, _ in monitor.latest()] == []
    assert monitor.records_dropped["unknown_endpoint"] == 20 * 500
    assert grown < 1 << 20, grown  # 10,000 invented endpoints kept nothing (the finding: +105 MiB in 8 s)
    # a newly deployed endpoint is taken (the deployed set is read again when an unknown name arrives)
    links.deployed.add("new")
    monitor._deployed_read_at = -math.inf  # the once-a-second re-read, without waiting a second
    monitor.ingest("replica", batch("new", 2, x=1.0))
    assert monitor.report("new").records_received == 2
    # a read of an unknown endpoint's policy creates no monitor
    assert monitor.policy("ghost").window_seconds == 300
    assert [name for name, _, _ in monitor.latest()] == ["new"]


def test_monitored_endpoints_are_bounded(store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(monitor_module, "MAX_MONITORED_ENDPOINTS", 3)
    monitor = make(store, tmp_path, deployed={f"ep{index}" for index in range(10)})
    for index in range(2):
        monitor.set_policy(Policy(endpoint=f"ep{index}"))
    monitor.ingest("replica", batch("ep2", 1, x=1.0))
    monitor.ingest("replica", batch("ep3", 1, x=1.0))  # deployed, but the bound is reached
    assert monitor.records_dropped["endpoints_bound"] == 1
    with pytest.raises(ResourceExhaustedError, match="at most 3 endpoints"):
        monitor.set_policy(Policy(endpoint="ep4"))
    assert sorted(name for name, _, _ in monitor.latest()) == ["ep0", "ep1", "ep2"]


def test_features_categories_and_names_are_bounded_and_drops_counted(store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    monitor = make(store, tmp_path)
    wide = monitoring_pb2.InferenceRecords()
    record = wide.records.add(endpoint="ep", request_id="r" * 10_000)  # too long to remember for feedback
    for column in range(3 * MAX_FEATURES):
        record.inputs.add(name=f"x{column}", number=1.0)
    record.inputs.add(name="n" * 1000, number=1.0)
    monitor.ingest("replica", wide)
    for round_number in range(5):  # more invented names in later records: still bounded
        later = monitoring_pb2.InferenceRecords()
        row = later.records.add(endpoint="ep")
        for column in range(500):
            row.inputs.add(name=f"later-{round_number}-{column}", text="v")
        monitor.ingest("replica", later)
    (opened,) = monitor._endpoints["ep"].open.values()
    window = opened.profile
    assert len(window.numeric_names()) + len(window.categorical_names()) == MAX_FEATURES
    dropped = monitor.values_dropped["ep", "features"]
    assert dropped == 2 * MAX_FEATURES + 1 + 5 * 500
    assert not monitor._endpoints["ep"].predictions

    # categories: a long value is cut; new categories beyond the window's bound count as OTHER
    monitor = make(store, tmp_path, deployed={"cat"})
    many = monitoring_pb2.InferenceRecords()
    names = [f"c{index}" for index in range(200)]
    for index in range(MAX_WINDOW_CATEGORIES // 100):
        row = many.records.add(endpoint="cat")
        for name in names:
            row.inputs.add(name=name, text=f"{index}-" + "y" * 5000)
    monitor.ingest("replica", many)
    (opened,) = monitor._endpoints["cat"].open.values()
    window = opened.profile
    counts = [window.category_counts(name) for name in names]
    assert all(len(text) <= MAX_CATEGORY_CHARS for per_feature in counts for text in per_feature)
    admitted = sum(len([text for text in per_feature if text != OTHER]) for per_feature in counts)
    assert admitted == MAX_WINDOW_CATEGORIES and sum(per_feature.get(OTHER, 0) for per_feature in counts) > 0
    metrics = {metric.name: metric for metric in DriftCollector(make(store, tmp_path)).collect()}
    assert "weir_monitoring_values_dropped" in metrics and "weir_monitoring_records_refused" in metrics


def test_reference_windows_past_the_representable_times_are_refused(store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    monitor = make(store, tmp_path)
    request = monitoring_pb2.SetReferenceRequest(endpoint="ep")
    request.window.start.seconds, request.window.end.seconds = 0, 2**62
    with pytest.raises(InvalidArgumentError, match=r"^window\.end: expected a time between years 1 and 9999"):
        monitor.set_reference(request)
    with pytest.raises(InvalidArgumentError, match=r"^windows: expected 0"):
        monitor.report("ep", -1)


def test_feedback_with_nan_or_infinite_labels_is_refused(store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    monitor = make(store, tmp_path)
    records = monitoring_pb2.InferenceRecords()
    row = records.records.add(endpoint="ep", request_id="q")
    row.outputs.add(name="P[0]", number=0.9)
    row.outputs.add(name="P[1]", number=0.1)
    monitor.ingest("replica", records)
    for bad in (math.nan, math.inf, -math.inf):
        labels = monitoring_pb2.RecordFeedbackRequest(endpoint="ep")
        labels.labels.add(request_id="q", number=0)
        labels.labels.add(request_id="q", number=bad)
        with pytest.raises(InvalidArgumentError, match=r"^labels\[1\]\.number: expected a finite number"):
            monitor.feedback(labels)
    (opened,) = monitor._endpoints["ep"].open.values()
    assert opened.labels == [0, 0]  # nothing of a refused call was counted
    good = monitoring_pb2.RecordFeedbackRequest(endpoint="ep")
    good.labels.add(request_id="q", number=0)
    assert monitor.feedback(good).matched == 1


def predicted(request_ids: list[str]) -> monitoring_pb2.InferenceRecords:
    records = monitoring_pb2.InferenceRecords()
    for request_id in request_ids:
        row = records.records.add(endpoint="ep", request_id=request_id)
        row.outputs.add(name="P[0]", number=0.9)
        row.outputs.add(name="P[1]", number=0.1)
    return records


def test_labels_waiting_for_their_records_are_bounded_in_number_and_time(  # type: ignore[no-untyped-def]
    store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(monitor_module, "MAX_HELD_LABELS", 100)
    monkeypatch.setattr(monitor_module, "MAX_HELD_LABELS_TOTAL", 150)
    clock = Clock()
    monitor = make(store, tmp_path, deployed={"ep", "other", "third"}, clock=clock)
    monitor.ingest("replica", predicted(["seen"]))
    other = predicted(["other-seen"])
    other.records[0].endpoint = "other"
    monitor.ingest("replica", other)

    # a flood of labels for requests never sent: at most 100 held for the endpoint, the oldest give way
    flood = monitoring_pb2.RecordFeedbackRequest(endpoint="ep")
    for index in range(1000):
        flood.labels.add(request_id=f"never-{index}", number=0)
    answer = monitor.feedback(flood)
    assert (answer.matched, answer.held, answer.unmatched) == (0, 1000, 0)
    state = monitor._endpoints["ep"]
    assert len(state.held) == 100 and next(iter(state.held)) == "never-900"
    assert monitor.report("ep").labels_unmatched == 900 and monitor.report("ep").labels_held == 100
    # the bound over all endpoints (150): the other endpoint holds the 50 left, its own oldest give way
    flood.endpoint = "other"
    monitor.feedback(flood)
    assert len(monitor._endpoints["other"].held) == 50 and monitor._held_total == 150
    assert monitor.report("other").labels_unmatched == 950
    # an endpoint holding none while the bound is full: its labels are unmatched at once
    third = predicted(["third-seen"])
    third.records[0].endpoint = "third"
    monitor.ingest("replica", third)
    flood.endpoint = "third"
    answer = monitor.feedback(flood)
    assert (answer.held, answer.unmatched) == (0, 1000) and monitor._held_total == 150

    # a held label is matched when its record arrives; the others expire after the hold
    clock.now += monitor_module.LABEL_HOLD_SECONDS / 2
    monitor.ingest("replica", predicted(["never-950"]))
    (opened,) = state.open.values()
    assert "never-950" not in state.held and opened.labels == [1, 1]  # P[0] is the larger: class 0
    clock.now += monitor_module.LABEL_HOLD_SECONDS / 2
    monitor.tick()
    assert not state.held and monitor._held_total == 0
    report = monitor.report("ep")
    assert (report.labels_held, report.labels_unmatched) == (0, 999)
    families = {family.name: family for family in DriftCollector(monitor).collect()}
    unmatched = {
        sample.labels["endpoint"]: sample.value for sample in families["weir_monitoring_labels_unmatched"].samples
    }
    assert unmatched["ep"] == 999 and unmatched["other"] == 1000  # 950 pushed out, 50 expired


def test_remembered_predictions_are_bounded_over_all_endpoints(  # type: ignore[no-untyped-def]
    store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(monitor_module, "PREDICTIONS_REMEMBERED", 80)
    monkeypatch.setattr(monitor_module, "PREDICTIONS_REMEMBERED_TOTAL", 100)
    monkeypatch.setattr(monitor_module, "MIN_PREDICTIONS_REMEMBERED", 10)
    endpoints = [f"ep{index}" for index in range(4)]
    monitor = make(store, tmp_path, deployed={"ep", *endpoints})
    monitor.ingest("replica", predicted([f"first-{index}" for index in range(200)]))  # "ep": one endpoint so far
    assert len(monitor._endpoints["ep"].predictions) == 80  # its own bound
    for endpoint in endpoints:
        batch = predicted([f"{endpoint}-{index}" for index in range(200)])
        for record in batch.records:
            record.endpoint = endpoint
        monitor.ingest("replica", batch)
    monitor.tick()  # five endpoints: 20 each, the idle one trimmed too
    sizes = {name: len(state.predictions) for name, state in monitor._endpoints.items()}
    assert sizes == {"ep": 20, **dict.fromkeys(endpoints, 20)}, sizes
    assert next(iter(monitor._endpoints["ep0"].predictions)) == "ep0-180"  # the newest are kept


# --- webhooks ---------------------------------------------------------------------------------------


def test_the_allow_list_parses_entries_and_judges_urls() -> None:
    assert parse_allow_entry("hooks.example.com:8443").port == 8443
    assert parse_allow_entry("10.0.0.0/8").network is not None
    assert parse_allow_entry("[::1]:9000").port == 9000 and parse_allow_entry("::1").port is None
    for bad in ("http://x", "a:b", "10.0.0.0/99", "host:70000", "bad_name!"):
        with pytest.raises(InvalidArgumentError, match="--webhook-allow"):
            parse_allow_entry(bad)
    nothing = WebhookAllowList()
    with pytest.raises(InvalidArgumentError, match=r"^webhook_url: .*--webhook-allow.*allowed: none"):
        nothing.check_url("https://hooks.example.com/x")
    allow = WebhookAllowList(["hooks.example.com", "127.0.0.1:9000"])
    allow.check_url("https://HOOKS.example.com./alerts")
    allow.check_url("http://127.0.0.1:9000/")
    for refused in (
        "http://169.254.169.254/latest/meta-data/",
        "http://127.0.0.1:9001/",
        "http://localhost:9000/",
        "http://[::ffff:169.254.169.254]/",
        "http://hooks.example.com.evil.org/",
        "ftp://hooks.example.com/",
        "http://hooks.example.com:99999/",
    ):
        with pytest.raises(InvalidArgumentError, match=r"^webhook_url: "):
            allow.check_url(refused)
    # a listed name reaches public addresses only: resolving to loopback is refused at send time
    with pytest.raises(WebhookRefused, match="none of them allowed"):
        WebhookAllowList(["localhost"]).resolve("http://localhost:9000/")


class Receiver(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.server.posts += 1  # type: ignore[attr-defined]
        self.send_response(self.server.status)  # type: ignore[attr-defined]
        self.send_header("Location", self.server.location)  # type: ignore[attr-defined]
        body = b"secret-token-of-the-receiver"
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def receivers() -> Iterator[list[http.server.ThreadingHTTPServer]]:
    servers = []
    for status in (302, 418):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
        server.posts, server.status, server.location = 0, status, ""  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    servers[0].location = f"http://127.0.0.1:{servers[1].server_address[1]}/"  # type: ignore[attr-defined]
    yield servers
    for server in servers:
        server.shutdown()
        server.server_close()


def _critical_window(monitor: DriftMonitor, clock: Clock, tmp_path: Path, endpoint: str) -> None:
    """A reference, then a window of traffic shifted by five standard deviations: CRITICAL, so the
    endpoint's policy acts."""
    reference = tmp_path / f"{endpoint}.parquet"
    pq.write_table(pa.table({"x": np.random.default_rng(0).normal(size=2000)}), reference)
    monitor.set_reference(monitoring_pb2.SetReferenceRequest(endpoint=endpoint, parquet_path=reference.name))
    shifted = monitoring_pb2.InferenceRecords()
    for value in np.random.default_rng(1).normal(size=500) + 5.0:
        shifted.records.add(endpoint=endpoint).inputs.add(name="x", number=float(value))
    monitor.ingest("replica", shifted)
    clock.now += monitor.policy(endpoint).window_seconds + monitor_module.WINDOW_GRACE_SECONDS
    ((_, window),) = monitor.tick()
    assert window.severity == monitoring_pb2.Severity.CRITICAL


def _alert_detail(monitor: DriftMonitor, endpoint: str) -> str:
    """The recorded alert, once the sending thread has recorded it."""
    recorded = threading.Event()
    for _ in range(600):  # 30 s at most
        actions = [action for action in monitor.report(endpoint).actions if action.kind == "alert"]
        if actions:
            return actions[0].detail
        recorded.wait(0.05)
    raise AssertionError(f"no alert recorded for {endpoint}")


def test_alerts_record_the_status_only_and_follow_no_redirect(store, tmp_path: Path, receivers) -> None:  # type: ignore[no-untyped-def]
    redirecting, teapot = receivers
    allow = (f"127.0.0.1:{redirecting.server_address[1]}", f"127.0.0.1:{teapot.server_address[1]}")
    clock = Clock()
    monitor = make(store, tmp_path, deployed={"a", "b"}, allow=allow, clock=clock)
    for endpoint, server in (("a", redirecting), ("b", teapot)):
        url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        monitor.set_policy(Policy(endpoint=endpoint, window_seconds=60, min_records=100, webhook_url=url))
        _critical_window(monitor, clock, tmp_path, endpoint)
    assert _alert_detail(monitor, "a") == "HTTP 302 after 1 attempt(s)"
    detail = _alert_detail(monitor, "b")
    assert detail == "HTTP 418 after 1 attempt(s)"  # the receiver's answer ("secret-token...") is not kept
    assert redirecting.posts == 1 and teapot.posts == 1  # the redirect to the teapot was not followed


def test_a_destination_no_longer_allowed_is_not_sent_to(store, tmp_path: Path, receivers) -> None:  # type: ignore[no-untyped-def]
    _, teapot = receivers
    url = f"http://127.0.0.1:{teapot.server_address[1]}/hook"
    allowed = make(store, tmp_path, allow=(f"127.0.0.1:{teapot.server_address[1]}",))
    allowed.set_policy(Policy(endpoint="ep", window_seconds=60, min_records=100, webhook_url=url))
    # the control plane restarts without that destination: the stored policy's webhook is checked again
    # when the alert is due, and nothing is sent
    clock = Clock()
    restarted = make(store, tmp_path, allow=("hooks.example.com",), clock=clock)
    _critical_window(restarted, clock, tmp_path, "ep")
    assert _alert_detail(restarted, "ep") == "not sent: the destination is not allowed (weir control --webhook-allow)"
    assert teapot.posts == 0
