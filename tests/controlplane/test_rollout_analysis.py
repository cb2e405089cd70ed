"""weir_control.rollouts: interval deltas over replicas (restarts included), p99 interpolated within
histogram buckets, and the verdicts."""

from __future__ import annotations

import datetime
from collections.abc import Iterator

import pytest

from weir.metrics import LATENCY_BUCKETS_SECONDS
from weir_control.attach import DesiredStateHub, ReplicaStream
from weir_control.model_config import signature_from_config
from weir_control.rollout_analysis import (
    Look,
    VariantWindow,
    interval_totals,
    judge,
    judge_accuracy,
    labelled_in_interval,
    robust_verdict,
)
from weir_control.rollouts import Rollout, RolloutController, with_defaults
from weir_control.store import Store
from weir_control.store.store import create_store_engine
from weir_proto.common.v1 import types_pb2
from weir_proto.control.v1 import deployments_pb2, registry_pb2, rollouts_pb2

BOUNDS = [0.001, 0.01, 0.1]


def window(ok: int, failed: int, counts: list[int]) -> VariantWindow:
    return VariantWindow(ok, failed, counts, BOUNDS)


def look(windows: dict[tuple[str, str], VariantWindow], identities: dict[str, str] | None = None) -> Look:
    streams = {stream for stream, _ in windows}
    return Look(
        {(stream, variant, 1): value for (stream, variant), value in windows.items()},
        identities or dict.fromkeys(streams, "replicas"),
    )


def test_interval_totals_subtract_the_previous_look_per_stream() -> None:
    before = look({("r1", "canary"): window(10, 1, [5, 5, 1, 0]), ("r2", "canary"): window(50, 0, [50, 0, 0, 0])})
    now = look({("r1", "canary"): window(30, 2, [20, 10, 2, 0]), ("r2", "canary"): window(54, 0, [54, 0, 0, 0])})
    total = interval_totals(now, before)["replicas"]["canary"]
    assert (total.succeeded, total.failed) == (20 + 4, 1 + 0)
    assert total.counts == [15 + 4, 5, 1, 0]


def test_a_new_stream_counts_nothing_in_its_first_interval_and_a_new_variant_counts_from_zero() -> None:
    before = look({("r1", "primary"): window(10, 0, [10, 0, 0, 0])})
    now = look(
        {
            ("r1", "primary"): window(12, 0, [12, 0, 0, 0]),
            ("r1", "canary"): window(5, 0, [5, 0, 0, 0]),  # sent to r1 after the last look
            ("r9", "canary"): window(10**6, 0, [10**6, 0, 0, 0]),  # attached since: a starting point only
        }
    )
    totals = interval_totals(now, before)
    assert (totals["replicas"]["primary"].requests, totals["replicas"]["canary"].requests) == (2, 5)
    same = look({("r1", "primary"): window(12, 0, [12, 0, 0, 0])}, {"r1": "a", "r2": "b"})
    quiet = interval_totals(same, same)
    assert set(quiet) == {"a", "b"}  # r2 reported nothing: its identity still counts as attached


def test_one_identity_alone_does_not_decide_while_another_reports() -> None:
    thresholds = with_defaults(rollouts_pb2.AnalysisThresholds(min_requests=20))
    honest = {"canary": window(3, 0, [3, 0, 0, 0]), "primary": window(60, 0, [60, 0, 0, 0])}
    invented = {"canary": window(1000, 0, [1000, 0, 0, 0]), "primary": window(10, 0, [10, 0, 0, 0])}
    verdict, reason, _, _ = robust_verdict({"node": honest, "fake": invented}, "canary", "primary", thresholds)
    assert verdict == "INCONCLUSIVE" and "without those of 'fake'" in reason
    failing = {"canary": window(0, 1000, [1000, 0, 0, 0]), "primary": window(10, 0, [10, 0, 0, 0])}
    assert robust_verdict({"node": honest, "fake": failing}, "canary", "primary", thresholds)[0] == "INCONCLUSIVE"
    # one identity (one replica, or every replica on one token): its reports decide
    assert robust_verdict({"node": invented}, "canary", "primary", thresholds)[0] == "PASS"
    # an attached identity that served nothing disagrees with one that claims everything
    idle = {"canary": window(0, 0, [0, 0, 0, 0]), "primary": window(0, 0, [0, 0, 0, 0])}
    assert robust_verdict({"node": idle, "fake": invented}, "canary", "primary", thresholds)[0] == "INCONCLUSIVE"
    assert robust_verdict({"node": {}, "fake": invented}, "canary", "primary", thresholds)[0] == "INCONCLUSIVE"
    # two honest identities that agree: decided
    healthy = {"canary": window(40, 0, [40, 0, 0, 0]), "primary": window(40, 0, [40, 0, 0, 0])}
    assert robust_verdict({"a": healthy, "b": healthy}, "canary", "primary", thresholds)[0] == "PASS"


def test_p99_is_interpolated_within_the_bucket_holding_it() -> None:
    assert window(100, 0, [98, 1, 1, 0]).p99_ms() == pytest.approx(10.0)  # the 99th is the 10 ms bucket's last
    assert window(100, 0, [100, 0, 0, 0]).p99_ms() == pytest.approx(0.99)  # the first bucket starts at 0
    assert window(200, 0, [0, 100, 100, 0]).p99_ms() == pytest.approx(10 + 90 * 98 / 100)
    assert window(100, 0, [0, 0, 0, 100]).p99_ms() == pytest.approx(100.0)  # +Inf: the last bound
    assert window(0, 0, [0, 0, 0, 0]).p99_ms() == 0.0


def test_a_canary_alike_its_baseline_passes_with_their_p99_either_side_of_a_bucket_bound() -> None:
    """Issue 15 (the MLOps loop): the same latency, the 99th percentile near 10 ms, one variant's in
    the 5-10 ms bucket and the other's in the 10-25 ms one. The buckets' upper bounds read 10 and 25 ms
    (limit 10 x 1.5 + 5 = 20): a healthy canary was rolled back on noise."""
    bounds = list(LATENCY_BUCKETS_SECONDS)

    def latency(per_bucket: dict[float, int]) -> VariantWindow:
        counts = [per_bucket.get(bound, 0) for bound in bounds] + [0]
        return VariantWindow(sum(counts), 0, counts, bounds)

    thresholds = with_defaults(rollouts_pb2.AnalysisThresholds())
    baseline = latency({0.005: 500, 0.01: 491, 0.025: 9})
    canary = latency({0.005: 500, 0.01: 489, 0.025: 11})
    verdict, reason = judge(canary, baseline, thresholds)
    assert verdict == "PASS", reason
    assert canary.p99_ms() == pytest.approx(10 + 15 / 11) and baseline.p99_ms() == pytest.approx(5 + 5 * 490 / 491)
    # a canary really slower (5% of its requests above 10 ms): still a failure
    verdict, reason = judge(latency({0.005: 500, 0.01: 450, 0.025: 50}), baseline, thresholds)
    assert verdict == "FAIL" and "p99 22.0 ms vs baseline 10.0 ms" in reason
    # a baseline that served fewer than min_requests (at 100%: leftovers) is no latency reference
    verdict, reason = judge(latency({0.005: 500, 0.01: 450, 0.025: 50}), latency({0.001: 19}), thresholds)
    assert verdict == "PASS" and "not compared (the baseline served 19 requests, fewer than 20)" in reason


def test_labels_in_an_interval_are_the_difference_of_the_monitor_counters() -> None:
    before, now = Look(), Look()
    before.labelled = {"canary": (10, 20)}
    now.labelled = {"canary": (25, 50), "primary": (40, 40)}
    assert labelled_in_interval(now, before, "canary") == (15, 30)
    assert labelled_in_interval(now, before, "primary") == (40, 40)
    restarted = Look()
    restarted.labelled = {"canary": (3, 5)}  # the control plane restarted: its counters began again
    assert labelled_in_interval(restarted, now, "canary") == (3, 5)


def test_a_canary_answering_worse_on_its_labels_fails_even_with_no_errors() -> None:
    thresholds = with_defaults(rollouts_pb2.AnalysisThresholds())
    passed = "error rate 0.000 vs 0.000; p99 1.0 vs 1.0 ms"
    verdict, reason = judge_accuracy("PASS", passed, (60, 100), (90, 100), thresholds)
    assert verdict == "FAIL"
    assert reason == "accuracy 0.600 on 100 labels vs baseline 0.900 on 100 (allowed drop 0.05)"
    # within the allowed drop: the request verdict stands, with the figures
    verdict, reason = judge_accuracy("PASS", passed, (87, 100), (90, 100), thresholds)
    assert (verdict, reason) == ("PASS", f"{passed}; accuracy 0.870 on 100 labels vs baseline 0.900 on 100")
    # too few labels on either side: not judged, and said so
    verdict, reason = judge_accuracy("PASS", passed, (0, 29), (90, 100), thresholds)
    assert verdict == "PASS" and reason.endswith(
        "accuracy not judged (29 canary and 100 baseline labels, fewer than 30)"
    )
    # no labels at all: the request verdict as it was
    assert judge_accuracy("INCONCLUSIVE", "few", (0, 0), (0, 0), thresholds) == ("INCONCLUSIVE", "few")
    # a failure on errors keeps its reason; a worse accuracy also fails an interval with too few requests
    assert judge_accuracy("FAIL", "error rate", (90, 100), (90, 100), thresholds) == ("FAIL", "error rate")
    assert judge_accuracy("INCONCLUSIVE", "few", (10, 40), (40, 40), thresholds)[0] == "FAIL"
    # a rollout stored before the thresholds existed (zeros) is judged with the defaults
    assert judge_accuracy("PASS", passed, (60, 100), (90, 100), rollouts_pb2.AnalysisThresholds())[0] == "FAIL"


def test_verdicts() -> None:
    thresholds = with_defaults(rollouts_pb2.AnalysisThresholds(min_requests=10))
    healthy = window(100, 0, [100, 0, 0, 0])
    assert judge(window(5, 0, [5, 0, 0, 0]), healthy, thresholds)[0] == "INCONCLUSIVE"
    assert judge(window(100, 0, [100, 0, 0, 0]), healthy, thresholds)[0] == "PASS"
    verdict, reason = judge(window(90, 10, [100, 0, 0, 0]), healthy, thresholds)
    assert verdict == "FAIL" and "error rate 0.100" in reason
    verdict, reason = judge(window(100, 0, [0, 0, 100, 0]), healthy, thresholds)  # 100 ms vs 1 ms
    assert verdict == "FAIL" and "p99 99.1 ms" in reason
    assert judge(window(100, 0, [0, 100, 0, 0]), healthy, thresholds)[0] == "FAIL"  # 10 > 1*1.5 + 5
    assert judge(window(0, 0, [0, 0, 0, 0]), healthy, rollouts_pb2.AnalysisThresholds())[0] == "INCONCLUSIVE"


# --- progress: the controller with a real store, hub and attach streams --------------------------

CONFIG = """
max_batch_size: 8
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 2 ] } ]
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def controller(store_url: str) -> Iterator[tuple[RolloutController, DesiredStateHub, Store, Clock]]:
    store = Store(create_store_engine(store_url))
    store.create_model("m", "", {})
    for _ in range(2):
        header = registry_pb2.CreateModelVersionRequest.Header(
            model_name="m", config_pbtxt=CONFIG, artifact_filename="model.pt", artifact_sha256="ab" * 32
        )
        store.complete_version("m", store.begin_version(header, signature_from_config(CONFIG)), "ab" * 32, 123)
    store.deploy("web", [deployments_pb2.Variant(name="primary", model_name="m", version=1, weight=100)], "ci")
    hub, clock = DesiredStateHub(store), Clock()
    yield RolloutController(store, hub, clock=clock), hub, store, clock
    store.close()


async def attach(hub: DesiredStateHub, replica_id: str = "r1") -> ReplicaStream:
    replica = ReplicaStream(deployments_pb2.Hello(replica_id=replica_id, address="127.0.0.1:1"), "node")
    hub.register(replica)
    replica.sending(await hub.current())
    return replica


def canary_line(state: int, revision: int, message: str = "") -> deployments_pb2.ReplicaStatus:
    new = types_pb2.ModelVersionRef(model_name="m", version=2)
    line = deployments_pb2.EndpointStatus(endpoint="web", variant="canary", state=state, desired=new, message=message)
    if state == deployments_pb2.EndpointStatus.READY:
        line.serving.CopyFrom(new)
    return deployments_pb2.ReplicaStatus(applied_revision=revision, endpoints=[line])


async def test_a_load_failure_reported_on_an_older_desired_state_decides_nothing(controller) -> None:
    rollouts, hub, store, _ = controller
    replica = await attach(hub)
    started = await rollouts.start(
        rollouts_pb2.StartRolloutRequest(endpoint="web", model_name="m", version=2, steps=[20, 100]), "ci"
    )
    assert started.desired_revision == (await hub.current()).revision > 0
    replica.sending(await hub.current())
    # a FAILED line left from an earlier rollout of the same version (the replica has not applied this one yet)
    replica.report(canary_line(deployments_pb2.EndpointStatus.FAILED, started.desired_revision - 1, "old"))
    await rollouts.step_all()
    assert store.get_rollout("web").state == Rollout.RUNNING
    # reported on the rollout's desired state: rolled back at once, the baseline takes all traffic
    replica.report(canary_line(deployments_pb2.EndpointStatus.FAILED, started.desired_revision, "bad bytes"))
    await rollouts.step_all()
    ended = store.get_rollout("web")
    assert (ended.state, ended.reason) == (Rollout.ROLLED_BACK, "version 2 failed to load on replica r1: bad bytes")
    assert [(v.name, v.weight) for v in store.get_deployment("web").variants] == [("primary", 100)]


async def test_the_progress_deadline_stops_while_paused_and_is_met_once_ready_everywhere(controller) -> None:
    rollouts, hub, store, clock = controller
    request = rollouts_pb2.StartRolloutRequest(
        endpoint="web", model_name="m", version=2, steps=[20, 100], progress_deadline_seconds=10
    )
    started = await rollouts.start(request, "ci")
    assert started.progress_deadline_at.ToDatetime(datetime.UTC).timestamp() == clock.now + 10
    await rollouts.act("pause", "web", "ci")
    clock.now += 60  # paused: the deadline does not apply
    await rollouts.step_all()
    assert store.get_rollout("web").state == Rollout.PAUSED
    await rollouts.act("resume", "web", "ci")  # the clock starts again from the resume
    clock.now += 9
    await rollouts.step_all()
    assert store.get_rollout("web").state == Rollout.RUNNING
    # READY on every attached data plane: the deadline is met for good
    replica = await attach(hub)
    replica.report(canary_line(deployments_pb2.EndpointStatus.READY, started.desired_revision))
    await rollouts.step_all()
    ready = store.get_rollout("web")
    assert ready.canary_ready and not ready.HasField("progress_deadline_at")
    clock.now += 3600
    await rollouts.step_all()
    assert store.get_rollout("web").state == Rollout.RUNNING
