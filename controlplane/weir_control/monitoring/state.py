"""The drift monitor's per-endpoint state (``EndpointMonitor``) and its open windows, with the timing
constants both the single-replica and the replicated paths (``weir_control.monitoring.replicated``) use."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from weir_control.monitoring import statistics
from weir_control.monitoring.profiles import ReferenceProfile, WindowProfile
from weir_proto.control.v1 import monitoring_pb2

# Records are windowed by their request's time (the data plane's stamp), and a window closes this long after
# its end, so records shipped late (data planes send them about twice a second) still land in it. A record
# whose window has closed, or stamped further ahead than MAX_CLOCK_AHEAD_SECONDS, counts at its arrival.
WINDOW_GRACE_SECONDS = 2.0
# A label may reach the control plane before its request's record (data planes send records about twice a
# second): it is held this long (within bounds), then counted unmatched.
LABEL_HOLD_SECONDS = 30.0
# What data planes send is bounded here, whoever sends it:
MAX_MONITORED_ENDPOINTS = 1000  # endpoints with a monitor (deployed, or with a policy or a reference)
MAX_CATEGORY_CHARS = 256  # a categorical value; longer ones are cut to this length


@dataclass
class OpenWindow:
    profile: WindowProfile  # binned on ``reference``: it is scored against the reference it opened with
    reference: ReferenceProfile | None
    labels: list[int] = field(default_factory=lambda: [0, 0])  # correct, labelled
    ddm_state: str = "stable"  # the concept-drift detector's worst state while its labels were counted


@dataclass
class EndpointMonitor:
    endpoint: str
    policy: monitoring_pb2.MonitoringPolicy
    reference: ReferenceProfile | None = None
    reference_summary: monitoring_pb2.ReferenceSummary | None = None
    # window start -> the windows still open (the current one, and the previous while in its grace period)
    open: dict[float, OpenWindow] = field(default_factory=dict)
    outputs: set[str] = field(default_factory=set)  # feature names that are outputs (role)
    # request id -> (predicted class, start of the window its record was counted in, whether it was labelled,
    # the variant that answered)
    predictions: collections.OrderedDict[str, tuple[str, float, bool, str]] = field(
        default_factory=collections.OrderedDict
    )
    # variant -> [correct, labelled], cumulative since the control plane started (canary analysis on accuracy)
    outcomes: dict[str, list[int]] = field(default_factory=dict)
    # request id -> (label, when it came): labels whose record has not arrived yet, oldest first
    held: collections.OrderedDict[str, tuple[str, float]] = field(default_factory=collections.OrderedDict)
    labels_unmatched: int = 0  # held labels whose record never came
    ddm: statistics.DDM = field(default_factory=statistics.DDM)
    reference_accuracy: float | None = None
    first_labels: list[int] = field(default_factory=lambda: [0, 0])
    accuracy_of: str = ""  # the serving version ("model:version") the detector and reference accuracy are for
    reference_tried: str = ""  # the serving version whose training data was last tried as the reference
    records_received: int = 0
    last_action_at: float = 0.0
    latest: monitoring_pb2.DriftWindow | None = None

    def state(self) -> dict[str, Any]:
        return {
            "ddm": self.ddm.to_dict(),
            "reference_accuracy": self.reference_accuracy,
            "first_labels": self.first_labels,
            "accuracy_of": self.accuracy_of,
            "records_received": self.records_received,
            "last_action_at": self.last_action_at,
            "outputs": sorted(self.outputs),
            "labels_unmatched": self.labels_unmatched,
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.ddm = statistics.DDM.from_dict(state.get("ddm") or {})
        self.reference_accuracy = state.get("reference_accuracy")
        self.first_labels = list(state.get("first_labels") or [0, 0])
        self.accuracy_of = str(state.get("accuracy_of", ""))
        self.records_received = int(state.get("records_received", 0))
        self.last_action_at = float(state.get("last_action_at", 0.0))
        self.outputs = set(state.get("outputs") or [])
        self.labels_unmatched = int(state.get("labels_unmatched", 0))


def ddm_rank(state: str) -> int:
    return {"stable": 0, "warning": 1, "drift": 2}.get(state, 0)


def restart_concept(monitor: EndpointMonitor) -> None:
    monitor.reference_accuracy = None
    monitor.first_labels = [0, 0]
    monitor.ddm = statistics.DDM()
