"""docker/: the compose file and the Kubernetes manifests parse, every `weir` command line in them is
accepted by weir's own argument parser, and they set up what docker/README.md says: several
control-plane replicas on one database and one shared (ReadWriteMany) artifact volume, data planes
given every replica, a PodDisruptionBudget, readiness from the gRPC health service (which follows the
database) and liveness that does not. No image is built or run here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from weir.cli import build_parser

DOCKER = Path(__file__).resolve().parents[2] / "docker"


def k8s_objects() -> dict[tuple[str, str], dict[str, Any]]:
    objects = {}
    for path in sorted((DOCKER / "k8s").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            objects[(document["kind"], document["metadata"]["name"])] = document
    return objects


def compose_services() -> dict[str, dict[str, Any]]:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]


def compose_control_services() -> dict[str, dict[str, Any]]:
    return {
        name: service for name, service in compose_services().items() if service.get("command", [""])[0] == "control"
    }


def option(arguments: list[str], name: str) -> str:
    return arguments[arguments.index(name) + 1]


def weir_command_lines() -> list[tuple[str, list[str]]]:
    lines = [(f"compose {name}", service["command"]) for name, service in compose_services().items()
             if str(service.get("image", "")).startswith("weir:")]  # fmt: skip
    for (kind, name), document in k8s_objects().items():
        if kind == "Deployment":
            for container in document["spec"]["template"]["spec"]["containers"]:
                lines.append((f"k8s {name}/{container['name']}", container["args"]))
    return lines


@pytest.mark.parametrize(("where", "arguments"), weir_command_lines(), ids=lambda value: str(value)[:40])
def test_every_weir_command_line_parses(where: str, arguments: list[str]) -> None:
    try:
        build_parser().parse_args(arguments)
    except SystemExit as error:
        pytest.fail(f"{where}: `weir {' '.join(arguments)}` is refused by weir's parser (exit {error.code})")


def test_kubernetes_runs_two_control_plane_replicas_on_a_shared_volume_behind_a_disruption_budget() -> None:
    objects = k8s_objects()
    control = objects[("Deployment", "weir-control")]["spec"]
    assert control["replicas"] >= 2
    labels = control["selector"]["matchLabels"]
    pod = control["template"]["spec"]
    container = pod["containers"][0]
    port = int(option(container["args"], "--port"))
    assert container["readinessProbe"]["grpc"]["port"] == port  # health follows the database
    assert "grpc" not in container["livenessProbe"]  # a database outage must not restart the replicas

    state_dir = option(container["args"], "--state-dir")
    mount = next(each for each in container["volumeMounts"] if each["mountPath"] == state_dir)
    volume = next(each for each in pod["volumes"] if each["name"] == mount["name"])
    claim = objects[("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]

    budget = objects[("PodDisruptionBudget", "weir-control")]["spec"]
    assert budget["selector"]["matchLabels"] == labels and budget["minAvailable"] >= 1
    assert budget["minAvailable"] < control["replicas"]  # a drain can still proceed

    headless = objects[("Service", "weir-control-replicas")]["spec"]
    assert headless["clusterIP"] == "None" and headless["selector"] == labels
    data_plane = objects[("Deployment", "weir-data-plane")]["spec"]["template"]["spec"]["containers"][0]
    assert option(data_plane["args"], "--control-plane") == f"weir-control-replicas:{port}"
    assert ("PodDisruptionBudget", "weir-data-plane") in objects


def test_compose_runs_two_control_plane_replicas_and_gives_the_data_plane_every_one() -> None:
    services = compose_services()
    controls = compose_control_services()
    assert len(controls) >= 2
    assert len({service["environment"]["WEIR_DATABASE_URL"] for service in controls.values()}) == 1
    assert len({service["environment"]["WEIR_REPLICA_ID"] for service in controls.values()}) == len(controls)
    volumes = {
        next(
            volume for volume in service["volumes"] if volume.endswith(":" + option(service["command"], "--state-dir"))
        )
        for service in controls.values()
    }
    assert (
        len(volumes) == 1
        and volumes.pop().split(":")[0] in yaml.safe_load((DOCKER / "compose.yaml").read_text())["volumes"]
    )  # one named volume, the same for every replica
    addresses = {f"{name}:{option(service['command'], '--port')}" for name, service in controls.items()}
    data_plane = services["data-plane"]["command"]
    assert set(option(data_plane, "--control-plane").split(",")) == addresses


def test_the_readme_names_what_the_manifests_set_up() -> None:
    readme = (DOCKER / "README.md").read_text()
    names = (
        "ReadWriteMany",
        "PodDisruptionBudget",
        "weir-control-replicas",
        "NOT_SERVING",
        *compose_control_services(),
    )
    for name in names:
        assert name in readme, name
