"""Canary rollouts with automated analysis, driven by the control plane.

A rollout adds a ``canary`` variant beside the endpoint's one serving variant (the baseline) at the
first step's weight. Every ``interval_seconds`` the controller takes the per-variant counters every
attached data plane reports (requests succeeded and failed, server-side latency histogram), subtracts
the previous look, and compares canary with baseline over that interval:

- FAIL when the canary's error rate exceeds the baseline's by more than ``max_error_rate_increase``,
  or its p99 exceeds ``max_p99_ratio`` x the baseline's + ``max_p99_slack_ms`` (p99 interpolated
  within the latency buckets; compared only when the baseline too served ``min_requests``);
- FAIL too when feedback labels (``Monitoring/RecordFeedback``) counted in the interval give the canary
  an accuracy below the baseline's by more than ``max_accuracy_drop``, both variants having at least
  ``min_labelled`` of them (fewer: accuracy is not judged, the reason says so): a version that serves
  fine but answers worse is rolled back, not promoted;
- INCONCLUSIVE when the canary served fewer than ``min_requests`` (the step waits), or when the
  verdict would differ with any one replica identity's reports left out (``robust_verdict``: no
  single replica decides alone while others are attached);
- PASS otherwise: the next step's weights, or at the last step (100%) promotion: the canary's version
  becomes the endpoint's only variant (``primary``).

``failure_limit`` failed intervals in a row roll back: the baseline takes all traffic again. Every
transition is pushed to the data planes at once and written to the audit log. State lives in the
store, so a restarted control plane carries on (its first look after a restart starts a new interval).

A rollout owns the endpoint's serving variants while it runs: it records them as it sets them, and
writes only over the revision it read. A hand change (Deploy, SetTraffic, Undeploy) found on the
endpoint ends the rollout SUPERSEDED (audited, actor ``rollout-controller``), at the controller's next
look or at the next call about it: what the hand change set serves, and a new rollout can start.

A rollout must progress: the new variant (canary or green) READY on every attached data plane within
``progress_deadline_seconds`` (default 600; the clock stops while paused), and its version loaded
everywhere: a data plane reporting it FAILED to load, or the deadline passing, rolls the rollout back
at once (ROLLED_BACK with the replica's load failure or the deadline as reason, actor
``rollout-controller``). Without this a rollout of a version no replica can load waited for ever.

Several control-plane replicas: the controller's loop steps only on the replica holding the lease
(``weir_control.lease``) and reads every replica's persisted data-plane reports
(``weir_control.replica_reports``); each transition (deployment, the rollout's record, its audit
event) is one transaction, fenced by the lease, and written only over the rollout as this replica
read it, so a step is applied once across a handover and an RPC through another replica (a pause)
is never overwritten. The analysis itself is in ``weir_control.rollout_analysis``.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import math
import time
from collections.abc import Callable, Sequence

from sqlalchemy import select

from weir_control.attach import DesiredStateHub
from weir_control.lease import LeaseKeeper, LostLease
from weir_control.rollout_analysis import (
    DEFAULT_MAX_ACCURACY_DROP,
    DEFAULT_MIN_LABELLED,
    Look,
    Stream,
    collect,
    interval_totals,
    judge_accuracy,
    labelled_in_interval,
    robust_verdict,
)
from weir_control.store import Store
from weir_control.store.schema import ROLLOUTS
from weir_control.store.store import check_name
from weir_proto.control.v1 import audit_pb2, deployments_pb2, rollouts_pb2
from weir_proto.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    WeirError,
)

log = logging.getLogger(__name__)

Rollout = rollouts_pb2.Rollout
ACTIVE = (Rollout.RUNNING, Rollout.PAUSED)
CANARY = "canary"
PRIMARY = "primary"
CONTROLLER = "rollout-controller"  # the audit log's actor for automatic transitions
DEFAULT_STEPS = (5, 25, 50, 100)
DEFAULT_INTERVAL_SECONDS = 60.0
DEFAULT_KEEP_PREVIOUS_SECONDS = 300.0
DEFAULT_PROGRESS_DEADLINE_SECONDS = 600.0
MIN_PROGRESS_DEADLINE_SECONDS = 1.0
MAX_PROGRESS_DEADLINE_SECONDS = 86_400.0
BLUE_GREEN = "blue_green"
GREEN, BLUE = "green", "blue"
PROTECTED = "protected"  # the flag that puts an endpoint under approval
UNAPPROVED_MAX_PERCENT = 50  # a protected endpoint's canary takes more only once approved


MIN_INTERVAL_SECONDS = 0.01
MAX_INTERVAL_SECONDS = 86_400.0  # a day between analyses
MAX_KEEP_PREVIOUS_SECONDS = 7 * 86_400.0
MAX_MIN_REQUESTS = 1_000_000_000
MAX_FAILURE_LIMIT = 1000
MAX_P99_RATIO = 1000.0
MAX_P99_SLACK_MS = 3_600_000.0

# {variant: (answered right, labelled)} of an endpoint, cumulative: the drift monitor's labelled outcomes
LabelledOutcomes = Callable[[str], dict[str, tuple[int, int]]]


def check_number(field: str, value: float, low: float, high: float) -> None:
    """A request's number: finite and within [low, high] (InvalidArgumentError naming the field)."""
    if not math.isfinite(value) or not low <= value <= high:
        raise InvalidArgumentError(f"{field}: expected a finite number in {low:g}..{high:g}, got {value}")


def check_thresholds(thresholds: rollouts_pb2.AnalysisThresholds) -> None:
    """Every analysis threshold finite and ranged (0 means the default) before anything changes."""
    check_number("thresholds.max_error_rate_increase", thresholds.max_error_rate_increase, 0.0, 1.0)
    check_number("thresholds.max_p99_ratio", thresholds.max_p99_ratio, 0.0, MAX_P99_RATIO)
    check_number("thresholds.max_p99_slack_ms", thresholds.max_p99_slack_ms, 0.0, MAX_P99_SLACK_MS)
    check_number("thresholds.min_requests", thresholds.min_requests, 0, MAX_MIN_REQUESTS)
    check_number("thresholds.failure_limit", thresholds.failure_limit, 0, MAX_FAILURE_LIMIT)
    check_number("thresholds.max_accuracy_drop", thresholds.max_accuracy_drop, 0.0, 1.0)
    check_number("thresholds.min_labelled", thresholds.min_labelled, 0, MAX_MIN_REQUESTS)


def progress_deadline(seconds: float) -> float:
    """A request's progress deadline (0: the default), checked before anything changes."""
    seconds = seconds or DEFAULT_PROGRESS_DEADLINE_SECONDS
    check_number("progress_deadline_seconds", seconds, MIN_PROGRESS_DEADLINE_SECONDS, MAX_PROGRESS_DEADLINE_SECONDS)
    return seconds


def with_defaults(thresholds: rollouts_pb2.AnalysisThresholds) -> rollouts_pb2.AnalysisThresholds:
    filled = rollouts_pb2.AnalysisThresholds()
    filled.CopyFrom(thresholds)
    filled.max_error_rate_increase = filled.max_error_rate_increase or 0.01
    filled.max_p99_ratio = filled.max_p99_ratio or 1.5
    filled.max_p99_slack_ms = filled.max_p99_slack_ms or 5.0
    filled.min_requests = filled.min_requests or 20
    filled.failure_limit = filled.failure_limit or 1
    filled.max_accuracy_drop = filled.max_accuracy_drop or DEFAULT_MAX_ACCURACY_DROP
    filled.min_labelled = filled.min_labelled or DEFAULT_MIN_LABELLED
    return filled


class RolloutChanged(FailedPreconditionError):
    """Another replica changed the rollout since this one read it: nothing was applied."""


class RolloutController:
    def __init__(
        self,
        store: Store,
        hub: DesiredStateHub,
        clock: Callable[[], float] = time.time,
        tick_seconds: float = 0.25,
        labelled_outcomes: LabelledOutcomes | None = None,
        lease: LeaseKeeper | None = None,
        reports: Callable[[], Sequence[Stream]] | None = None,
    ) -> None:
        self._store = store
        self._hub = hub
        # Several replicas: the controller steps only while this replica holds the lease, fences
        # every write of its loop with it, and reads every replica's data-plane reports (``reports``,
        # a blocking read of replica_reports) instead of this replica's own attach streams.
        self._lease = lease
        self._reports = reports
        self._fencing = False  # inside the loop's step_all: writes are fenced
        # endpoint -> the rollout as this replica last read or wrote it: a write goes only over that
        # (another replica's RPC, e.g. a pause, may have changed it meanwhile; compare-and-set)
        self._seen: dict[str, Rollout | None] = {}
        self._labelled_outcomes = labelled_outcomes  # the drift monitor's feedback labels per variant
        self._clock = clock
        self._tick = tick_seconds
        self._looks: dict[str, Look] = {}  # endpoint -> previous look
        self._lock = asyncio.Lock()

    async def _look(self, endpoint: str) -> Look:
        """The replicas' counters for the endpoint now, with its feedback labels per variant (the
        monitor's lock may be held by an ingest for a while: read in a worker thread)."""
        look = collect(await self._streams(), endpoint)
        if self._labelled_outcomes is not None:
            look.labelled = await asyncio.to_thread(self._labelled_outcomes, endpoint)
        return look

    async def _streams(self) -> Sequence[Stream]:
        """The attach streams of every replica (persisted), or of this one without ``reports``."""
        if self._reports is None:
            return self._hub.attached()
        return await asyncio.to_thread(self._reports)

    def _write(self, rollout: Rollout, work: Callable[[], object]) -> object:
        """``work`` (store calls that end by saving ``rollout``) in one transaction, fenced by the lease
        inside the loop, and only over the rollout as this replica read it (worker thread)."""
        fencing = self._fencing and self._lease is not None
        with self._store.transaction() as connection:
            if fencing:
                assert self._lease is not None
                self._lease.fence(connection)
            query = select(ROLLOUTS.c.rollout).where(ROLLOUTS.c.endpoint == rollout.endpoint)
            if connection.dialect.name == "postgresql":
                query = query.with_for_update()  # SQLite: BEGIN IMMEDIATE already holds the write lock
            stored = connection.execute(query).scalar()
            found = None if stored is None else Rollout.FromString(stored)
            if rollout.endpoint in self._seen and found != self._seen[rollout.endpoint]:
                self._seen.pop(rollout.endpoint, None)
                raise RolloutChanged(
                    f"endpoint '{rollout.endpoint}': the rollout changed through another control-plane replica "
                    "meanwhile; nothing was applied, try again"
                )
            result = work()
        self._remember(rollout)
        return result

    def _remember(self, rollout: Rollout | None, endpoint: str = "") -> Rollout | None:
        seen = None
        if rollout is not None:
            seen = Rollout()
            seen.CopyFrom(rollout)
        self._seen[rollout.endpoint if rollout is not None else endpoint] = seen
        return rollout

    async def _save(self, rollout: Rollout) -> None:
        await asyncio.to_thread(self._write, rollout, lambda: self._store.save_rollout(rollout))

    async def _read(self, endpoint: str) -> Rollout:
        rollout = await asyncio.to_thread(self._store.get_rollout, endpoint)
        self._remember(rollout)
        return rollout

    # --- RPC entry points (all serialised with the controller's own steps) --------------------------

    async def start(self, request: rollouts_pb2.StartRolloutRequest, actor: str) -> Rollout:
        steps = list(request.steps) or list(DEFAULT_STEPS)
        if any(not 1 <= step <= 100 for step in steps) or steps != sorted(set(steps)) or steps[-1] != 100:
            raise InvalidArgumentError(f"steps: expected increasing percentages in 1..100 ending at 100, got {steps}")
        interval = request.interval_seconds or DEFAULT_INTERVAL_SECONDS
        check_number("interval_seconds", interval, MIN_INTERVAL_SECONDS, MAX_INTERVAL_SECONDS)
        check_thresholds(request.thresholds)
        deadline = progress_deadline(request.progress_deadline_seconds)
        check_name("endpoint", request.endpoint)
        check_name("model_name", request.model_name)
        async with self._lock:
            deployment, baseline = await self._single_serving(request.endpoint)
            canary = deployments_pb2.Variant(name=CANARY, model_name=request.model_name, weight=steps[0])
            if request.WhichOneof("target") == "alias":
                canary.alias = request.alias
            else:
                canary.version = request.version
            if baseline.name == CANARY:
                raise FailedPreconditionError(f"endpoint '{request.endpoint}': its baseline is named '{CANARY}'")
            if deployment.flags.get(PROTECTED) == "true" and steps[0] > UNAPPROVED_MAX_PERCENT:
                raise PermissionDeniedError(
                    f"endpoint '{request.endpoint}' is protected: a canary's first step must be at most "
                    f"{UNAPPROVED_MAX_PERCENT}% (the steps above wait for an approver), got steps {steps}"
                )
            rollout = Rollout(
                endpoint=request.endpoint,
                state=Rollout.RUNNING,
                strategy="canary",
                baseline_variant=baseline.name,
                canary_variant=CANARY,
                steps=steps,
                step=0,
                interval_seconds=interval,
                thresholds=with_defaults(request.thresholds),
                started_by=actor,
                progress_deadline_seconds=deadline,
            )
            rollout.started_at.FromDatetime(datetime.datetime.now(datetime.UTC))
            self._schedule(rollout)  # before any change: nothing below can fail on the request's numbers
            self._restart_deadline(rollout)
            await self._set_weights(rollout, deployment, baseline, canary, steps[0], actor)
            rollout.desired_revision = (await self._hub.current()).revision
            self._looks[request.endpoint] = await self._look(request.endpoint)
            await self._save(rollout)
            return rollout

    async def start_blue_green(self, request: rollouts_pb2.StartBlueGreenRequest, actor: str) -> Rollout:
        keep = request.keep_previous_seconds or DEFAULT_KEEP_PREVIOUS_SECONDS
        check_number("keep_previous_seconds", keep, 0.0, MAX_KEEP_PREVIOUS_SECONDS)
        deadline = progress_deadline(request.progress_deadline_seconds)
        check_name("endpoint", request.endpoint)
        check_name("model_name", request.model_name)
        async with self._lock:
            deployment, blue = await self._single_serving(request.endpoint)
            green = deployments_pb2.Variant(
                name=GREEN if blue.name != GREEN else BLUE, model_name=request.model_name, weight=0
            )
            if request.WhichOneof("target") == "alias":
                green.alias = request.alias
            else:
                green.version = request.version
            rollout = Rollout(
                endpoint=request.endpoint, state=Rollout.RUNNING, strategy=BLUE_GREEN, baseline_variant=blue.name,
                canary_variant=green.name, steps=[0, 100], step=0, keep_previous_seconds=keep, started_by=actor,
                reason="loading green on every data plane", progress_deadline_seconds=deadline,
            )  # fmt: skip
            rollout.started_at.FromDatetime(datetime.datetime.now(datetime.UTC))
            self._restart_deadline(rollout)
            shadows = _shadows(deployment)
            await self._change(rollout, deployment, [_copy(blue, 100), green, *shadows], actor, "green loading")
            rollout.desired_revision = (await self._hub.current()).revision
            await self._save(rollout)
            return rollout

    async def _single_serving(self, endpoint: str) -> tuple[deployments_pb2.Deployment, deployments_pb2.Variant]:
        existing = await asyncio.to_thread(self._existing, endpoint)
        self._remember(existing, endpoint)
        if existing is not None and existing.state in ACTIVE and not await self._superseded(existing):
            raise FailedPreconditionError(
                f"endpoint '{endpoint}': a rollout is already in progress ({Rollout.State.Name(existing.state)}; "
                "abort or promote it first)"
            )
        deployment = await asyncio.to_thread(self._store.get_deployment, endpoint)
        serving = [variant for variant in deployment.variants if not variant.shadow_percent]
        if len(serving) != 1:
            raise FailedPreconditionError(
                f"endpoint '{endpoint}': expected one serving variant as the baseline, got "
                f"{[variant.name for variant in serving]}"
            )
        return deployment, serving[0]

    async def _needs_approval(self, rollout: Rollout) -> bool:
        """True (and says so in the rollout) when a protected endpoint's rollout lacks its approval."""
        deployment = await asyncio.to_thread(self._store.get_deployment, rollout.endpoint)
        if deployment.flags.get(PROTECTED) != "true" or rollout.approved_by:
            rollout.awaiting_approval = False
            return False
        rollout.awaiting_approval = True
        rollout.reason = "protected endpoint: waiting for an approver other than the requester (ApproveRollout)"
        return True

    async def approve(self, endpoint: str, approver: str) -> Rollout:
        async with self._lock:
            rollout = await self._read(endpoint)
            if rollout.state not in ACTIVE or await self._superseded(rollout):
                raise FailedPreconditionError(
                    f"endpoint '{endpoint}': the rollout already ended ({Rollout.State.Name(rollout.state)}: "
                    f"{rollout.reason})"
                )
            if approver == rollout.started_by:
                raise PermissionDeniedError(
                    f"approval of '{endpoint}': expected a principal other than the requester '{rollout.started_by}'"
                )
            rollout.approved_by, rollout.awaiting_approval = approver, False
            rollout.reason = f"approved by {approver}"
            await self._save(rollout)
            return rollout

    async def _switch(self, rollout: Rollout, actor: str) -> None:
        if await self._needs_approval(rollout):
            raise FailedPreconditionError(f"endpoint '{rollout.endpoint}': {rollout.reason}")
        if not rollout.green_ready:
            raise FailedPreconditionError(
                f"endpoint '{rollout.endpoint}': green is not READY on every data plane yet; switching now could "
                "send requests to a replica still loading it"
            )
        deployment = await asyncio.to_thread(self._store.get_deployment, rollout.endpoint)
        blue, green = self._pair(deployment, rollout)
        shadows = _shadows(deployment)

        def switched(done: Rollout) -> None:
            done.step = 1
            done.reason = f"switched; blue stays loaded for {done.keep_previous_seconds:g} s"
            done.retire_previous_at.FromDatetime(
                datetime.datetime.fromtimestamp(self._clock() + done.keep_previous_seconds, datetime.UTC)
            )

        await self._change(
            rollout, deployment, [_copy(blue, 0), _copy(green, 100), *shadows], actor, "switched to green",
            then=switched,
        )  # fmt: skip

    async def _advance_blue_green(self, rollout: Rollout) -> bool:
        """One look at a blue-green rollout; True when it changed."""
        if rollout.step == 0 and not rollout.green_ready:
            ready, attached = await self._ready_on(rollout)
            if attached and ready == attached:
                rollout.green_ready = True
                rollout.ClearField("progress_deadline_at")
                rollout.reason = f"green READY on all {attached} data planes: switch when you are"
                return True
            return False
        if rollout.step == 1 and self._clock() >= rollout.retire_previous_at.ToDatetime(datetime.UTC).timestamp():
            deployment = await asyncio.to_thread(self._store.get_deployment, rollout.endpoint)
            _, green = self._pair(deployment, rollout)
            shadows = _shadows(deployment)
            await self._change(
                rollout, deployment, [_copy(green, 100), *shadows], CONTROLLER, "blue retired",
                then=lambda done: _end(done, Rollout.SUCCEEDED, "switched to green; blue retired"),
            )  # fmt: skip
            return True
        return False

    async def act(self, action: str, endpoint: str, actor: str) -> Rollout:
        async with self._lock:
            rollout = await self._read(endpoint)
            if rollout.state not in ACTIVE or await self._superseded(rollout):
                raise FailedPreconditionError(
                    f"endpoint '{endpoint}': the rollout already ended ({Rollout.State.Name(rollout.state)}: "
                    f"{rollout.reason})"
                )
            if action == "pause":
                rollout.state, rollout.reason = Rollout.PAUSED, f"paused by {actor}"
            elif action == "resume":
                rollout.state, rollout.reason = Rollout.RUNNING, ""
                self._schedule(rollout)
                self._restart_deadline(rollout)  # the progress deadline's clock stopped while paused
                self._looks[endpoint] = await self._look(endpoint)
            elif action == "abort":
                await self._roll_back(rollout, f"aborted by {actor}", actor)
            elif action in ("promote", "switch") and rollout.strategy == BLUE_GREEN:
                await self._switch(rollout, actor)
            elif action == "promote":
                if await self._needs_approval(rollout):
                    raise FailedPreconditionError(f"endpoint '{endpoint}': {rollout.reason}")
                await self._promote(rollout, f"promoted by {actor}", actor)
            else:
                raise FailedPreconditionError(f"endpoint '{endpoint}': '{action}' applies to blue-green rollouts")
            await self._save(rollout)
            return rollout

    # --- the loop ---------------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._tick)
            if self._lease is not None and not self._lease.held:
                self._looks.clear()  # a new term starts a new interval (another replica may have looked)
                continue
            try:
                await self.step_all()
            except Exception:  # one bad rollout must not stop the others (it is logged)
                log.exception("rollout controller step failed")

    async def step_all(self) -> None:
        async with self._lock:
            self._fencing = True
            try:
                for rollout in await asyncio.to_thread(self._store.active_rollouts):
                    self._remember(rollout)
                    try:
                        if not await self._superseded(rollout):
                            await self._step(rollout)
                    except RolloutChanged:
                        continue  # looked at again at the next tick, as it is now
                    except LostLease:
                        log.warning(
                            "rollout step not applied: the lease was lost", extra={"endpoint": rollout.endpoint}
                        )
                        self._looks.clear()
                        return
                    except Exception as error:  # one rollout's failure must not stop the others' steps
                        log.exception("rollout step failed", extra={"endpoint": rollout.endpoint})
                        await self._step_failed(rollout, error)
            finally:
                self._fencing = False

    async def _step(self, rollout: Rollout) -> None:
        if await self._stalled(rollout):
            await self._save(rollout)
            return
        if rollout.strategy == BLUE_GREEN:
            if rollout.state == Rollout.RUNNING and await self._advance_blue_green(rollout):
                await self._save(rollout)
            return
        due = rollout.next_analysis_at.ToDatetime(datetime.UTC).timestamp()
        if rollout.state == Rollout.RUNNING and self._clock() >= due:
            await self._analyse(rollout)
            await self._save(rollout)

    async def _step_failed(self, rollout: Rollout, error: Exception) -> None:
        """Say why in the rollout and look again an interval later (not every tick)."""
        try:
            fresh = await self._read(rollout.endpoint)
            fresh.reason = f"step failed: {error.message if isinstance(error, WeirError) else type(error).__name__}"
            try:
                self._schedule(fresh)
            except (OverflowError, ValueError, OSError):  # a record from before intervals were checked
                self._schedule(fresh, DEFAULT_INTERVAL_SECONDS)
            await self._save(fresh)
        except Exception:
            log.exception("could not record a failed rollout step", extra={"endpoint": rollout.endpoint})

    async def _analyse(self, rollout: Rollout) -> None:
        endpoint = rollout.endpoint
        look = await self._look(endpoint)
        if endpoint not in self._looks:  # first look after a restart: start the interval now
            self._looks[endpoint] = look
            self._schedule(rollout)
            return
        before = self._looks[endpoint]
        totals = interval_totals(look, before)
        self._looks[endpoint] = look
        verdict, reason, canary, baseline = robust_verdict(
            totals, rollout.canary_variant, rollout.baseline_variant, rollout.thresholds
        )
        canary_labels = labelled_in_interval(look, before, rollout.canary_variant)
        baseline_labels = labelled_in_interval(look, before, rollout.baseline_variant)
        verdict, reason = judge_accuracy(verdict, reason, canary_labels, baseline_labels, rollout.thresholds)
        analysis = rollout.analyses.add(
            step=rollout.step, canary_weight=rollout.steps[rollout.step], canary_requests=canary.requests,
            canary_errors=canary.failed, baseline_requests=baseline.requests, baseline_errors=baseline.failed,
            canary_p99_ms=canary.p99_ms(), baseline_p99_ms=baseline.p99_ms(), verdict=verdict, reason=reason,
            canary_labelled=canary_labels[1], baseline_labelled=baseline_labels[1],
            canary_accuracy=canary_labels[0] / canary_labels[1] if canary_labels[1] else 0.0,
            baseline_accuracy=baseline_labels[0] / baseline_labels[1] if baseline_labels[1] else 0.0,
        )  # fmt: skip
        analysis.at.FromDatetime(datetime.datetime.now(datetime.UTC))
        del rollout.analyses[:-50]  # the recent history is enough for a status
        log.info("canary analysis", extra={"endpoint": endpoint, "verdict": verdict, "reason": reason})
        if verdict == "FAIL":
            rollout.failed_intervals += 1
            if rollout.failed_intervals >= rollout.thresholds.failure_limit:
                await self._roll_back(rollout, f"analysis failed: {reason}", CONTROLLER)
                return
        elif verdict == "PASS":
            rollout.failed_intervals = 0
            # a protected endpoint's canary goes beyond UNAPPROVED_MAX_PERCENT only once approved
            gated = rollout.step + 1 >= len(rollout.steps) or rollout.steps[rollout.step + 1] > UNAPPROVED_MAX_PERCENT
            if gated and await self._needs_approval(rollout):
                self._schedule(rollout)
                return
            if rollout.step + 1 >= len(rollout.steps):
                await self._promote(rollout, "every step passed", CONTROLLER)
                return
            rollout.step += 1
            deployment = await asyncio.to_thread(self._store.get_deployment, endpoint)
            baseline_variant, canary_variant = self._pair(deployment, rollout)
            await self._set_weights(
                rollout, deployment, baseline_variant, canary_variant, rollout.steps[rollout.step], CONTROLLER
            )
        self._schedule(rollout)

    # --- progress ---------------------------------------------------------------------------------

    async def _stalled(self, rollout: Rollout) -> bool:
        """Roll back a rollout whose new version failed to load on a data plane, or whose new
        variant is not READY everywhere by its progress deadline (RUNNING only); True when it did.
        A canary READY everywhere records it (the deadline is met)."""
        version = await self._new_version(rollout)
        failure = self._load_failure(rollout, version, [stream.info for stream in await self._streams()])
        if failure is not None:
            await self._roll_back(rollout, failure, CONTROLLER)
            return True
        if rollout.state != Rollout.RUNNING or not rollout.HasField("progress_deadline_at"):
            return False
        ready, attached = await self._ready_on(rollout, version)
        if attached and ready == attached:
            if rollout.strategy != BLUE_GREEN:  # blue-green: its own look records green_ready
                rollout.canary_ready = True
                rollout.ClearField("progress_deadline_at")
                await self._save(rollout)
            return False
        if self._clock() < rollout.progress_deadline_at.ToDatetime(datetime.UTC).timestamp():
            return False
        role = "green" if rollout.strategy == BLUE_GREEN else "canary"
        target = f"{rollout.canary_variant} ({version[0]}:{version[1]})" if version else rollout.canary_variant
        seen = f"READY on {ready} of {attached} attached" if attached else "no data plane attached"
        await self._roll_back(
            rollout,
            f"progress deadline exceeded: the {role} {target} was not READY on every data plane within "
            f"{rollout.progress_deadline_seconds:g} s ({seen})",
            CONTROLLER,
        )
        return True

    async def _new_version(self, rollout: Rollout) -> tuple[str, int] | None:
        """The model and version the new variant resolves to in the desired state (None: none now)."""
        for endpoint in (await self._hub.current()).endpoints:
            if endpoint.endpoint == rollout.endpoint:
                for variant in endpoint.variants:
                    if variant.name == rollout.canary_variant:
                        return variant.model.model_name, variant.model.version
        return None

    def _load_failure(
        self, rollout: Rollout, version: tuple[str, int] | None, replicas: list[deployments_pb2.ReplicaInfo]
    ) -> str | None:
        """Why the new version cannot serve: the first data plane that reports it FAILED to load
        (on a desired state that named it: not a failure left from an earlier rollout)."""
        if version is None:
            return None
        for replica in replicas:
            if replica.status.applied_revision < rollout.desired_revision:
                continue
            for status in replica.status.endpoints:
                if (
                    status.endpoint == rollout.endpoint and status.variant == rollout.canary_variant
                    and status.state == deployments_pb2.EndpointStatus.FAILED
                    and (status.desired.model_name, status.desired.version) == version
                ):  # fmt: skip
                    return (
                        f"version {version[1]} failed to load on replica {replica.replica_id}: "
                        f"{status.message or 'no reason given'}"
                    )
        return None

    async def _ready_on(self, rollout: Rollout, version: tuple[str, int] | None = None) -> tuple[int, int]:
        """How many attached data planes serve the new variant's version READY, of how many."""
        if version is None:
            version = await self._new_version(rollout)
        replicas = [stream.info for stream in await self._streams()]
        ready = [
            replica
            for replica in replicas
            if version is not None and any(
                status.endpoint == rollout.endpoint and status.variant == rollout.canary_variant
                and status.state == deployments_pb2.EndpointStatus.READY and status.serving == status.desired
                and (status.desired.model_name, status.desired.version) == version
                for status in replica.status.endpoints
            )
        ]  # fmt: skip
        return len(ready), len(replicas)

    def _restart_deadline(self, rollout: Rollout) -> None:
        """The progress deadline from now, while the new variant has not been READY everywhere."""
        done = rollout.green_ready if rollout.strategy == BLUE_GREEN else rollout.canary_ready
        if rollout.progress_deadline_seconds and not done:
            rollout.progress_deadline_at.FromDatetime(
                datetime.datetime.fromtimestamp(self._clock() + rollout.progress_deadline_seconds, datetime.UTC)
            )

    # --- transitions ------------------------------------------------------------------------------

    async def _set_weights(
        self,
        rollout: Rollout,
        deployment: deployments_pb2.Deployment,
        baseline: deployments_pb2.Variant,
        canary: deployments_pb2.Variant,
        canary_weight: int,
        actor: str,
    ) -> None:
        baseline = _copy(baseline, weight=100 - canary_weight)
        canary = _copy(canary, weight=canary_weight)
        shadows = _shadows(deployment)
        variants = [baseline, canary, *shadows]
        await self._change(rollout, deployment, variants, actor, f"canary at {canary_weight}%")

    async def _roll_back(self, rollout: Rollout, reason: str, actor: str) -> None:
        deployment = await asyncio.to_thread(self._store.get_deployment, rollout.endpoint)
        baseline, _ = self._pair(deployment, rollout)
        shadows = _shadows(deployment)
        await self._change(
            rollout, deployment, [_copy(baseline, weight=100), *shadows], actor, f"rolled back: {reason}",
            then=lambda done: _end(done, Rollout.ROLLED_BACK, reason),
        )  # fmt: skip

    async def _promote(self, rollout: Rollout, reason: str, actor: str) -> None:
        deployment = await asyncio.to_thread(self._store.get_deployment, rollout.endpoint)
        _, canary = self._pair(deployment, rollout)
        shadows = _shadows(deployment)
        promoted = _copy(canary, weight=100)
        promoted.name = PRIMARY if rollout.baseline_variant != PRIMARY else rollout.baseline_variant
        await self._change(
            rollout, deployment, [promoted, *shadows], actor, f"promoted: {reason}",
            then=lambda done: _end(done, Rollout.SUCCEEDED, reason),
        )  # fmt: skip

    async def _change(
        self,
        rollout: Rollout,
        before: deployments_pb2.Deployment,
        variants: list[deployments_pb2.Variant],
        actor: str,
        summary: str,
        then: Callable[[Rollout], None] | None = None,
    ) -> None:
        """Set the endpoint's variants, only over ``before`` (the revision the transition was decided
        on: a hand change made since is never overwritten), record them in the rollout, ``then``
        finish the rollout's transition, and save it with its audit event: one transaction, fenced
        by the lease in the controller's loop, so a step is applied once or not at all."""
        endpoint = rollout.endpoint
        event = audit_pb2.AuditEvent(actor=actor, role="system" if actor == CONTROLLER else "", action="Rollouts/Step",
                                     target=f"endpoint/{endpoint}", detail=summary)  # fmt: skip
        event.at.FromDatetime(datetime.datetime.now(datetime.UTC))
        event.before = _weights(before)
        token = self._lease.token if self._fencing and self._lease is not None else 0

        def apply() -> deployments_pb2.Deployment:
            after = self._store.deploy(endpoint, variants, actor, if_revision=before.revision)
            del rollout.variants[:]
            rollout.variants.extend(serving_variants(after))
            if then is not None:
                then(rollout)
            event.after, event.result = _weights(after), "OK"
            self._store.append_audit(event)
            self._store.save_rollout(rollout)
            return after

        try:
            after = await asyncio.to_thread(self._write, rollout, apply)
        except (LostLease, RolloutChanged):
            raise
        except WeirError as error:
            event.result, event.detail = error.kind.name, f"{summary}: {error.message}"
            await asyncio.to_thread(self._store.append_audit, event)
            raise
        assert isinstance(after, deployments_pb2.Deployment)
        log.info(
            "rollout step applied",
            extra={"endpoint": endpoint, "summary": summary, "revision": after.revision, "token": token},
        )
        await self._hub.changed()

    async def _superseded(self, rollout: Rollout) -> bool:
        """End an active rollout whose endpoint was changed by hand (SUPERSEDED, saved and audited as
        the controller's); True when it did. Nothing is pushed: what the hand change set serves."""
        try:
            deployment: deployments_pb2.Deployment | None = await asyncio.to_thread(
                self._store.get_deployment, rollout.endpoint
            )
        except NotFoundError:
            deployment = None
        why = hand_change(rollout, deployment)
        if why is None:
            return False
        was = Rollout.State.Name(rollout.state)
        _end(rollout, Rollout.SUPERSEDED, f"superseded: {why}; what it set serves, the rollout changes nothing more")
        rollout.awaiting_approval = False
        self._looks.pop(rollout.endpoint, None)
        event = audit_pb2.AuditEvent(
            actor=CONTROLLER, role="system", action="Rollouts/Step", target=f"endpoint/{rollout.endpoint}",
            detail=f"rollout ended ({was} -> SUPERSEDED): {rollout.reason}"[:2000], result="OK",
            before=",".join(_describe(variant) for variant in rollout.variants),
            after=_weights(deployment) if deployment is not None else "undeployed",
        )  # fmt: skip
        event.at.FromDatetime(datetime.datetime.now(datetime.UTC))

        def record() -> None:
            self._store.save_rollout(rollout)
            self._store.append_audit(event)

        await asyncio.to_thread(self._write, rollout, record)
        log.warning("rollout superseded by a hand change", extra={"endpoint": rollout.endpoint, "reason": why})
        return True

    # --- helpers ----------------------------------------------------------------------------------

    def _pair(
        self, deployment: deployments_pb2.Deployment, rollout: Rollout
    ) -> tuple[deployments_pb2.Variant, deployments_pb2.Variant]:
        by_name = {variant.name: variant for variant in deployment.variants}
        baseline, canary = by_name.get(rollout.baseline_variant), by_name.get(rollout.canary_variant)
        if baseline is None or canary is None:
            raise FailedPreconditionError(
                f"endpoint '{rollout.endpoint}': the rollout's variants were changed by hand "
                f"(expected {rollout.baseline_variant} and {rollout.canary_variant}, found {sorted(by_name)})"
            )
        return baseline, canary

    def _schedule(self, rollout: Rollout, seconds: float | None = None) -> None:
        seconds = rollout.interval_seconds if seconds is None else seconds
        rollout.next_analysis_at.FromDatetime(datetime.datetime.fromtimestamp(self._clock() + seconds, datetime.UTC))

    def _existing(self, endpoint: str) -> Rollout | None:
        try:
            return self._store.get_rollout(endpoint)
        except WeirError:
            return None


def serving_variants(deployment: deployments_pb2.Deployment) -> list[rollouts_pb2.RolloutVariant]:
    """The endpoint's serving variants (shadows aside), by name, as a rollout records them."""
    return sorted(
        (
            rollouts_pb2.RolloutVariant(
                name=variant.name, model_name=variant.model_name, version=variant.version, alias=variant.alias,
                weight=variant.weight,
            )
            for variant in deployment.variants
            if not variant.shadow_percent
        ),
        key=lambda variant: variant.name,
    )  # fmt: skip


def hand_change(rollout: Rollout, deployment: deployments_pb2.Deployment | None) -> str | None:
    """Why the endpoint is no longer what the rollout set (None: it is): undeployed, or other
    serving variants (names, targets or weights; a rollout recorded before it kept its variants:
    either of its two variants gone)."""
    if deployment is None:
        return "the endpoint was undeployed"
    found = serving_variants(deployment)
    names = {variant.name for variant in found}
    if rollout.variants:
        changed = found != sorted(rollout.variants, key=lambda variant: variant.name)
        expected = ",".join(_describe(variant) for variant in rollout.variants)
    else:
        changed = not {rollout.baseline_variant, rollout.canary_variant} <= names
        expected = f"{rollout.baseline_variant} and {rollout.canary_variant}"
    if not changed:
        return None
    return (
        f"the endpoint's variants were changed by hand (by {deployment.updated_by or 'someone'}, revision "
        f"{deployment.revision}): the rollout set {expected}, found {','.join(_describe(v) for v in found) or 'none'}"
    )


def _describe(variant: rollouts_pb2.RolloutVariant) -> str:
    target = variant.alias or str(variant.version)
    return f"{variant.name}={variant.model_name}:{target}@{variant.weight}"


def _end(rollout: Rollout, state: rollouts_pb2.Rollout.State, reason: str) -> None:
    rollout.state, rollout.reason = state, reason
    rollout.ended_at.FromDatetime(datetime.datetime.now(datetime.UTC))


def _shadows(deployment: deployments_pb2.Deployment) -> list[deployments_pb2.Variant]:
    """Shadow variants ride along unchanged through every traffic change of a rollout."""
    return [variant for variant in deployment.variants if variant.shadow_percent]


def _copy(variant: deployments_pb2.Variant, weight: int) -> deployments_pb2.Variant:
    copy = deployments_pb2.Variant()
    copy.CopyFrom(variant)
    copy.weight = weight
    return copy


def _weights(deployment: deployments_pb2.Deployment) -> str:
    return ",".join(f"{variant.name}={variant.weight}" for variant in deployment.variants)
