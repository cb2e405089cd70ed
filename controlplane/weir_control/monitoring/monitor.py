"""The drift monitor: inference records from the data planes go into each endpoint's tumbling windows,
by their request's time (a window closes a grace period after its end, for records shipped late); a
closed window is scored against the endpoint's reference (per feature PSI, KS, Jensen-Shannon,
Wasserstein, chi-square; prediction drift on outputs; concept drift from feedback labels), stored with
its mergeable profile, exported as gauges, and may trigger the endpoint's actions (a webhook alert,
a retraining job) at most once per cool-down.

All methods are blocking and guarded by one lock; the gRPC side calls them in worker threads.

Records become features as follows: numeric inputs and outputs are numeric features (the data plane
names them ``X[i]``, ``X.mean``... or by their feature-service names); text values are categorical;
an output with several elements also yields the categorical ``<output>.argmax`` (the predicted class),
which prediction drift and concept drift use.
"""

from __future__ import annotations

import collections
import datetime
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from weir_control.monitoring import partials, statistics
from weir_control.monitoring.collector import DriftCollector as DriftCollector  # where the server imports it
from weir_control.monitoring.policy import (
    check_endpoint,
    check_policy,
    check_policy_numbers,
    resolved_policy,
)
from weir_control.monitoring.profiles import MAX_FEATURES, ReferenceProfile, WindowProfile
from weir_control.monitoring.references import DriftReferences
from weir_control.monitoring.replicated import LABELS_HAND_IN_SECONDS, ReplicatedWindows
from weir_control.monitoring.state import (
    LABEL_HOLD_SECONDS,
    MAX_CATEGORY_CHARS,
    MAX_MONITORED_ENDPOINTS,
    WINDOW_GRACE_SECONDS,
    EndpointMonitor,
    OpenWindow,
    ddm_rank,
    restart_concept,
)
from weir_control.monitoring.webhook import WebhookAllowList
from weir_control.store import Store
from weir_proto.control.v1 import monitoring_pb2, registry_pb2
from weir_proto.errors import (
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    WeirError,
)

log = logging.getLogger(__name__)

Severity = monitoring_pb2.Severity
DriftTrigger = registry_pb2.Lineage.DriftTrigger
ARGMAX = ".argmax"
PREDICTIONS_REMEMBERED = 200_000  # request id -> predicted class and window, for feedback labels (per endpoint)
# ... and over all endpoints: each endpoint keeps an equal share (at least MIN_PREDICTIONS_REMEMBERED)
PREDICTIONS_REMEMBERED_TOTAL = 1_000_000
MIN_PREDICTIONS_REMEMBERED = 1_000
MAX_CLOCK_AHEAD_SECONDS = 2.0  # see WINDOW_GRACE_SECONDS (weir_control.monitoring.state)
# A label may reach the control plane before its request's record (data planes send records about twice a
# second): it is held LABEL_HOLD_SECONDS (weir_control.monitoring.state) within these bounds, then counted unmatched.
MAX_HELD_LABELS = 10_000  # per endpoint; beyond, the oldest held label is counted unmatched
MAX_HELD_LABELS_TOTAL = 100_000  # over all endpoints
REFERENCE_ACCURACY_LABELS = 200  # without a registered accuracy, the first labels set the reference
# What data planes send is bounded here, whoever sends it (a replica's rate is bounded where it attaches):
MAX_NAME_CHARS = 256  # a feature name; longer names' values are dropped
MAX_REQUEST_ID_CHARS = 256  # longer request ids are not remembered for feedback
MAX_OUTCOME_VARIANTS = 64  # variants per endpoint whose labelled outcomes are counted (an endpoint has <= 16)
MAX_FEEDBACK_LABELS = 100_000  # labels in one RecordFeedback
DEPLOYED_REFRESH_SECONDS = 1.0  # an unknown endpoint's records re-read the deployed endpoints at most this often
ERROR_LOG_SECONDS = 60.0  # an endpoint's ingest errors are logged at most once per this long


class DriftMonitor(ReplicatedWindows, DriftReferences):  # and DriftActions, through ReplicatedWindows
    def __init__(
        self,
        store: Store,
        submit_retraining: Callable[[str, monitoring_pb2.MonitoringPolicy, DriftTrigger], str] | None = None,
        reference_for_serving: Callable[[str], tuple[str, Path]] | None = None,
        serving_accuracy: Callable[[str], float | None] | None = None,
        clock: Callable[[], float] = time.time,
        *,
        reference_root: Path | None = None,
        webhook_allow: Iterable[str] = (),
    ) -> None:
        """``reference_root``: the only directory Parquet references are read from (the control plane's
        feature root; none: parquet_path is refused). ``webhook_allow``: the operator's allowed webhook
        destinations (``monitoring.webhook``; none: no webhook may be set)."""
        self._store = store
        self._reference_root = reference_root
        self._webhooks = WebhookAllowList(webhook_allow)
        self._deployed_endpoints: Callable[[], set[str]] | None = None  # none linked: every endpoint counts
        self._deployed: set[str] = set()
        self._deployed_read_at = -math.inf
        # what was dropped to keep the monitor bounded: per (endpoint, reason), and records per reason
        self.values_dropped: collections.Counter[tuple[str, str]] = collections.Counter()
        self.records_dropped: collections.Counter[str] = collections.Counter()
        self.ingest_errors: collections.Counter[str] = collections.Counter()
        self._error_logged_at: dict[str, float] = {}
        self._submit_retraining = submit_retraining  # (endpoint, policy, the window that caused it) -> job id
        self._held_total = 0  # feedback labels held over all endpoints
        self._reference_for_serving = reference_for_serving  # endpoint -> (description, reference.parquet)
        self._serving_accuracy = serving_accuracy  # endpoint -> the serving version's registered accuracy
        self._serving_key: Callable[[str], str] | None = None  # endpoint -> "model:version" serving ("" none)
        self._clock = clock
        self._lock = threading.RLock()
        self._endpoints: dict[str, EndpointMonitor] = {}
        self._dropped_by_replica: dict[str, int] = {}  # cumulative, as each replica last reported
        self._init_replicas()  # one replica until link_lease (weir_control.monitoring.replicated)
        self._load()

    def link(self, links: Any) -> None:
        """The control plane's registry, deployments and job runner (``MonitoringLinks``)."""
        self._submit_retraining = links.submit_retraining
        self._reference_for_serving = links.reference_for_serving
        self._serving_accuracy = links.serving_accuracy
        self._serving_key = getattr(links, "serving_key", None)
        self._deployed_endpoints = getattr(links, "deployed_endpoints", None)

    def _save_state(self, monitor: EndpointMonitor) -> None:
        """The endpoint's state (cool-down, concept detector) is the lease holder's: another replica's
        copy would overwrite the holder's last action time."""
        if self._holder():
            self._store.save_monitoring_state(monitor.endpoint, monitor.state())

    def _load(self) -> None:
        policies = {policy.endpoint: policy for policy in self._store.monitoring_policies()}
        for endpoint, policy in policies.items():
            try:
                check_policy_numbers(policy)
            except InvalidArgumentError as error:  # stored before the checks existed: the defaults, no actions
                log.warning("stored monitoring policy ignored", extra={"endpoint": endpoint, "error": error.message})
                policy = monitoring_pb2.MonitoringPolicy(endpoint=endpoint)
            self._endpoints[endpoint] = EndpointMonitor(endpoint, resolved_policy(policy))
        for summary, profile in self._store.drift_references():
            monitor = self._monitor(summary.endpoint)
            monitor.reference, monitor.reference_summary = ReferenceProfile.from_bytes(profile), summary
        for endpoint, state in self._store.monitoring_states().items():
            self._monitor(endpoint).restore(state)
        for endpoint, monitor in self._endpoints.items():
            windows = self._store.drift_windows(endpoint, latest=1)
            monitor.latest = windows[-1] if windows else None

    def _monitor(self, endpoint: str) -> EndpointMonitor:
        monitor = self._endpoints.get(endpoint)
        if monitor is None:
            if len(self._endpoints) >= MAX_MONITORED_ENDPOINTS:
                raise ResourceExhaustedError(
                    f"endpoint: this control plane monitors at most {MAX_MONITORED_ENDPOINTS} endpoints, "
                    f"all taken; '{endpoint[:100]}' is not monitored"
                )
            monitor = EndpointMonitor(endpoint, resolved_policy(monitoring_pb2.MonitoringPolicy(endpoint=endpoint)))
            self._endpoints[endpoint] = monitor
        return monitor

    def _window_of(self, monitor: EndpointMonitor, record: monitoring_pb2.InferenceRecord, now: float) -> float:
        """The start of the window the record counts in: its request's (aligned, so replicas' windows
        agree), or its arrival's when that window has closed or the stamp lies ahead of this clock."""
        size = monitor.policy.window_seconds
        at = record.at.seconds + record.at.nanos / 1e9 if record.HasField("at") else now
        if at > now + MAX_CLOCK_AHEAD_SECONDS:
            at = now
        start = math.floor(at / size) * size
        if start + size + WINDOW_GRACE_SECONDS <= now:
            start = math.floor(now / size) * size
        return start

    def _open_window(self, monitor: EndpointMonitor, start: float) -> OpenWindow:
        window = monitor.open.get(start)
        if window is None:
            state = monitor.ddm.state if monitor.ddm.state != "drift" else "stable"
            self._follow_serving_reference(monitor)
            window = monitor.open[start] = OpenWindow(
                WindowProfile(monitor.reference), monitor.reference, ddm_state=state
            )
        return window

    # --- ingest ----------------------------------------------------------------------------------

    def ingest(self, replica_id: str, records: monitoring_pb2.InferenceRecords) -> None:
        """A replica's batch of records. Never raises for what the records hold: a record that cannot be
        taken is dropped and counted for its endpoint, so one endpoint's trouble cannot end the replica's
        attach stream (this is called from it) or hold up the other endpoints' records."""
        now = self._clock()
        with self._lock:
            for record in records.records:
                endpoint = record.endpoint
                try:
                    monitor = self._admitted(endpoint)
                    if monitor is None:
                        continue
                    self._close_due(monitor, now)  # a record never lands in a window that is due
                    start = self._window_of(monitor, record, now)
                    window = self._open_window(monitor, start).profile
                    numeric, categorical = self._features(monitor, record, start)
                    ignored = window.ignored_values
                    window.add(numeric, categorical)
                    if window.ignored_values != ignored:
                        self.values_dropped[endpoint, "features"] += window.ignored_values - ignored
                    monitor.records_received += 1
                    if monitor.held and record.request_id in monitor.held:
                        self._match_held(monitor, record.request_id, now)
                except Exception:
                    self._ingest_failed(endpoint)
            # a replica's buffer serves all its endpoints: its drops are counted per replica (cumulative)
            self._dropped_by_replica[replica_id] = records.dropped

    def _admitted(self, endpoint: str) -> EndpointMonitor | None:
        """The endpoint's monitor if its records are taken: it is deployed (or has a policy or a reference)
        and the number of monitored endpoints is not at its bound; None (counted) otherwise."""
        monitor = self._endpoints.get(endpoint)
        if monitor is not None:
            return monitor
        if self._deployed_endpoints is not None and endpoint not in self._deployed:
            now = time.monotonic()
            if now - self._deployed_read_at >= DEPLOYED_REFRESH_SECONDS:
                self._deployed_read_at = now
                self._deployed = self._deployed_endpoints()
            if endpoint not in self._deployed:
                self.records_dropped["unknown_endpoint"] += 1
                return None
        if len(self._endpoints) >= MAX_MONITORED_ENDPOINTS or len(endpoint) > MAX_NAME_CHARS:
            self.records_dropped["endpoints_bound"] += 1
            return None
        return self._monitor(endpoint)

    def _ingest_failed(self, endpoint: str) -> None:
        key = endpoint if endpoint in self._endpoints else "__unmonitored__"  # bounded label values
        self.ingest_errors[key] += 1
        now = time.monotonic()
        if now - self._error_logged_at.get(key, -math.inf) >= ERROR_LOG_SECONDS:
            self._error_logged_at[key] = now
            log.exception(
                "drift monitor: an inference record could not be taken (dropped; logged once a minute per endpoint)",
                extra={"endpoint": key, "errors": self.ingest_errors[key]},
            )

    def _features(
        self, monitor: EndpointMonitor, record: monitoring_pb2.InferenceRecord, window_start: float
    ) -> tuple[dict[str, float], dict[str, str]]:
        numeric: dict[str, float] = {}
        categorical: dict[str, str] = {}
        dropped = 0
        for value in record.inputs:
            if len(value.name) > MAX_NAME_CHARS or len(numeric) + len(categorical) >= MAX_FEATURES:
                dropped += 1
            elif value.WhichOneof("value") == "text":
                categorical[value.name] = value.text[:MAX_CATEGORY_CHARS]
            else:
                numeric[value.name] = value.number
        by_output: dict[str, list[float]] = {}
        for value in record.outputs:
            if len(value.name) > MAX_NAME_CHARS or len(numeric) + len(categorical) >= MAX_FEATURES:
                dropped += 1
                continue
            if value.WhichOneof("value") == "text":
                categorical[value.name] = value.text[:MAX_CATEGORY_CHARS]
                continue
            numeric[value.name] = value.number
            base = value.name.split("[", 1)[0]
            by_output.setdefault(base, []).append(value.number)
            if value.name not in monitor.outputs and len(monitor.outputs) < MAX_FEATURES:
                monitor.outputs.add(value.name)
        if dropped:
            self.values_dropped[monitor.endpoint, "features"] += dropped
        for base, values in by_output.items():
            if len(values) > 1:
                predicted = str(max(range(len(values)), key=values.__getitem__))
                categorical[base + ARGMAX] = predicted
                if len(monitor.outputs) < MAX_FEATURES:
                    monitor.outputs.add(base + ARGMAX)
                if record.request_id and len(record.request_id) <= MAX_REQUEST_ID_CHARS:
                    variant = record.variant[:MAX_NAME_CHARS]
                    monitor.predictions[record.request_id] = (predicted, window_start, False, variant)
                    monitor.predictions.move_to_end(record.request_id)
                    _trim(monitor.predictions, self._predictions_share())
        return numeric, categorical

    # --- feedback: concept drift -----------------------------------------------------------------

    def feedback(self, request: monitoring_pb2.RecordFeedbackRequest) -> monitoring_pb2.RecordFeedbackResponse:
        """Labels count in the window their request's record was counted in: the open one, or a closed
        one whose stored concept drift is updated at once. A label whose record has not arrived yet is
        held (bounded in time and number) and matched when the record comes."""
        check_endpoint(request.endpoint)
        if len(request.labels) > MAX_FEEDBACK_LABELS:
            raise InvalidArgumentError(
                f"labels: expected at most {MAX_FEEDBACK_LABELS:,} per call, got {len(request.labels):,}"
            )
        for index, label in enumerate(request.labels):  # all checked before any is counted
            if label.WhichOneof("value") == "number" and not math.isfinite(label.number):
                raise InvalidArgumentError(f"labels[{index}].number: expected a finite number, got {label.number}")
        matched = unmatched = held = duplicate = 0
        now = self._clock()
        with self._lock:
            monitor = self._endpoints.get(request.endpoint)
            if monitor is None:
                # labels may come before the first record: a deployed endpoint's are held like any other
                deployed = self._deployed_endpoints is None or request.endpoint in self._deployed_endpoints()
                if not deployed:
                    raise NotFoundError(f"endpoint: '{request.endpoint}' is not deployed and has no inference records")
                monitor = self._monitor(request.endpoint)
            self._follow_serving(monitor)
            closed: dict[float, list[tuple[bool, str]]] = {}  # window start -> (correct, detector state)
            posted: list[tuple[str, str]] = []  # with several replicas: for the one that has the record
            for label in request.labels:
                kind = label.WhichOneof("value")
                request_id = label.request_id
                if kind is None or not request_id or len(request_id) > MAX_REQUEST_ID_CHARS:
                    unmatched += 1
                    continue
                actual = (
                    str(int(label.number))
                    if kind == "number" and float(label.number).is_integer()
                    else str(getattr(label, kind))[:MAX_CATEGORY_CHARS]
                )
                remembered = monitor.predictions.get(request_id)
                if remembered is not None and remembered[2]:
                    duplicate += 1  # a request counts once: a resent label is not counted again
                elif remembered is not None:
                    matched += 1
                    self._count_label(monitor, request_id, remembered, actual, closed)
                elif self._hold(monitor, request_id, actual, now):
                    if self._shared_labels:  # and posted, for the replica that has (or gets) the record
                        posted.append((request_id, actual))
                    held += 1
                else:
                    unmatched += 1
            self._update_closed(monitor, closed, now)
            if posted:
                with self._store.transaction() as connection:
                    ids = partials.post_labels(connection, monitor.endpoint, posted, now)
                self._posted.update(((monitor.endpoint, request_id), row) for request_id, row in ids.items())
            self._save_state(monitor)
        return monitoring_pb2.RecordFeedbackResponse(
            matched=matched, unmatched=unmatched, held=held, duplicate=duplicate
        )

    def _count_label(
        self,
        monitor: EndpointMonitor,
        request_id: str,
        remembered: tuple[str, float, bool, str],
        actual: str,
        closed: dict[float, list[tuple[bool, str]]],
    ) -> None:
        """One matched label: the detector, and the figures of the window its request was counted in
        (the open window's now; a closed window's gathered in ``closed`` for ``_update_closed``)."""
        predicted, window_start, _, variant = remembered
        monitor.predictions[request_id] = (predicted, window_start, True, variant)
        outcome = monitor.outcomes.get(variant)
        if outcome is None and len(monitor.outcomes) < MAX_OUTCOME_VARIANTS:
            outcome = monitor.outcomes[variant] = [0, 0]
        if outcome is not None:
            outcome[0] += int(actual == predicted)
            outcome[1] += 1
        correct = actual == predicted
        if monitor.first_labels[1] < REFERENCE_ACCURACY_LABELS:
            monitor.first_labels[0] += int(correct)
            monitor.first_labels[1] += 1
        state = monitor.ddm.update(not correct)
        window = monitor.open.get(window_start)
        if window is not None:
            window.labels[0] += int(correct)
            window.labels[1] += 1
            if ddm_rank(state) > ddm_rank(window.ddm_state):
                window.ddm_state = state
        else:
            closed.setdefault(window_start, []).append((correct, state))

    def _update_closed(self, monitor: EndpointMonitor, closed: dict[float, list[tuple[bool, str]]], now: float) -> None:
        """Late labels: each closed window's stored concept drift (and severity) recomputed with them;
        a window they make CRITICAL acts like one that closed CRITICAL (within the cool-down)."""
        for start, outcomes in sorted(closed.items()):
            moment = monitoring_pb2.TimeRange()
            moment.start.FromNanoseconds(int(start * 1e9))  # as the window was stored
            window = self._store.drift_window_at(monitor.endpoint, moment.start.ToDatetime(datetime.UTC))
            judging = start + monitor.policy.window_seconds + WINDOW_GRACE_SECONDS + LABELS_HAND_IN_SECONDS > now
            shared = self._shared_labels and window is not None  # several replicas: one writer per window
            if (window is None and self._lease is not None and judging) or shared:
                # the holder adds these labels to the window: when it judges it, or to the stored one
                labels = OpenWindow(WindowProfile(None), None)
                labels.labels = [sum(correct for correct, _ in outcomes), len(outcomes)]
                labels.ddm_state = max(["stable", *(state for _, state in outcomes)], key=ddm_rank)
                self._hand_in(monitor, start, labels)
                continue
            if window is None:
                continue  # no longer kept: the detector has the labels, no window shows them
            correct = sum(correct for correct, _ in outcomes)
            before = self._relabel(monitor, window, correct, len(outcomes), [state for _, state in outcomes])
            self._store.replace_drift_window(monitor.endpoint, window)
            if monitor.latest is not None and monitor.latest.start == window.start:
                monitor.latest = window
            if window.severity == Severity.CRITICAL and before != Severity.CRITICAL and self._lease is None:
                self._act(monitor, window, now)
            elif window.severity == Severity.CRITICAL and before != Severity.CRITICAL and self._lease.held:
                self._act_fenced(monitor, window, now)

    def _relabel(
        self,
        monitor: EndpointMonitor,
        window: monitoring_pb2.DriftWindow,
        correct: int,
        labelled: int,
        states: list[str],
    ) -> int:
        """A stored window's concept drift (and severity) with ``labelled`` more labels, ``correct`` of them
        right, counted while the detector was in ``states``; returns its severity before."""
        concept = window.concept
        total = concept.labelled + labelled
        right = round(concept.accuracy * concept.labelled) + correct
        state = max([concept.detector_state or "stable", *states], key=ddm_rank)
        before = window.severity
        window.concept.CopyFrom(self._concept_figures(monitor, right, total, state))
        scored = [feature.severity for feature in window.features]
        worst = max([Severity.NONE, *scored]) if scored else Severity.SEVERITY_UNSPECIFIED
        window.severity = max(worst, window.concept.severity)
        return before

    def _predictions_share(self) -> int:
        """How many requests' predictions each endpoint remembers for feedback labels."""
        share = PREDICTIONS_REMEMBERED_TOTAL // max(1, len(self._endpoints))
        return min(PREDICTIONS_REMEMBERED, max(MIN_PREDICTIONS_REMEMBERED, share))

    def _follow_serving(self, monitor: EndpointMonitor) -> None:
        """The concept-drift baseline belongs to the version serving: when another version serves (a
        promotion, a rollback), its reference accuracy is taken afresh (its registered accuracy, or its
        first labels') and the detector restarts on its errors."""
        if self._serving_key is None:
            return
        try:
            key = self._serving_key(monitor.endpoint)
        except WeirError:
            return
        if key != monitor.accuracy_of:
            log.info(
                "concept drift follows the serving version",
                extra={"endpoint": monitor.endpoint, "before": monitor.accuracy_of, "after": key},
            )
            restart_concept(monitor)
            monitor.accuracy_of = key

    def _hold(self, monitor: EndpointMonitor, request_id: str, actual: str, now: float) -> bool:
        """Hold a label until its record comes; False when it cannot be held (the bounds are full of
        other endpoints' labels)."""
        if request_id in monitor.held:
            monitor.held[request_id] = (actual, now)  # the newer label wins, held afresh
            monitor.held.move_to_end(request_id)
            return True
        if len(monitor.held) >= MAX_HELD_LABELS or (self._held_total >= MAX_HELD_LABELS_TOTAL and monitor.held):
            evicted, _ = monitor.held.popitem(last=False)  # the oldest of this endpoint's gives way
            self._posted.pop((monitor.endpoint, evicted), None)
            monitor.labels_unmatched += 1
            self._held_total -= 1
        if self._held_total >= MAX_HELD_LABELS_TOTAL:
            return False
        monitor.held[request_id] = (actual, now)
        self._held_total += 1
        return True

    def _match_held(self, monitor: EndpointMonitor, request_id: str, now: float) -> None:
        """A record came for a held label: counted in the record's window (the open one)."""
        actual, _ = monitor.held.pop(request_id)
        self._held_total -= 1
        posted = self._posted.pop((monitor.endpoint, request_id), None)
        if posted is not None:
            with self._store.transaction() as connection:
                if not partials.claim_label(connection, posted):
                    return  # another replica counted it (or the holder expired it)
        remembered = monitor.predictions.get(request_id)
        if remembered is None:  # the record carried no predicted class: the label cannot be judged
            monitor.labels_unmatched += 1
            return
        closed: dict[float, list[tuple[bool, str]]] = {}
        self._count_label(monitor, request_id, remembered, actual, closed)
        self._update_closed(monitor, closed, now)  # empty unless the window changed meanwhile

    def _expire_held(self, monitor: EndpointMonitor, now: float) -> None:
        expired = 0
        while monitor.held:
            _, (_, held_at) = next(iter(monitor.held.items()))
            if now - held_at < LABEL_HOLD_SECONDS:
                break
            request_id, _ = monitor.held.popitem(last=False)
            self._posted.pop((monitor.endpoint, request_id), None)
            expired += 1
        if expired:
            self._held_total -= expired
            if not self._shared_labels:  # else the holder counts the posted labels nobody claimed
                monitor.labels_unmatched += expired
            self._save_state(monitor)

    # --- policy and reference --------------------------------------------------------------------

    def set_policy(self, policy: monitoring_pb2.MonitoringPolicy) -> monitoring_pb2.MonitoringPolicy:
        check_policy(policy, self._webhooks)
        with self._lock:
            monitor = self._monitor(policy.endpoint)  # refused before anything is stored if at the bound
            self._store.save_monitoring_policy(policy)
            resized = resolved_policy(policy).window_seconds != monitor.policy.window_seconds
            monitor.policy = resolved_policy(policy)
            if resized:
                monitor.open.clear()  # the next record opens a window of the new size
            return monitor.policy

    def policy(self, endpoint: str) -> monitoring_pb2.MonitoringPolicy:
        """The endpoint's policy, or the defaults (a read creates no monitor)."""
        check_endpoint(endpoint)
        with self._lock:
            monitor = self._endpoints.get(endpoint)
            if monitor is not None:
                return monitor.policy
        return resolved_policy(monitoring_pb2.MonitoringPolicy(endpoint=endpoint))

    # --- windows ---------------------------------------------------------------------------------

    def tick(self) -> list[tuple[str, monitoring_pb2.DriftWindow]]:
        """Close and score every window whose time is up; returns the closed windows."""
        now = self._clock()
        closed = []
        with self._lock:
            if self._lease is not None:
                closed += self._replicated_tick(now)
            for monitor in list(self._endpoints.values()):
                try:
                    if monitor.held:
                        self._expire_held(monitor, now)
                    _trim(monitor.predictions, self._predictions_share())  # more endpoints: smaller shares
                    reports = self._close_due(monitor, now)
                except Exception:  # one endpoint's failure must not keep the others' windows open
                    self._ingest_failed(monitor.endpoint)
                    monitor.open.clear()  # a window that cannot close would fail every tick
                    continue
                closed += [(monitor.endpoint, report) for report in reports]
        return closed

    def _close_due(self, monitor: EndpointMonitor, now: float) -> list[monitoring_pb2.DriftWindow]:
        """Close, oldest first, the windows whose grace period is over. With several replicas, one that
        does not hold the lease hands its share in; the holder judges a window once the others have
        had ``partials.MERGE_DELAY_SECONDS`` to hand theirs in."""
        size = monitor.policy.window_seconds
        due = [start for start in sorted(monitor.open) if start + size + WINDOW_GRACE_SECONDS <= now]
        if self._lease is None:
            return [self._close(monitor, start, now) for start in due]
        reports = []
        for start in due:
            if not self._lease.held:
                self._hand_in(monitor, start, monitor.open.pop(start))
            elif start + size + WINDOW_GRACE_SECONDS + self._merge_delay <= now:
                report = self._judge(monitor, start, now)
                if report is not None:
                    reports.append(report)
        return reports

    def _close(self, monitor: EndpointMonitor, start: float, now: float) -> monitoring_pb2.DriftWindow:
        window = monitor.open.pop(start)
        self._follow_serving(monitor)
        report = self._score(monitor, start, window)
        self._store.append_drift_window(monitor.endpoint, report, window.profile.to_bytes(), monitor.policy.max_windows)
        monitor.latest = report
        self._save_state(monitor)
        if report.severity == Severity.CRITICAL:
            self._act(monitor, report, now)
        return report

    def _score(self, monitor: EndpointMonitor, start: float, open_window: OpenWindow) -> monitoring_pb2.DriftWindow:
        window = open_window.profile
        report = monitoring_pb2.DriftWindow(records=window.count)
        report.start.FromNanoseconds(int(start * 1e9))
        report.end.FromNanoseconds(int((start + monitor.policy.window_seconds) * 1e9))
        correct, labelled = open_window.labels
        report.concept.CopyFrom(self._concept_figures(monitor, correct, labelled, open_window.ddm_state))
        reference = open_window.reference
        if reference is None or window.count < monitor.policy.min_records:
            report.severity = report.concept.severity
            return report
        thresholds = {name: (value.warning, value.critical) for name, value in monitor.policy.thresholds.items()}
        worst: int = Severity.NONE
        for name, numeric in sorted(reference.numeric.items()):
            scores = statistics.score_numeric(name, numeric, window)
            worst = max(worst, self._add_feature(report, monitor, scores, thresholds, len(reference.numeric)))
        for name, categorical in sorted(reference.categorical.items()):
            scores = statistics.score_categorical(name, categorical, window)
            level = self._add_feature(report, monitor, scores, thresholds, len(reference.numeric))
            if name.endswith(ARGMAX):
                change = statistics.prediction_share_change(categorical, window, name)
                warning, critical = thresholds["prediction"]
                prediction: int = (
                    Severity.CRITICAL if change > critical else Severity.WARNING if change >= warning else Severity.NONE
                )
                gate = statistics.CRITICAL_P_VALUE_GATE / max(1, len(reference.numeric) + len(reference.categorical))
                if prediction == Severity.CRITICAL and scores.chi_square_p_value >= gate:
                    prediction = Severity.WARNING  # the class shares moved, not beyond the window's noise
                report.predictions.add(output=name[: -len(ARGMAX)], max_share_change=change, severity=prediction)
                level = max(level, prediction)  # the class shares are judged by the prediction thresholds too
                report.features[-1].severity = level
            worst = max(worst, level)
        report.severity = max(worst, report.concept.severity)  # type: ignore[assignment]
        return report

    def _add_feature(
        self,
        report: monitoring_pb2.DriftWindow,
        monitor: EndpointMonitor,
        scores: statistics.FeatureScores,
        thresholds: dict[str, tuple[float, float]],
        tested: int,
    ) -> int:
        level, reasons = statistics.severity(scores, thresholds, tested)
        if not scores.count:
            level, reasons = Severity.SEVERITY_UNSPECIFIED, ["no values in this window"]
        feature = report.features.add(
            name=scores.name,
            role="output" if scores.name in monitor.outputs else "input",
            categorical=scores.categorical,
            count=scores.count,
            psi=scores.psi,
            ks_statistic=scores.ks_statistic,
            ks_p_value=scores.ks_p_value,
            jensen_shannon=scores.jensen_shannon,
            wasserstein=scores.wasserstein,
            wasserstein_normalized=scores.wasserstein_normalized,
            chi_square=scores.chi_square,
            chi_square_p_value=scores.chi_square_p_value,
            severity=level,
            reasons=reasons,
        )
        histogram = scores.histogram
        feature.histogram.edges.extend(histogram.edges)
        feature.histogram.categories.extend(histogram.categories)
        feature.histogram.reference.extend(histogram.reference)
        feature.histogram.current.extend(histogram.current)
        return level

    def _concept_figures(
        self, monitor: EndpointMonitor, correct: int, labelled: int, detector_state: str
    ) -> monitoring_pb2.ConceptDrift:
        """A window's concept drift from its labels' count, the correct ones and the detector's worst
        state while they were counted."""
        if monitor.reference_accuracy is None:
            registered = self._serving_accuracy(monitor.endpoint) if self._serving_accuracy else None
            if registered is not None:
                monitor.reference_accuracy = registered
            elif monitor.first_labels[1] >= REFERENCE_ACCURACY_LABELS:
                monitor.reference_accuracy = monitor.first_labels[0] / monitor.first_labels[1]
        concept = monitoring_pb2.ConceptDrift(
            labelled=labelled,
            accuracy=correct / labelled if labelled else 0.0,
            reference_accuracy=monitor.reference_accuracy or 0.0,
            detector_state=detector_state,
        )
        if not labelled:
            concept.severity = Severity.SEVERITY_UNSPECIFIED
        elif detector_state == "drift" and _accuracy_dropped(correct, labelled, monitor.reference_accuracy):
            concept.severity = Severity.CRITICAL  # confirmed: the detector and the window's own accuracy agree
        elif detector_state in ("drift", "warning"):
            concept.severity = Severity.WARNING  # detected, not (yet) confirmed
        else:
            concept.severity = Severity.NONE
        return concept

    # --- reports and metrics ---------------------------------------------------------------------

    def report(self, endpoint: str, latest: int = 0) -> monitoring_pb2.DriftReport:
        check_endpoint(endpoint)
        if latest < 0:
            raise InvalidArgumentError(f"windows: expected 0 (all kept) or more, got {latest}")
        with self._lock:
            monitor = self._endpoints.get(endpoint)
            if monitor is None:
                raise NotFoundError(f"endpoint: no inference records, policy or reference for '{endpoint}'")
            report = monitoring_pb2.DriftReport(
                endpoint=endpoint,
                policy=monitor.policy,
                records_received=monitor.records_received,
                records_dropped=sum(self._dropped_by_replica.values()),
                labels_held=len(monitor.held),
                labels_unmatched=monitor.labels_unmatched,
            )
            if monitor.reference_summary is not None:
                report.reference.CopyFrom(monitor.reference_summary)
        report.windows.extend(self._store.drift_windows(endpoint, latest))
        report.actions.extend(self._store.drift_actions(endpoint))
        return report

    def labels(self) -> list[tuple[str, int, int]]:
        """Per endpoint: feedback labels held for their records, and those that never matched."""
        with self._lock:
            return [
                (name, len(monitor.held), monitor.labels_unmatched)
                for name, monitor in sorted(self._endpoints.items())
                if monitor.held or monitor.labels_unmatched
            ]

    def labelled_outcomes(self, endpoint: str) -> dict[str, tuple[int, int]]:
        """Per variant of the endpoint: (correct, labelled) feedback labels of the requests it answered,
        cumulative since this control plane started, each request counted once (take deltas over an
        interval). Blocking: takes the monitor's lock, which ingest holds for one batch of records (a few
        ms to ~0.1 s at 5,000 records); call it in a worker thread from an event loop."""
        with self._lock:
            monitor = self._endpoints.get(endpoint)
            if monitor is None:
                return {}
            return {variant: (correct, labelled) for variant, (correct, labelled) in monitor.outcomes.items()}

    def dropped(self) -> tuple[dict[tuple[str, str], int], dict[str, int], dict[str, int]]:
        """Copies of what the bounds dropped: values per (endpoint, reason), records per reason, and
        ingest errors per endpoint."""
        with self._lock:
            return dict(self.values_dropped), dict(self.records_dropped), dict(self.ingest_errors)

    def latest(self) -> Iterable[tuple[str, monitoring_pb2.DriftWindow | None, int]]:
        with self._lock:
            return [
                (name, monitor.latest, monitor.records_received) for name, monitor in sorted(self._endpoints.items())
            ]


CONFIRMATION_Z = 2.33  # one-sided, p < 0.01
MIN_ACCURACY_DROP = 0.05  # absolute: a smaller drop is not CRITICAL concept drift however many labels
REFERENCE_ACCURACY_ROWS = 200  # what a reference accuracy is taken to be measured on (its own uncertainty)


def _trim(remembered: collections.OrderedDict[str, Any], size: int) -> None:
    while len(remembered) > size:
        remembered.popitem(last=False)  # the oldest first


def _accuracy_dropped(correct: int, labelled: int, reference: float | None) -> bool:
    """Whether the window's accuracy is below the reference's by at least ``MIN_ACCURACY_DROP`` and
    significantly (one-sided two-proportion z-test). DDM alone raises false drift on a good share of long
    stable streams (its minimum is taken over a noisy path); a CRITICAL concept drift, which may retrain a
    model, needs this confirmation too. The reference is itself an estimate (a validation split's accuracy,
    often of the best epoch, so optimistic; or the first labels'), taken as measured on
    ``REFERENCE_ACCURACY_ROWS`` rows: treated as exact, a served accuracy 2 points under an optimistic
    validation figure confirmed drift in windows of ~600 labels."""
    if reference is None or labelled == 0:
        return reference is None  # no reference to confirm against: the detector decides alone
    accuracy = correct / labelled
    drop = reference - accuracy
    if drop < MIN_ACCURACY_DROP:
        return False
    variance = reference * (1.0 - reference) / REFERENCE_ACCURACY_ROWS + accuracy * (1.0 - accuracy) / labelled
    return variance <= 0.0 or drop / math.sqrt(variance) > CONFIRMATION_Z
