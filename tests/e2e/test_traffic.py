"""Traffic policy across real processes: `weir control` and two `weir serve --control-plane`.

Sticky keys never flip variant while the canary's weight grows, and both replicas agree on every
key; responses name their variant; a kill switch takes effect on both replicas within one second;
pinning a variant needs a deployer's token.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.conftest import WeirProcess, free_port
from tests.e2e.test_control_plane import (
    CONFIG,
    ControlProcess,
    cli,
    scripted,
    start_control,
    start_replicas,
    wait_until,
)
from weir_proto.auth import client_metadata
from weir_proto.control.v1 import deployments_pb2, deployments_pb2_grpc, experiments_pb2, experiments_pb2_grpc

pytestmark = pytest.mark.timeout(600)
X = np.array([[1.0, 1.0, 1.0]], np.float32)
FACTORS = {"stable": 2.0, "canary": 3.0, "a": 2.0, "b": 3.0}


def ask(client: grpcclient.InferenceServerClient, headers: dict[str, str] | None = None, pin: str = "") -> str:
    """The variant that answered (checked against the answer itself)."""
    tensor = grpcclient.InferInput("INPUT__0", [1, 3], "FP32")
    tensor.set_data_from_numpy(X)
    parameters = {"weir_variant": pin} if pin else None
    result = client.infer("scale", [tensor], headers=headers, parameters=parameters, client_timeout=30)
    variant = result.get_response().parameters["weir_variant"].string_param
    assert np.allclose(result.as_numpy("OUTPUT__0"), X * FACTORS[variant]), variant
    return variant


def applied_everywhere(control: ControlProcess, revision: int) -> bool:
    with grpc.insecure_channel(control.address) as channel:
        replicas = deployments_pb2_grpc.DeploymentsStub(channel).ListReplicas(
            deployments_pb2.ListReplicasRequest(), metadata=client_metadata("t-replica"), timeout=10
        )
    return len(replicas.replicas) == 2 and all(r.status.applied_revision >= revision for r in replicas.replicas)


def set_traffic(control: ControlProcess, canary_weight: int) -> int:
    deployment = cli(
        control, "traffic", "scale", "--variant", f"stable=scale:1:{100 - canary_weight}",
        "--variant", f"canary=scale:2:{canary_weight}", "--key-header", "x-user",
    )  # fmt: skip
    revision = int(deployment["revision"])
    wait_until(lambda: applied_everywhere(control, revision), message=f"both replicas to apply revision {revision}")
    return revision


@pytest.fixture
def routed(
    tmp_path: Path,
) -> Iterator[tuple[ControlProcess, list[WeirProcess], list[grpcclient.InferenceServerClient]]]:
    control = start_control(tmp_path / "control", f"sqlite:///{tmp_path / 'control.db'}", free_port())
    replicas = start_replicas(control, tmp_path, heartbeat="0.5")
    clients = [grpcclient.InferenceServerClient(replica.grpc_url) for replica in replicas]
    config = tmp_path / "config.pbtxt"
    config.write_text(CONFIG)
    for factor in (2.0, 3.0):
        cli(control, "models", "push", "scale", str(scripted(tmp_path, factor)), "--config", str(config))
    try:
        yield control, replicas, clients
    finally:
        for client in clients:
            client.close()
        for replica in replicas:
            replica.terminate_and_wait()
        control.process.terminate()
        control.process.wait(timeout=30)


def test_sticky_keys_stay_on_a_growing_canary_on_every_replica(routed) -> None:
    control, _, clients = routed
    keys = [f"user-{index}" for index in range(150)]
    previous: set[str] = set()
    for weight in (10, 25, 50):
        set_traffic(control, weight)
        on_canary = set()
        for key in keys:
            answers = {ask(client, {"x-user": key}) for client in clients}
            assert len(answers) == 1, f"replicas disagree on {key}: {answers}"
            if answers == {"canary"}:
                on_canary.add(key)
        assert previous <= on_canary, f"keys left the canary at {weight}%: {sorted(previous - on_canary)}"
        assert abs(len(on_canary) / len(keys) - weight / 100) < 0.12, (weight, len(on_canary))
        previous = on_canary
    unkeyed = [ask(clients[0]) for _ in range(200)]
    assert 0.35 < unkeyed.count("canary") / len(unkeyed) < 0.65  # no key: spread by weight (50%)


def test_a_kill_switch_reaches_both_replicas_within_a_second(routed) -> None:
    control, _, clients = routed
    set_traffic(control, 50)
    with grpc.insecure_channel(control.address) as channel:
        deployments = deployments_pb2_grpc.DeploymentsStub(channel)
        deployments.SetFlag(
            deployments_pb2.SetFlagRequest(endpoint="scale", name="kill_switch", value="stable"),
            metadata=client_metadata("t-deployer"),
        )
        flipped = time.monotonic()
        for client in clients:
            while {ask(client, {"x-user": f"k{index}"}) for index in range(12)} != {"stable"}:
                assert time.monotonic() - flipped < 1.0, "the kill switch took more than a second"
                time.sleep(0.02)
        assert time.monotonic() - flipped < 1.0
        deployments.SetFlag(
            deployments_pb2.SetFlagRequest(endpoint="scale", name="kill_switch", value=""),
            metadata=client_metadata("t-deployer"),
        )
    wait_until(lambda: "canary" in {ask(clients[0]) for _ in range(30)}, timeout=10, message="the split to return")


def test_pinning_a_variant_needs_a_deployer(routed) -> None:
    control, _, clients = routed
    set_traffic(control, 0)
    assert ask(clients[1], {"authorization": "Bearer t-deployer"}, pin="canary") == "canary"
    with pytest.raises(InferenceServerException, match="PERMISSION_DENIED"):
        ask(clients[1], {"authorization": "Bearer t-replica"}, pin="canary")
    with pytest.raises(InferenceServerException, match="PERMISSION_DENIED"):
        ask(clients[1], pin="canary")
    assert {ask(clients[1]) for _ in range(20)} == {"stable"}  # weight 0: never chosen unpinned


def test_a_differing_shadow_is_reported_with_its_disagreement_rate_and_never_answers(routed, tmp_path) -> None:
    control, _, clients = routed
    config = tmp_path / "config.pbtxt"
    config.write_text(CONFIG)
    cli(control, "models", "push", "scale", str(scripted(tmp_path, -1.0)), "--config", str(config))  # version 3
    set_traffic(control, 0)
    revision = int(cli(control, "shadow", "start", "scale", "mirror=scale:3", "--percent", "100")["revision"])
    wait_until(lambda: applied_everywhere(control, revision), message="both replicas to load the shadow")

    tied = np.array([[1.0, 1.0, 1.0]], np.float32)  # argmax 0 for x*2 and x*-1 alike: agree
    distinct = np.array([[1.0, 5.0, 2.0]], np.float32)  # argmax 1 for x*2, 0 for x*-1: disagree
    sent = 0
    for client in clients:
        for index in range(20):
            x = tied if index % 2 else distinct
            tensor = grpcclient.InferInput("INPUT__0", [1, 3], "FP32")
            tensor.set_data_from_numpy(x)
            result = client.infer("scale", [tensor], client_timeout=30)
            assert result.get_response().parameters["weir_variant"].string_param == "stable"
            np.testing.assert_allclose(result.as_numpy("OUTPUT__0"), x * 2.0)  # callers get the primary
            sent += 1

    def status() -> dict:
        return cli(control, "shadow", "status", "scale", token="t-replica").get("mirror", {})

    wait_until(lambda: status().get("mirrored") == sent and status().get("rows") == sent, timeout=30,
               message="every mirrored request to be compared and reported")  # fmt: skip
    final = status()
    assert final["errors"] == 0 and final["dropped"] == 0 and final["replicas"] == 2
    assert final["disagreement"] == 0.5
    assert final["max_abs_diff"] == pytest.approx(15.0)  # |2*5 - (-5)|
    assert final["rows_within_tolerance"] == 0


def test_an_ab_test_attributes_outcomes_to_the_arm_that_served_and_finds_a_planted_lift(routed) -> None:
    control, _, clients = routed
    started = cli(control, "ab", "start", "scale", "--arm", "a=scale:1:50", "--arm", "b=scale:2:50",
                  "--metric", "converted", "--kind", "rate", "--key-header", "x-user")  # fmt: skip
    assert started["running"] is True
    revision = int(cli(control, "deployments", token="t-replica")["deployments"][0]["revision"])
    wait_until(lambda: applied_everywhere(control, revision), message="both replicas to route the A/B split")

    served = {}
    for index in range(400):
        key = f"user-{index}"
        served[key] = ask(clients[index % 2], {"x-user": key})
    assert 120 < sum(1 for arm in served.values() if arm == "b") < 280  # both arms get traffic
    with grpc.insecure_channel(control.address) as channel:
        experiments = experiments_pb2_grpc.ExperimentsStub(channel)
        metadata = client_metadata("t-deployer")
        draws = np.random.default_rng(1)
        for key, arm in served.items():
            converted = draws.random() < (0.45 if arm == "b" else 0.15)  # the planted lift: arm b
            reply = experiments.RecordOutcome(
                experiments_pb2.RecordOutcomeRequest(endpoint="scale", routing_key=key, value=float(converted)),
                metadata=metadata,
            )
            assert reply.variant == arm  # attributed to the arm that served the key
    status = cli(control, "ab", "status", "scale", token="t-replica")
    results = {result["variant"]: result for result in status["results"]}
    assert results["b"].get("significant") is True and results["b"]["difference"] > 0.15

    cli(control, "ab", "start", "scale", "--arm", "a=scale:1:50", "--arm", "b=scale:1:50",
        "--metric", "converted", "--kind", "rate", "--key-header", "x-user")  # fmt: skip  # an A/A test
    with grpc.insecure_channel(control.address) as channel:
        experiments = experiments_pb2_grpc.ExperimentsStub(channel)
        draws = np.random.default_rng(2)
        for index in range(400):
            experiments.RecordOutcome(
                experiments_pb2.RecordOutcomeRequest(
                    endpoint="scale", routing_key=f"user-{index}", value=float(draws.random() < 0.2)
                ),
                metadata=client_metadata("t-deployer"),
            )
    results = {r["variant"]: r for r in cli(control, "ab", "status", "scale", token="t-replica")["results"]}
    assert not results["b"].get("significant", False)
