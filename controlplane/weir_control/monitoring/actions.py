"""What a CRITICAL drift window does: the endpoint's actions (a retraining job, a webhook alert), at most
once per cool-down, recorded in the endpoint's drift report."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from weir_control.monitoring.state import EndpointMonitor
from weir_control.monitoring.webhook import WebhookAllowList, WebhookRefused
from weir_control.store import Store
from weir_proto.control.v1 import monitoring_pb2, registry_pb2
from weir_proto.errors import WeirError

log = logging.getLogger(__name__)

Severity = monitoring_pb2.Severity
DriftTrigger = registry_pb2.Lineage.DriftTrigger
MAX_TRIGGER_FEATURES = 100  # CRITICAL features an action (its audit event, a retrained version's lineage) names
WEBHOOK_ATTEMPTS = 3
WEBHOOK_TIMEOUT_SECONDS = 5.0


class DriftActions:
    """The drift monitor's actions (a mix-in of ``DriftMonitor``)."""

    _store: Store
    _webhooks: WebhookAllowList
    _submit_retraining: Callable[[str, monitoring_pb2.MonitoringPolicy, DriftTrigger], str] | None

    if TYPE_CHECKING:

        def _save_state(self, monitor: EndpointMonitor) -> None: ...

    def _act(self, monitor: EndpointMonitor, report: monitoring_pb2.DriftWindow, now: float) -> None:
        """A CRITICAL window's action, within the cool-down (one replica: no lease to fence)."""
        trigger = self._reserve(monitor, report, now)
        if trigger is not None:
            self._save_state(monitor)
            self._fire(monitor, report, trigger, now)

    def _reserve(self, monitor: EndpointMonitor, report: monitoring_pb2.DriftWindow, now: float) -> DriftTrigger | None:
        """The trigger of the window's action if the policy has one and the cool-down allows it, the
        cool-down taken (the caller saves the state, in the judging transaction with several replicas:
        the reservation commits before any side effect, and a new holder reads it)."""
        policy = monitor.policy
        if not (policy.webhook_url or policy.retrain):
            return None
        if monitor.last_action_at and now - monitor.last_action_at < policy.cooldown_seconds:
            return None  # cool-down: one action per period however many windows stay critical
        monitor.last_action_at = now
        critical = _critical(report)
        named = critical[:MAX_TRIGGER_FEATURES] + (
            [f"(+{len(critical) - MAX_TRIGGER_FEATURES} more)"] if len(critical) > MAX_TRIGGER_FEATURES else []
        )
        trigger = DriftTrigger(endpoint=monitor.endpoint, features=named)
        trigger.window_start.CopyFrom(report.start)
        trigger.window_end.CopyFrom(report.end)
        return trigger

    def _fire(
        self, monitor: EndpointMonitor, report: monitoring_pb2.DriftWindow, trigger: DriftTrigger, now: float
    ) -> None:
        """The reserved action's side effects: the retraining job (its id names the window, so a
        resubmission returns the same job) and the webhook alert (off this thread). A holder that dies
        between the reservation and these loses the action: at most once, never twice."""
        policy = monitor.policy
        critical = _critical(report)
        if policy.retrain and self._submit_retraining is not None:
            job_id = ""
            try:
                job_id = detail = self._submit_retraining(monitor.endpoint, policy, trigger)
            except WeirError as error:
                detail = f"not submitted: {error.message}"
            self._record_action(monitor.endpoint, "retrain", detail, now, trigger, job_id)
        if policy.webhook_url:
            alert = {
                "endpoint": monitor.endpoint,
                "severity": "CRITICAL",
                "window_start": report.start.ToJsonString(),
                "window_end": report.end.ToJsonString(),
                "critical": critical,
                "records": report.records,
            }
            # off the lock and off the caller's thread: a slow webhook must not hold up ingestion
            threading.Thread(
                target=self._alert, args=(monitor.endpoint, policy.webhook_url, alert, now, trigger), daemon=True
            ).start()

    def _alert(self, endpoint: str, url: str, alert: dict[str, Any], now: float, trigger: DriftTrigger) -> None:
        """POST the alert where the allow-list lets it go. The recorded detail (viewers read it in
        reports) is the HTTP status only: never the receiver's answer or a connection error's text."""
        body = json.dumps(alert).encode()
        detail = ""
        for attempt in range(WEBHOOK_ATTEMPTS):
            try:
                status = self._webhooks.post(url, body, WEBHOOK_TIMEOUT_SECONDS)
            except WebhookRefused as refused:
                log.warning("drift alert not sent", extra={"endpoint": endpoint, "reason": str(refused)})
                detail = "not sent: the destination is not allowed (weir control --webhook-allow)"
                break
            except Exception as error:  # retried: a webhook receiver restarting must not lose the alert
                log.warning("drift alert attempt failed", extra={"endpoint": endpoint, "error": repr(error)})
                detail = f"failed after {attempt + 1} attempt(s): no HTTP answer"
                time.sleep(0.5 * 2**attempt)
                continue
            detail = f"HTTP {status} after {attempt + 1} attempt(s)"
            if status < 500:
                break
            time.sleep(0.5 * 2**attempt)  # a 5xx: the receiver may recover
        self._record_action(endpoint, "alert", detail, now, trigger)

    def _record_action(
        self, endpoint: str, kind: str, detail: str, now: float, trigger: DriftTrigger, job_id: str = ""
    ) -> None:
        action = monitoring_pb2.Action(kind=kind, detail=detail, job_id=job_id, features=trigger.features)
        action.at.FromNanoseconds(int(now * 1e9))
        action.window.start.CopyFrom(trigger.window_start)
        action.window.end.CopyFrom(trigger.window_end)
        self._store.append_drift_action(endpoint, action)
        log.warning("drift action", extra={"endpoint": endpoint, "kind": kind, "detail": detail})


def _critical(report: monitoring_pb2.DriftWindow) -> list[str]:
    """What made the window CRITICAL: its features, and concept drift."""
    critical = [feature.name for feature in report.features if feature.severity == Severity.CRITICAL]
    if report.concept.severity == Severity.CRITICAL:
        critical.append("concept drift")
    return critical
