"""The MLOps loop end to end (issue 15, "Done when"): ``examples/mlops_loop.py``'s own ``run_loop`` in
its fast setting, against a real ``weir control`` and a following ``weir serve`` (subprocesses),
traffic by entity key through tritonclient's typed path. Every transition after the set-up is made by
Weir's controllers; the test checks what they did:

- unshifted traffic: at least 3 judged windows without an alarm (none CRITICAL, no action);
- the shift: CRITICAL on the shifted feature and not on the others;
- exactly one retraining job within the cool-down although several windows stay CRITICAL, audited with
  the actor ``drift-monitor``;
- the retrained version's lineage names that job and the drift window that caused it;
- the canary promoted it (the rollout controller), and its accuracy on the shifted data improved;
- zero failed inference requests throughout.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from loop_data import FEATURES, SHIFTED_FEATURE
from mlops_loop import ENDPOINT, LoopSettings, run_loop

pytestmark = pytest.mark.timeout(420)


def test_the_loop_retrains_on_drift_and_the_canary_promotes_the_better_version(tmp_path: Path) -> None:
    settings = LoopSettings.fast(tmp_path / "loop")
    settings.verbose = True  # progress in the test's captured output
    result = run_loop(settings)

    # traffic: all of it by entity key, none failed, and both canaries took their share
    assert result.requests > 1000 and result.failures == [], result.failures[:5]
    assert result.variants.get("primary", 0) > 0 and result.variants.get("canary", 0) > 0, result.variants

    # unshifted traffic: at least three judged windows, no alarm, no action before the shift
    assert len(result.quiet) >= 3
    for window in result.quiet:
        assert window["severity"] != "CRITICAL", window
        assert int(window["records"]) >= settings.min_records and window["features"], window
    assert all(_seconds(action["at"]) > result.shift_at for action in result.actions), result.actions

    # the shift: one retraining, caused by a window CRITICAL on the shifted feature only
    retrains = [action for action in result.actions if action["kind"] == "retrain"]
    assert len(retrains) == 1, result.actions
    action = retrains[0]
    job_id = action["job_id"]
    assert job_id.startswith(f"retrain-{ENDPOINT}-") and result.retrain_jobs == [job_id], result.retrain_jobs
    cause = next(w for w in result.windows if w["start"] == action["window"]["start"])
    assert cause["end"] == action["window"]["end"] and cause["severity"] == "CRITICAL"
    severities = {feature["name"]: feature["severity"] for feature in cause["features"]}
    assert severities[SHIFTED_FEATURE] == "CRITICAL", severities
    for name in FEATURES:
        if name != SHIFTED_FEATURE:
            assert severities[name] != "CRITICAL", severities
    # the cool-down held: the windows after it stayed CRITICAL (until the new version served), one job only
    later = [w for w in result.windows if w["start"] > cause["start"] and w["severity"] == "CRITICAL"]
    assert later, "expected more CRITICAL windows after the first (the cool-down is what keeps it to one job)"
    audited = [
        event for event in result.audit
        if event.get("actor") == "drift-monitor" and event["action"] == "Monitoring/SubmitRetraining"
    ]  # fmt: skip
    assert [event["target"] for event in audited] == [f"job/{job_id}"], audited

    # the new version: its lineage names the job and the window; the training runner registered it
    retrained = result.retrained
    assert retrained is not None and retrained.job == job_id
    assert retrained.lineage["source_job"] == job_id, retrained.lineage
    trigger = retrained.lineage["drift_trigger"]
    assert trigger["endpoint"] == ENDPOINT, trigger
    assert (trigger["window_start"], trigger["window_end"]) == (cause["start"], cause["end"]), (trigger, cause)
    assert SHIFTED_FEATURE in trigger["features"], trigger
    registered = [
        event for event in result.audit
        if event.get("actor") == "training-runner" and event["target"] == f"model/churn/version/{retrained.version}"
    ]  # fmt: skip
    assert registered, "the training runner's registration is not in the audit log"

    # the canary promoted it, by the rollout controller's analysis
    assert result.outcome == "promoted" and retrained.outcome == "promoted"
    canary = result.rollouts[-1]
    assert canary["version"] == retrained.version and canary["state"] == "SUCCEEDED", canary
    assert canary["started_by"] == f"training-job:{job_id}"
    assert [analysis["verdict"] for analysis in canary["analyses"]][-1] == "PASS", canary["analyses"]
    assert any(event.get("actor") == "rollout-controller" for event in result.audit)

    # the drift reference followed the new version by itself (the monitor's own audited step)
    assert result.reference.get("serving_version") == f"churn:{retrained.version}", result.reference
    assert any(
        event.get("actor") == "drift-monitor" and event["action"] == "Monitoring/SetReference" for event in result.audit
    ), "the reference's following of the serving version is not in the audit log"

    # accuracy on the shifted data (held-out customers) improved over the version it replaced
    previous = result.versions[retrained.version - 1]
    assert retrained.accuracy_after > previous.accuracy_after + 0.15, (previous, retrained)
    assert retrained.accuracy_after > 0.85, retrained

    # the report: one self-contained HTML file
    text = result.report.read_text()
    assert "<img" in text and "data:image/png;base64," in text and "Canary of version" in text


def _seconds(stamp: str) -> float:
    import datetime

    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def test_a_less_accurate_retrained_version_is_rolled_back_by_its_canary(tmp_path: Path) -> None:
    """--bad-retrain: the retraining reads a label table whose labels are inverted; the version it registers
    serves without an error but answers worse, the labels sent during its canary show it, and the rollout
    controller rolls it back: the endpoint keeps the version it had."""
    settings = LoopSettings.fast(tmp_path / "loop")
    settings.bad_retrain, settings.quiet_windows = True, 1
    result = run_loop(settings)

    assert result.requests > 1000 and result.failures == [], result.failures[:5]
    retrained = result.retrained
    assert retrained is not None and result.retrain_jobs == [retrained.job]
    previous = result.versions[retrained.version - 1]
    assert retrained.accuracy_after < previous.accuracy_after - 0.2, (previous, retrained)
    assert result.outcome == "rolled back" and retrained.outcome == "rolled back"
    canary = result.rollouts[-1]
    assert canary["version"] == retrained.version and canary["state"] == "ROLLED_BACK", canary
    assert "accuracy" in canary["reason"], canary["reason"]
    assert [analysis["verdict"] for analysis in canary["analyses"]][-1] == "FAIL", canary["analyses"]
    rolled_back = [
        event for event in result.audit
        if event.get("actor") == "rollout-controller" and "rolled back" in (event.get("detail") or "")
    ]  # fmt: skip
    assert rolled_back, "the rollback is not in the audit log with the rollout controller as its actor"
