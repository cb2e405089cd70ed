"""The drift monitor with several control-plane replicas on one database (``DriftMonitor.link_lease``).

Every replica takes the records of the data planes attached to it and hands its share of each window in
(``weir_control.monitoring.partials``: every ``HAND_IN_SECONDS`` while the window is open, and the rest
when it closes); the replica holding the singleton lease judges each window from every replica's
shares, once, in a transaction fenced by the lease, and takes the window's action (reserved in that
transaction, fired after it commits: at most once, never twice). Policies and references set through
any replica are re-read every ``REPLICA_REFRESH_SECONDS``; feedback labels any replica could not match
go through the database to the replica that remembers the request (``partials.LabelMailbox``).

What a handover loses: see ``weir_control.monitoring.partials`` (about a second of the dying replica's
records; ``bench/drift_handover.py``).
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from weir_control.monitoring import partials
from weir_control.monitoring.actions import DriftActions
from weir_control.monitoring.policy import check_policy_numbers, resolved_policy
from weir_control.monitoring.profiles import ReferenceProfile, WindowProfile
from weir_control.monitoring.state import (
    LABEL_HOLD_SECONDS,
    MAX_MONITORED_ENDPOINTS,
    WINDOW_GRACE_SECONDS,
    EndpointMonitor,
    OpenWindow,
    ddm_rank,
)
from weir_control.store import Store
from weir_proto.control.v1 import monitoring_pb2, registry_pb2
from weir_proto.errors import InvalidArgumentError, ResourceExhaustedError

log = logging.getLogger(__name__)

Severity = monitoring_pb2.Severity
DriftTrigger = registry_pb2.Lineage.DriftTrigger
REPLICA_REFRESH_SECONDS = 2.0  # policies and references set through another replica are re-read this often
# labels of a window closed here and not judged yet are handed in this long after its grace period, for the
# holder to merge; later, the window is judged (the labels update it in place), or no longer kept
LABELS_HAND_IN_SECONDS = 30.0


class ReplicatedWindows(DriftActions):
    """What ``DriftMonitor`` does differently once a lease is linked (a mix-in: the monitor's own state
    and methods are declared below for the type checker)."""

    _store: Store
    _lock: threading.RLock
    _endpoints: dict[str, EndpointMonitor]

    if TYPE_CHECKING:

        def _monitor(self, endpoint: str) -> EndpointMonitor: ...
        def _follow_serving(self, monitor: EndpointMonitor) -> None: ...
        def _hold(self, monitor: EndpointMonitor, request_id: str, actual: str, now: float) -> bool: ...
        def _count_label(
            self,
            monitor: EndpointMonitor,
            request_id: str,
            remembered: tuple[str, float, bool, str],
            actual: str,
            closed: dict[float, list[tuple[bool, str]]],
        ) -> None: ...
        def _update_closed(
            self, monitor: EndpointMonitor, closed: dict[float, list[tuple[bool, str]]], now: float
        ) -> None: ...
        def _relabel(
            self,
            monitor: EndpointMonitor,
            window: monitoring_pb2.DriftWindow,
            correct: int,
            labelled: int,
            states: list[str],
        ) -> int: ...
        def _score(
            self, monitor: EndpointMonitor, start: float, open_window: OpenWindow
        ) -> monitoring_pb2.DriftWindow: ...

    def _init_replicas(self) -> None:
        self._lease: Any = None  # one replica alone until link_lease
        self._replica = f"{socket.gethostname()}:{os.getpid()}"
        self._merge_delay = 0.0
        self._was_holder = False
        self._refreshed_at = -math.inf
        self._handed_in_at = -math.inf
        self.records_late = 0  # handed in after their window was judged (not counted)
        self._mailbox = partials.LabelMailbox()  # labels other replicas (and this one) could not match
        self._posted: dict[tuple[str, str], int] = {}  # (endpoint, request id) held, posted -> its row
        self._shared_labels = False  # labels go through the database (several replicas: not on SQLite)

    def link_lease(self, lease: Any) -> None:
        """The singleton lease (``weir_control.lease.LeaseKeeper``: ``held``, ``fence(connection)``) of
        a control plane that may run beside other replicas on one database."""
        with self._lock:
            self._lease = lease
            self._replica = str(getattr(lease, "holder", "") or self._replica)
            # SQLite is one replica's database: nobody else hands partials in, the holder need not wait
            self._merge_delay = 0.0 if self._store.engine.dialect.name == "sqlite" else partials.MERGE_DELAY_SECONDS
            self._shared_labels = self._merge_delay > 0

    def _holder(self) -> bool:
        return self._lease is None or bool(self._lease.held)

    def _replicated_tick(self, now: float) -> list[tuple[str, monitoring_pb2.DriftWindow]]:
        """With several replicas: what another replica changed (policies, references; the state a former
        holder left), and, on the holder, the windows only handed-in shares hold."""
        holder = bool(self._lease.held)
        gained = holder and not self._was_holder
        self._was_holder = holder
        if gained or time.monotonic() - self._refreshed_at >= REPLICA_REFRESH_SECONDS:
            self._refreshed_at = time.monotonic()
            self._refresh()  # first: every endpoint with a policy has its monitor before the state is read
        if gained:
            self._take_over()
        self._read_mailbox(now)
        self._checkpoint()
        if holder and self._shared_labels:
            with self._store.transaction() as connection:
                for endpoint, count in partials.expire_labels(connection, now - LABEL_HOLD_SECONDS).items():
                    if endpoint in self._endpoints:
                        self._endpoints[endpoint].labels_unmatched += count
        return self._judge_handed_in(now) if holder else []

    def _checkpoint(self) -> None:
        """Every replica (the holder too) hands in what its open windows took so far, every
        ``partials.HAND_IN_SECONDS``: a replica that dies loses about that much of its records rather
        than its whole open windows. Not on SQLite (one replica: nothing to lose to another)."""
        if not self._merge_delay or time.monotonic() - self._handed_in_at < partials.HAND_IN_SECONDS:
            return
        self._handed_in_at = time.monotonic()
        taken = [
            (monitor, start, window)
            for monitor in self._endpoints.values()
            for start, window in monitor.open.items()
            if window.profile.count or window.labels[1]
        ]
        if not taken:
            return
        try:
            with self._store.transaction():  # one transaction for all: the hand-ins below join it
                for monitor, start, window in taken:
                    self._hand_in(monitor, start, window)
        except Exception:  # the database failing: the windows keep their records, handed in later
            log.exception("drift windows not handed in (kept in memory)", extra={"replica": self._replica})
            return
        for monitor, start, window in taken:
            fresh = OpenWindow(WindowProfile(window.reference), window.reference, ddm_state=window.ddm_state)
            monitor.open[start] = fresh

    def _read_mailbox(self, now: float) -> None:
        """Labels posted by any replica: counted here if this replica remembers the request (claimed,
        so no other counts it), else held until its record comes here or the hold ends."""
        with self._store.transaction() as connection:
            posted = self._mailbox.read(connection) if self._shared_labels else []
        closed: dict[str, dict[float, list[tuple[bool, str]]]] = {}
        for label in posted:
            monitor = self._endpoints.get(label.endpoint)
            if monitor is None:
                continue
            if self._posted.get((label.endpoint, label.request_id)) == label.id:
                continue  # this replica's own, held since it came
            remembered = monitor.predictions.get(label.request_id)
            if remembered is None:
                if self._hold(monitor, label.request_id, label.label, now):
                    self._posted[label.endpoint, label.request_id] = label.id
                continue
            with self._store.transaction() as connection:
                if not partials.claim_label(connection, label.id) or remembered[2]:
                    continue  # another replica's, or labelled already (a resent label counts once)
            self._count_label(monitor, label.request_id, remembered, label.label, closed.setdefault(label.endpoint, {}))
        for endpoint, windows in closed.items():
            self._update_closed(self._endpoints[endpoint], windows, now)

    def _take_over(self) -> None:
        """This replica took the lease: the cool-down as the former holder left it (it is reserved in
        the judging transaction, so it is in the database before any action fired)."""
        for endpoint, state in self._store.monitoring_states().items():
            monitor = self._endpoints.get(endpoint)
            if monitor is not None:
                monitor.last_action_at = max(monitor.last_action_at, float(state.get("last_action_at", 0.0)))
        log.info("drift monitor: this replica judges the windows now", extra={"replica": self._replica})

    def _refresh(self) -> None:
        """Policies and references set through another replica."""
        for policy in self._store.monitoring_policies():
            try:
                check_policy_numbers(policy)
            except InvalidArgumentError:
                continue  # as _load: stored before the checks existed
            monitor = self._endpoints.get(policy.endpoint)
            if monitor is None:
                if len(self._endpoints) >= MAX_MONITORED_ENDPOINTS:
                    continue
                monitor = self._monitor(policy.endpoint)
            resolved = resolved_policy(policy)
            if resolved != monitor.policy:
                if resolved.window_seconds != monitor.policy.window_seconds:
                    monitor.open.clear()  # as set_policy: the next record opens a window of the new size
                monitor.policy = resolved
        for summary, profile in self._store.drift_references():
            monitor = self._endpoints.get(summary.endpoint)
            if monitor is None or monitor.reference_summary == summary:
                continue
            monitor.reference, monitor.reference_summary = ReferenceProfile.from_bytes(profile), summary
            monitor.reference_tried = ""
            monitor.open.clear()  # as set_reference: windows bin on the reference

    def _hand_in(self, monitor: EndpointMonitor, start: float, window: OpenWindow) -> None:
        """This replica's share of a closed window, for the lease holder to merge (see ``partials``)."""
        correct, labelled = window.labels
        share = partials.Partial(
            self._replica, window.profile.count, correct, labelled, window.ddm_state, window.profile.to_bytes()
        )
        due_at = start + monitor.policy.window_seconds + WINDOW_GRACE_SECONDS
        with self._store.transaction() as connection:
            partials.hand_in(connection, monitor.endpoint, start, due_at, share)

    def _judge(self, monitor: EndpointMonitor, start: float, now: float) -> monitoring_pb2.DriftWindow | None:
        """The lease holder's close of a window: its own share (if it has one) merged with every
        replica's handed-in share, judged, stored and its action reserved in one transaction fenced by
        the lease, so a window is judged once and acts once whoever holds the lease. None when it was
        judged already (late shares' records are dropped, their labels added to the stored window) or the
        lease is lost (this share is handed in)."""
        own = monitor.open.pop(start, None)
        relabelled: tuple[monitoring_pb2.DriftWindow, DriftTrigger | None] | None = None
        reference = own.reference if own is not None else monitor.reference
        # merged into a new window: on a failure this replica's own share is handed in as it was
        window = OpenWindow(WindowProfile(reference), reference)
        if own is not None:
            window.profile.merge(own.profile)
            window.labels, window.ddm_state = list(own.labels), own.ddm_state
        self._follow_serving(monitor)
        moment = monitoring_pb2.TimeRange()
        moment.start.FromNanoseconds(int(start * 1e9))  # as the window is stored
        try:
            with self._store.transaction() as connection:
                self._lease.fence(connection)
                shares = partials.take(connection, monitor.endpoint, start)
                if partials.judged(connection, monitor.endpoint, moment.start.ToDatetime(datetime.UTC)):
                    late = sum(records for _, records in partials.late_records(shares))
                    self.records_late += late + (own.profile.count if own is not None else 0)
                    relabelled = self._late_labels(monitor, moment, shares, now)
                    return None
                for share in shares:
                    window.profile.merge(WindowProfile.from_bytes(share.profile, reference))
                    window.labels[0] += share.correct
                    window.labels[1] += share.labelled
                    window.ddm_state = max(window.ddm_state, share.ddm_state, key=ddm_rank)
                report = self._score(monitor, start, window)
                profile = window.profile.to_bytes()
                self._store.append_drift_window(monitor.endpoint, report, profile, monitor.policy.max_windows)
                trigger = self._reserve(monitor, report, now) if report.severity == Severity.CRITICAL else None
                self._store.save_monitoring_state(monitor.endpoint, monitor.state())
        except Exception as error:  # the lease lost (or the database failing): the next holder judges it
            log.warning(
                "drift window not judged here: handed in for the lease holder",
                extra={"endpoint": monitor.endpoint, "start": start, "error": repr(error)},
            )
            relabelled = None  # rolled back: nothing fires
            if own is not None:
                self._hand_in(monitor, start, own)
            return None
        finally:
            if relabelled is not None:  # committed
                self._after_relabel(monitor, *relabelled, now)
        monitor.latest = report
        if trigger is not None:
            self._fire(monitor, report, trigger, now)
        return report

    def _late_labels(
        self, monitor: EndpointMonitor, moment: monitoring_pb2.TimeRange, shares: list[partials.Partial], now: float
    ) -> tuple[monitoring_pb2.DriftWindow, DriftTrigger | None] | None:
        """Labels handed in for a window judged already, added to the stored window by the holder alone
        (in the caller's fenced transaction); a window they make CRITICAL reserves its action there."""
        labelled = sum(share.labelled for share in shares)
        stored = (
            self._store.drift_window_at(monitor.endpoint, moment.start.ToDatetime(datetime.UTC)) if labelled else None
        )
        if stored is None:
            return None
        correct = sum(share.correct for share in shares)
        before = self._relabel(monitor, stored, correct, labelled, [share.ddm_state for share in shares])
        self._store.replace_drift_window(monitor.endpoint, stored)
        critical = stored.severity == Severity.CRITICAL and before != Severity.CRITICAL
        trigger = self._reserve(monitor, stored, now) if critical else None
        self._store.save_monitoring_state(monitor.endpoint, monitor.state())
        return stored, trigger

    def _after_relabel(
        self, monitor: EndpointMonitor, window: monitoring_pb2.DriftWindow, trigger: DriftTrigger | None, now: float
    ) -> None:
        if monitor.latest is not None and monitor.latest.start == window.start:
            monitor.latest = window
        if trigger is not None:
            self._fire(monitor, window, trigger, now)

    def _judge_handed_in(self, now: float) -> list[tuple[str, monitoring_pb2.DriftWindow]]:
        """The windows that only handed-in shares hold (this replica had no record of them, or it took
        the lease from a replica that died before judging them)."""
        with self._store.transaction() as connection:
            waiting = partials.due(connection, now - self._merge_delay)
        closed = []
        for endpoint, start in waiting:
            monitor = self._endpoints.get(endpoint)
            try:
                monitor = monitor or self._monitor(endpoint)
            except ResourceExhaustedError:
                continue
            if start in monitor.open:
                continue  # this replica's own window: judged with the shares when it is due here
            report = self._judge(monitor, start, now)
            if report is not None:
                closed.append((endpoint, report))
        return closed

    def _act_fenced(self, monitor: EndpointMonitor, report: monitoring_pb2.DriftWindow, now: float) -> None:
        """As ``_act`` on the lease holder: the cool-down reserved in a transaction fenced by the lease."""
        try:
            with self._store.transaction() as connection:
                self._lease.fence(connection)
                trigger = self._reserve(monitor, report, now)
                self._store.save_monitoring_state(monitor.endpoint, monitor.state())
        except Exception as error:
            log.warning(
                "drift action not taken: the lease is lost", extra={"endpoint": monitor.endpoint, "error": repr(error)}
            )
            return
        if trigger is not None:
            self._fire(monitor, report, trigger, now)
