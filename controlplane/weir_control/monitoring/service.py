"""The Monitoring control service, the drift monitor's ties to the rest of the control plane (the
serving version's lineage and accuracy, retraining through the job runner), and the periodic task
that closes windows."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from pathlib import Path

import grpc

from weir_control.features.paths import inside
from weir_control.monitoring.monitor import DriftMonitor
from weir_control.services import Auditor, _read, summary
from weir_control.store import Store
from weir_control.training.registration import RETRAINING_ACTION, RETRAINING_ACTOR
from weir_control.training.runner import JobRunner
from weir_proto.control.v1 import audit_pb2, deployments_pb2, monitoring_pb2, monitoring_pb2_grpc, registry_pb2
from weir_proto.errors import FailedPreconditionError, NotFoundError, WeirError, status_code_for

log = logging.getLogger(__name__)

TICK_SECONDS = 0.5
REFERENCE_FILE = "reference.parquet"  # what a training job leaves in its output for drift monitoring


class MonitoringLinks:
    """How the monitor reaches the registry, the deployments and the job runner."""

    def __init__(self, store: Store, runner: JobRunner) -> None:
        self._store = store
        self._runner = runner

    def serving_version(self, endpoint: str) -> registry_pb2.ModelVersion:
        state = self._store.desired_state()
        for entry in state.endpoints:
            if entry.endpoint != endpoint:
                continue
            serving = [variant for variant in entry.variants if not variant.shadow_percent]
            if serving:
                best: deployments_pb2.ResolvedVariant = max(serving, key=lambda variant: variant.weight)
                return self._store.get_version(best.model.model_name, best.model.version)
        raise NotFoundError(f"endpoint: '{endpoint}' is not deployed")

    def reference_for_serving(self, endpoint: str) -> tuple[str, Path]:
        version = self.serving_version(endpoint)
        job = version.lineage.source_job
        if not job:
            raise FailedPreconditionError(
                f"serving_lineage: {version.model_name} version {version.version} has no training job in its lineage"
            )
        output = self._runner.jobs_dir / job / "output"
        path = output / REFERENCE_FILE
        # the job wrote it: a link it left there must not make the control plane read elsewhere
        if not (path.is_file() and inside(path, output)):
            raise FailedPreconditionError(
                f"serving_lineage: job '{job}' left no {REFERENCE_FILE} in its output (the built-in trainer writes one)"
            )
        return f"training data of {version.model_name} version {version.version} (job {job})", path

    def deployed_endpoints(self) -> set[str]:
        """The endpoints the desired state serves: the only ones (with those that have a policy or a
        reference) whose records the monitor takes."""
        return {entry.endpoint for entry in self._store.desired_state().endpoints}

    def serving_key(self, endpoint: str) -> str:
        """Which version serves the endpoint ("model:version"; "" when it is not deployed)."""
        try:
            version = self.serving_version(endpoint)
        except NotFoundError:
            return ""
        return f"{version.model_name}:{version.version}"

    def serving_accuracy(self, endpoint: str) -> float | None:
        try:
            metrics = self.serving_version(endpoint).metrics
        except NotFoundError:
            return None
        for name in ("val_accuracy", "accuracy"):
            if name in metrics:
                return float(metrics[name])
        return None

    def submit_retraining(
        self, endpoint: str, policy: monitoring_pb2.MonitoringPolicy, trigger: registry_pb2.Lineage.DriftTrigger
    ) -> str:
        """A job like the one that trained the serving version (or the policy's own spec), audited with
        the drift window that caused it (actor ``drift-monitor``); the version the job registers names
        that window in its lineage (``weir_control.training.registration``)."""
        # named by the window, not the clock: a resubmission for one window (another replica's, after a
        # lease handover) returns the same job instead of launching a second one
        job_id = f"retrain-{endpoint}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(trigger.window_start.seconds))}"
        event = audit_pb2.AuditEvent(
            actor=RETRAINING_ACTOR, role="system", action=RETRAINING_ACTION, target=f"job/{job_id}",
            detail=f"drift window {trigger.window_start.ToJsonString()} .. {trigger.window_end.ToJsonString()} of "
            f"endpoint '{endpoint}' CRITICAL on {', '.join(trigger.features) or 'no feature'}"[:2000],
        )  # fmt: skip
        event.at.FromDatetime(datetime.datetime.now(datetime.UTC))
        try:
            if policy.HasField("retrain_spec"):
                spec = policy.retrain_spec
            else:
                version = self.serving_version(endpoint)
                if not version.lineage.source_job:
                    raise FailedPreconditionError(
                        f"retrain: {version.model_name} version {version.version} has no training job in its "
                        "lineage and the policy has no retrain_spec"
                    )
                spec = self._runner.spec_like(version.lineage.source_job)
            job = self._runner.submit(job_id, spec, RETRAINING_ACTOR)
        except WeirError as error:
            event.result, event.outcome = status_code_for(error.kind).name, "failed"
            event.detail = f"{event.detail}: not submitted: {error.message}"[:2000]
            self._store.append_audit(event)
            raise
        event.result, event.outcome = "OK", "ok"
        event.after = summary(trigger)  # read back by registration for the new version's lineage
        self._store.append_audit(event)
        return job.id


class MonitoringService(monitoring_pb2_grpc.MonitoringServicer):
    def __init__(self, monitor: DriftMonitor, auditor: Auditor) -> None:
        self._monitor = monitor
        self._auditor = auditor

    async def SetReference(
        self, request: monitoring_pb2.SetReferenceRequest, context: grpc.aio.ServicerContext
    ) -> monitoring_pb2.ReferenceSummary:
        return await self._auditor.run(
            context, "Monitoring/SetReference", f"endpoint/{request.endpoint[:256]}", lambda: None,
            lambda: self._monitor.set_reference(request),
        )  # fmt: skip

    async def SetMonitoringPolicy(
        self, request: monitoring_pb2.MonitoringPolicy, context: grpc.aio.ServicerContext
    ) -> monitoring_pb2.MonitoringPolicy:
        return await self._auditor.run(
            context, "Monitoring/SetMonitoringPolicy", f"endpoint/{request.endpoint[:256]}",
            lambda: self._monitor.policy(request.endpoint) if request.endpoint else None,
            lambda: self._monitor.set_policy(request),
        )  # fmt: skip

    async def GetMonitoringPolicy(
        self, request: monitoring_pb2.GetMonitoringPolicyRequest, context: grpc.aio.ServicerContext
    ) -> monitoring_pb2.MonitoringPolicy:
        return await _read(context, lambda: self._monitor.policy(request.endpoint))

    async def GetDriftReport(
        self, request: monitoring_pb2.GetDriftReportRequest, context: grpc.aio.ServicerContext
    ) -> monitoring_pb2.DriftReport:
        return await _read(context, lambda: self._monitor.report(request.endpoint, request.windows))

    async def RecordFeedback(
        self, request: monitoring_pb2.RecordFeedbackRequest, context: grpc.aio.ServicerContext
    ) -> monitoring_pb2.RecordFeedbackResponse:
        # labels change the endpoint's concept-drift state (and may lead to a retraining): audited
        return await self._auditor.run(
            context, "Monitoring/RecordFeedback", f"endpoint/{request.endpoint[:256]}", lambda: None,
            lambda: self._monitor.feedback(request),
        )  # fmt: skip


async def run_windows(monitor: DriftMonitor) -> None:
    """Close windows as their time comes (forever, until cancelled)."""
    while True:
        await asyncio.sleep(TICK_SECONDS)
        try:
            await asyncio.to_thread(monitor.tick)
        except Exception:  # one bad window must not stop monitoring
            log.exception("drift monitor tick failed")


async def stop_task(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
