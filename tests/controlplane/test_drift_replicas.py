"""Drift monitoring with two control-plane replicas on one database (SQLite and PostgreSQL), in-process:
two DriftMonitors with their own stores and real LeaseKeepers, records split between them, a controlled
clock for the windows. The holder's window counts both replicas' records; the other replica judges
nothing; after a handover the next windows are judged once, by the new holder, and the retraining the
first holder fired is not fired again."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.controlplane.test_drift_monitor import Clock, records
from weir_control.lease import LeaseKeeper
from weir_control.monitoring.monitor import WINDOW_GRACE_SECONDS as GRACE
from weir_control.monitoring.monitor import DriftMonitor
from weir_control.monitoring.partials import MERGE_DELAY_SECONDS
from weir_control.store import Store, open_store
from weir_proto.control.v1 import monitoring_pb2
from weir_proto.errors import FailedPreconditionError

Severity = monitoring_pb2.Severity
WINDOW = 60.0
CLOSE = WINDOW + GRACE + MERGE_DELAY_SECONDS  # past a window's end: every replica hands in, the holder judges


class Links:
    def __init__(self, submitted: list[str]) -> None:
        self.submitted = submitted

    def submit_retraining(self, endpoint: str, policy: monitoring_pb2.MonitoringPolicy, trigger: object) -> str:
        self.submitted.append(endpoint)
        return f"job-{len(self.submitted)}"

    def reference_for_serving(self, endpoint: str) -> tuple[str, Path]:
        raise FailedPreconditionError("serving_lineage: not deployed here")

    def serving_accuracy(self, endpoint: str) -> float | None:
        return None


@pytest.fixture
def stores(store_url: str) -> Iterator[tuple[Store, Store]]:
    first, second = open_store(store_url), open_store(store_url)  # two replicas: two engines, one database
    yield first, second
    first.close()
    second.close()


def replica(
    store: Store, clock: Clock, root: Path, submitted: list[str], name: str
) -> tuple[DriftMonitor, LeaseKeeper]:
    keeper = LeaseKeeper(store, holder=name, ttl=600.0)  # held for the whole test, however slow the machine
    monitor = DriftMonitor(store, clock=clock, reference_root=root)
    monitor.link(Links(submitted))
    monitor.link_lease(keeper)
    return monitor, keeper


async def test_the_holder_judges_every_replicas_records_once_and_a_handover_acts_once(
    stores: tuple[Store, Store], tmp_path: Path
) -> None:
    clock, submitted = Clock(), []
    reference = tmp_path / "reference.parquet"
    data = np.random.default_rng(0).normal(size=(2000, 3))
    pq.write_table(pa.table({f"x{column}": data[:, column] for column in range(3)}), reference)
    a, keeper_a = replica(stores[0], clock, tmp_path, submitted, "replica-a")
    b, keeper_b = replica(stores[1], clock, tmp_path, submitted, "replica-b")
    assert await keeper_a.acquire_once() and not await keeper_b.acquire_once()
    # the policy through one replica, the reference through the other: each reads what the other set
    b.set_policy(
        monitoring_pb2.MonitoringPolicy(
            endpoint="ep", window_seconds=WINDOW, min_records=100, retrain=True, cooldown_seconds=3600
        )
    )
    a.set_reference(monitoring_pb2.SetReferenceRequest(endpoint="ep", parquet_path=str(reference)))
    assert a.tick() == [] and b.tick() == []
    assert a.policy("ep").retrain and b.report("ep").reference.rows == 2000

    rng = np.random.default_rng(1)
    clock.now = (clock.now // WINDOW + 1) * WINDOW  # a window's start: the records below share one window
    a.ingest("plane-1", records(rng.normal(size=(300, 3))))
    b.ingest("plane-2", records(rng.normal(size=(200, 3))))
    clock.now += CLOSE
    assert b.tick() == []  # not the holder: its share handed in
    ((_, window),) = a.tick()
    assert window.records == 500 and window.severity != Severity.CRITICAL  # (a WARNING is noise: KLL is randomised)

    shifted = rng.normal(size=(400, 3))
    shifted[:, 1] += 2.0
    a.ingest("plane-1", records(shifted[:150]))
    b.ingest("plane-2", records(shifted[150:]))
    clock.now += WINDOW
    assert b.tick() == []
    ((_, critical),) = a.tick()
    assert critical.records == 400 and critical.severity == Severity.CRITICAL and submitted == ["ep"]
    assert [w.records for w in b.report("ep").windows] == [500, 400]  # what the holder stored, from either

    # replica a stops: its share of the open window is lost (kept in its memory only); b takes over
    a.ingest("plane-1", records(shifted[:100]))
    b.ingest("plane-2", records(shifted[100:]))
    keeper_a._release()
    keeper_a._set(False)
    assert await keeper_b.acquire_once()
    clock.now += CLOSE
    ((_, after),) = b.tick()
    assert after.records == 300 and after.severity == Severity.CRITICAL
    assert submitted == ["ep"]  # within the cool-down the first holder reserved: no second retraining
    # the former holder, not holding any more, judges nothing: its share is handed in, found late
    assert a.tick() == []
    assert b.tick() == [] and b.records_late == 100
    report = b.report("ep")
    assert [w.records for w in report.windows] == [500, 400, 300]
    assert [action.kind for action in report.actions] == ["retrain"]


async def test_a_holder_that_lost_its_term_hands_its_window_in(stores: tuple[Store, Store], tmp_path: Path) -> None:
    """The fence: a replica that still believes it holds the lease, whose term the database no longer
    has, judges nothing; its records go to the holder's window."""
    clock, submitted = Clock(), []
    a, keeper_a = replica(stores[0], clock, tmp_path, submitted, "replica-a")
    b, keeper_b = replica(stores[1], clock, tmp_path, submitted, "replica-b")
    assert await keeper_a.acquire_once()
    b.set_policy(monitoring_pb2.MonitoringPolicy(endpoint="ep", window_seconds=WINDOW, min_records=10))
    assert a.tick() == []  # a reads the policy b stored
    clock.now = (clock.now // WINDOW + 1) * WINDOW
    a.ingest("plane-1", records(np.ones((30, 3))))
    b.ingest("plane-2", records(np.ones((20, 3))))
    keeper_a._release()  # the database ends a's term; a's belief lasts until its next renewal
    assert keeper_a.held and await keeper_b.acquire_once()
    clock.now += CLOSE
    assert a.tick() == []  # fenced: rolled back, its share handed in
    ((_, window),) = b.tick()
    assert window.records == 50
    assert [w.records for w in a.report("ep").windows] == [50]


def answered(first: int, count: int) -> monitoring_pb2.InferenceRecords:
    """Records whose prediction (the argmax of y) is class 1 for even request numbers, 0 for odd."""
    batch = monitoring_pb2.InferenceRecords()
    for number in range(first, first + count):
        record = batch.records.add(endpoint="ep", request_id=f"q{number}", variant="v1")
        record.inputs.add(name="x0", number=float(number % 7))
        record.outputs.add(name="y[0]", number=float(number % 2))
        record.outputs.add(name="y[1]", number=float(1 - number % 2))
    return batch


def feedback(first: int, count: int) -> monitoring_pb2.RecordFeedbackRequest:
    """Labels that agree with every prediction of ``answered``."""
    request = monitoring_pb2.RecordFeedbackRequest(endpoint="ep")
    for number in range(first, first + count):
        request.labels.add(request_id=f"q{number}", number=float(1 - number % 2))
    return request


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)  # SQLite: one replica, labels stay local
async def test_labels_count_once_on_the_replica_that_took_their_records(
    stores: tuple[Store, Store], tmp_path: Path
) -> None:
    """RecordFeedback reaches any replica: a label the receiving replica cannot match waits in the
    database; the replica that took the record claims and counts it (before or after its record came);
    the holder counts what nobody claimed within the hold period as unmatched, once."""
    clock, submitted = Clock(), []
    a, keeper_a = replica(stores[0], clock, tmp_path, submitted, "replica-a")
    b, _ = replica(stores[1], clock, tmp_path, submitted, "replica-b")
    assert await keeper_a.acquire_once()
    b.set_policy(monitoring_pb2.MonitoringPolicy(endpoint="ep", window_seconds=WINDOW, min_records=10))
    assert a.tick() == [] and b.tick() == []
    clock.now = (clock.now // WINDOW + 1) * WINDOW
    a.ingest("plane-1", answered(0, 100))
    a.ingest("plane-1", answered(300, 40))  # labelled after the window is judged
    b.ingest("plane-2", answered(100, 20))
    early = b.feedback(feedback(200, 30))  # their records come later, to a
    late = b.feedback(feedback(0, 100))  # their records are a's
    mine = b.feedback(feedback(100, 20))  # b's own records: counted at once
    nobody = a.feedback(feedback(900, 1))  # no replica takes this request's record
    assert (early.held, late.held, mine.matched, nobody.held) == (30, 100, 20, 1)
    for _ in range(2):  # each reads the mailbox: b holds a's labels, a claims them
        b.tick()
        a.tick()
    a.ingest("plane-1", answered(200, 30))  # the early labels' records: a claims the labels it held
    assert b.feedback(feedback(0, 100)).held == 100  # resent: b cannot tell; a claims them, counts none twice
    b.tick()
    a.tick()
    clock.now += CLOSE
    assert b.tick() == []
    ((_, window),) = a.tick()
    assert window.records == 190 and window.concept.labelled == 150 and window.concept.accuracy == 1.0
    # labels after the window was judged, through b: a claims them, the holder (a) adds them to the window
    wrong = feedback(300, 40)
    for label in wrong.labels:
        label.number = 1 - label.number
    assert b.feedback(wrong).held == 40
    for _ in range(2):
        b.tick()
        a.tick()
    (stored,) = [w for w in b.report("ep").windows if w.start == window.start]
    assert stored.concept.labelled == 190 and stored.concept.accuracy == 150 / 190, stored.concept
    clock.now += 30.0  # the hold period ends: the holder counts the one label nobody claimed
    b.tick()
    a.tick()
    assert a.report("ep").labels_unmatched == 1 and b.report("ep").labels_unmatched == 0
