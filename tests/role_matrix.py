"""The role table: who may call each RPC of both planes. Written out by hand from the documented
policy (the README's role table is rendered from it), not computed from the policy code, so the
role-matrix tests check the code against it.

A method's entry is the least role it needs, or one of:

- ``open``: no token needed;
- ``replica``: only a data plane's replica token (and admins, for tools and tests);
- ``any-token``: any valid token, the replica's included (a data plane downloads its artifacts);
- ``job-secret``: no bearer token at all: a training job's own secret, checked by the service.

Roles: ``replica`` is outside the order viewer < deployer < approver < admin, and passes only where
named (``replica``, ``any-token``).
"""

from __future__ import annotations

ROLES = ("anonymous", "replica", "viewer", "deployer", "approver", "admin")
ORDERED = ("viewer", "deployer", "approver", "admin")

CONTROL_PLANE: dict[str, str] = {
    # Registry
    "weir.control.v1.Registry/CreateRegisteredModel": "deployer",
    "weir.control.v1.Registry/GetRegisteredModel": "viewer",
    "weir.control.v1.Registry/UpdateRegisteredModel": "deployer",
    "weir.control.v1.Registry/SearchRegisteredModels": "viewer",
    "weir.control.v1.Registry/CreateModelVersion": "deployer",
    "weir.control.v1.Registry/GetModelVersion": "viewer",
    "weir.control.v1.Registry/SearchModelVersions": "viewer",
    "weir.control.v1.Registry/UpdateModelVersion": "deployer",
    "weir.control.v1.Registry/SetAlias": "deployer",
    "weir.control.v1.Registry/DeleteAlias": "deployer",
    "weir.control.v1.Registry/GetModelVersionByAlias": "viewer",
    "weir.control.v1.Registry/DownloadArtifact": "any-token",
    # Deployments
    "weir.control.v1.Deployments/Deploy": "deployer",
    "weir.control.v1.Deployments/SetTraffic": "deployer",
    "weir.control.v1.Deployments/SetFlag": "deployer",  # the 'protected' flag: admin (checked in the handler)
    "weir.control.v1.Deployments/Undeploy": "deployer",
    "weir.control.v1.Deployments/GetDeployment": "viewer",
    "weir.control.v1.Deployments/ListDeployments": "viewer",
    "weir.control.v1.Deployments/ListReplicas": "viewer",
    "weir.control.v1.DataPlaneSync/Attach": "replica",
    # Audit
    "weir.control.v1.Audit/ListAuditEvents": "viewer",
    # Rollouts
    "weir.control.v1.Rollouts/StartRollout": "deployer",
    "weir.control.v1.Rollouts/GetRollout": "viewer",
    "weir.control.v1.Rollouts/PauseRollout": "deployer",
    "weir.control.v1.Rollouts/ResumeRollout": "deployer",
    "weir.control.v1.Rollouts/AbortRollout": "deployer",
    "weir.control.v1.Rollouts/PromoteRollout": "deployer",
    "weir.control.v1.Rollouts/StartBlueGreen": "deployer",
    "weir.control.v1.Rollouts/SwitchBlueGreen": "deployer",
    "weir.control.v1.Rollouts/ApproveRollout": "approver",
    # Experiments
    "weir.control.v1.Experiments/StartABTest": "deployer",
    "weir.control.v1.Experiments/RecordOutcome": "deployer",
    "weir.control.v1.Experiments/RecordOutcomes": "deployer",
    "weir.control.v1.Experiments/GetABTest": "viewer",
    "weir.control.v1.Experiments/StopABTest": "deployer",
    # Features
    "weir.control.v1.Features/ApplyFeatures": "deployer",
    "weir.control.v1.Features/GetFeatures": "viewer",
    "weir.control.v1.Features/GetHistoricalFeatures": "viewer",
    "weir.control.v1.Features/Materialize": "deployer",
    "weir.control.v1.Features/PushFeatures": "deployer",
    "weir.control.v1.Features/GetOnlineFeatures": "viewer",  # feature values: read like historical ones
    # Training
    "weir.control.v1.Training/SubmitJob": "deployer",
    "weir.control.v1.Training/SubmitSweep": "deployer",
    "weir.control.v1.Training/GetJob": "viewer",
    "weir.control.v1.Training/ListJobs": "viewer",
    "weir.control.v1.Training/CancelJob": "deployer",
    "weir.control.v1.Training/StreamLogs": "viewer",  # and only the job's submitter or an admin (the service)
    "weir.control.v1.Training/StreamMetrics": "viewer",
    "weir.control.v1.Training/LogParams": "job-secret",
    "weir.control.v1.Training/LogMetrics": "job-secret",
    "weir.control.v1.Training/ReportProgress": "job-secret",
    # Monitoring
    "weir.control.v1.Monitoring/SetReference": "deployer",
    "weir.control.v1.Monitoring/SetMonitoringPolicy": "deployer",
    "weir.control.v1.Monitoring/GetMonitoringPolicy": "viewer",
    "weir.control.v1.Monitoring/GetDriftReport": "viewer",
    "weir.control.v1.Monitoring/RecordFeedback": "deployer",
}

# The data plane (KServe v2 / Triton GRPCInferenceService; weir serve, with tokens configured).
# ``inference``: open, or any person's token (viewer and up) with --require-inference-token.
DATA_PLANE: dict[str, str] = {
    "inference.GRPCInferenceService/ServerLive": "inference",
    "inference.GRPCInferenceService/ServerReady": "inference",
    "inference.GRPCInferenceService/ModelReady": "inference",
    "inference.GRPCInferenceService/ServerMetadata": "inference",
    "inference.GRPCInferenceService/ModelMetadata": "inference",
    "inference.GRPCInferenceService/ModelConfig": "inference",
    "inference.GRPCInferenceService/ModelStatistics": "inference",
    "inference.GRPCInferenceService/ModelInfer": "inference",
    "inference.GRPCInferenceService/ModelStreamInfer": "inference",
    "inference.GRPCInferenceService/RepositoryIndex": "viewer",
    "inference.GRPCInferenceService/RepositoryModelLoad": "deployer",
    "inference.GRPCInferenceService/RepositoryModelUnload": "deployer",
}

# Open on both planes: health and reflection.
OPEN_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection")


def allowed(entry: str, role: str, require_inference_token: bool = False) -> bool:
    """Whether ``role`` (one of ROLES) passes the token check for a method whose entry is ``entry``."""
    if entry == "inference":
        entry = "viewer" if require_inference_token else "open"
    if entry == "open":
        return True
    if entry == "job-secret" or role == "anonymous":
        return False
    if entry == "replica":
        return role in ("replica", "admin")
    if entry == "any-token":
        return True
    if role == "replica":
        return False
    return ORDERED.index(role) >= ORDERED.index(entry)


def markdown(table: dict[str, str], title: str) -> str:
    """The README's role table for one plane: one row per method, a column per role (``inference``
    rows: open / with --require-inference-token)."""
    lines = [
        f"**{title}**",
        "",
        "| method | needs | " + " | ".join(ROLES) + " |",
        "|---|---|" + "---|" * len(ROLES),
    ]
    for method, entry in table.items():
        short = method.split(".")[-1]
        marks = []
        for role in ROLES:
            plain, strict = allowed(entry, role), allowed(entry, role, require_inference_token=True)
            marks.append(("yes" if plain else "-") if plain == strict else "yes / -")
        lines.append(f"| `{short}` | {entry} | {' | '.join(marks)} |")
    return "\n".join(lines)
