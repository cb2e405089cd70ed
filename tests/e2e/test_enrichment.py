"""Request enrichment end to end: `weir serve` with feature definitions and an online store
(embedded SQLite, then Redis), a model fed by a feature service; clients send only the entity key.
Missing entities are NOT_FOUND naming the key (or get configured defaults); a stopped Redis is a
clear UNAVAILABLE, and serving recovers when it returns."""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.conftest import free_port, start_redis_server, start_weir, write_torchscript_model
from weir_control.features.definitions import load_definitions
from weir_control.features.materialize import materialize
from weir_proto.online_store import RedisOnlineStore, SqliteOnlineStore

UTC = datetime.UTC
DEFINITIONS = """
[[entity]]
name = "driver"
join_keys = ["driver_id"]
value_type = "INT64"

[[feature_view]]
name = "driver_stats"
entities = ["driver"]
source = "stats"
features = [{ name = "trips", dtype = "INT64" }, { name = "rating", dtype = "FLOAT64" }]

[[feature_service]]
name = "ranking"
features = ["driver_stats:trips", "driver_stats:rating"]
"""


class Score(torch.nn.Module):
    """score = trips * 10 + rating (and a bias input the client sends itself)."""

    def forward(self, bias: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return features[:, 0:1] * 10.0 + features[:, 1:2] + bias


def config(default: str = "") -> str:
    extra = f'parameters {{ key: "weir_feature_default" value: {{ string_value: "{default}" }} }}' if default else ""
    return f"""
max_batch_size: 8
input [ {{ name: "BIAS" data_type: TYPE_FP32 dims: [ 1 ] }}, {{ name: "FEATURES" data_type: TYPE_FP32 dims: [ 2 ] }} ]
output [ {{ name: "SCORE" data_type: TYPE_FP32 dims: [ 1 ] }} ]
parameters {{ key: "weir_feature_service" value: {{ string_value: "ranking" }} }}
parameters {{ key: "weir_feature_input" value: {{ string_value: "FEATURES" }} }}
{extra}
"""


def setup_features(tmp_path: Path) -> Path:
    (tmp_path / "stats").mkdir()
    pq.write_table(
        pa.table(
            {
                "driver_id": [1, 2],
                "event_timestamp": [datetime.datetime(2026, 11, 1, tzinfo=UTC)] * 2,
                "trips": [3, 7],
                "rating": [4.5, 3.0],
            }
        ),
        tmp_path / "stats" / "part-0.parquet",
    )
    (tmp_path / "features.toml").write_text(DEFINITIONS)
    return tmp_path / "features.toml"


def score(client: grpcclient.InferenceServerClient, model: str, entity: object) -> float:
    bias = grpcclient.InferInput("BIAS", [1, 1], "FP32")
    bias.set_data_from_numpy(np.array([[0.25]], np.float32))
    result = client.infer(model, [bias], parameters={"entity_key": entity}, client_timeout=30)
    return float(result.as_numpy("SCORE")[0, 0])


def materialize_into(store, definitions_file: Path) -> None:  # type: ignore[no-untyped-def]
    materialize(
        load_definitions(definitions_file), store, datetime.datetime(2026, 1, 1, tzinfo=UTC),
        datetime.datetime(2027, 1, 1, tzinfo=UTC),
    )  # fmt: skip
    store.close()


def test_a_model_gets_its_features_from_the_embedded_online_store(tmp_path: Path) -> None:
    definitions_file = setup_features(tmp_path)
    materialize_into(SqliteOnlineStore(tmp_path / "online.db"), definitions_file)
    repository = tmp_path / "repository"
    write_torchscript_model(repository, "score", Score(), config())
    write_torchscript_model(repository, "score_default", Score(), config(default="0"))
    server = start_weir(repository, "--feature-definitions", str(definitions_file))
    try:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        assert score(client, "score", 1) == pytest.approx(3 * 10 + 4.5 + 0.25)
        assert score(client, "score", "2") == pytest.approx(7 * 10 + 3.0 + 0.25)
        with pytest.raises(InferenceServerException) as missing:
            score(client, "score", 99)
        assert "NOT_FOUND" in str(missing.value) and "entity '99'" in str(missing.value)
        assert score(client, "score_default", 99) == pytest.approx(0.25)  # configured default
        with pytest.raises(InferenceServerException, match="expected the entity key"):
            bias = grpcclient.InferInput("BIAS", [1, 1], "FP32")
            bias.set_data_from_numpy(np.array([[0.25]], np.float32))
            client.infer("score", [bias])
        client.close()
    finally:
        assert server.terminate_and_wait() == 0


def test_redis_stopped_is_unavailable_and_serving_recovers(tmp_path: Path) -> None:
    definitions_file = setup_features(tmp_path)
    port = free_port()
    redis_server = start_redis_server(port)
    url = f"redis://127.0.0.1:{port}/0"
    materialize_into(RedisOnlineStore(url), definitions_file)
    repository = tmp_path / "repository"
    write_torchscript_model(repository, "score", Score(), config())
    server = start_weir(repository, "--feature-definitions", str(definitions_file), "--online-store", url)
    try:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        assert score(client, "score", 1) == pytest.approx(34.75)
        redis_server.terminate()
        redis_server.wait(timeout=10)
        time.sleep(1.1)  # past the in-process cache's lifetime
        with pytest.raises(InferenceServerException) as unavailable:
            score(client, "score", 1)
        assert "UNAVAILABLE" in str(unavailable.value) and "online store (Redis)" in str(unavailable.value)
        redis_server = start_redis_server(port)
        materialize_into(RedisOnlineStore(url), definitions_file)  # this Redis keeps nothing on disk
        assert score(client, "score", 2) == pytest.approx(73.25)
        client.close()
    finally:
        assert server.terminate_and_wait() == 0
        redis_server.terminate()
        redis_server.wait(timeout=10)


def test_definitions_applied_on_the_control_plane_reach_the_data_plane(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    from tests.e2e.test_control_plane import cli, start_control, start_replicas, wait_until

    definitions_file = setup_features(tmp_path)
    online = tmp_path / "online.db"
    control = start_control(
        tmp_path / "control", f"sqlite:///{tmp_path / 'control.db'}", free_port(), "--online-store", str(online),
        "--feature-root", str(tmp_path),
    )  # fmt: skip
    replicas = start_replicas(control, tmp_path)
    try:
        staging = tmp_path / "staging"
        write_torchscript_model(staging, "score", Score(), config())
        (tmp_path / "score.pbtxt").write_text(config())
        cli(control, "models", "push", "score", str(staging / "score" / "1" / "model.pt"),
            "--config", str(tmp_path / "score.pbtxt"))  # fmt: skip
        cli(control, "deploy", "score", "score", "1")
        applied = subprocess.run(
            [sys.executable, "-m", "weir.cli", "features", "apply", str(definitions_file), "--control-plane",
             control.address, "--token", "t-deployer", "--json"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert applied.returncode == 0, applied.stdout + applied.stderr
        assert json.loads(applied.stdout)["feature_services"] == ["ranking"]
        materialized = subprocess.run(
            [sys.executable, "-m", "weir.cli", "features", "materialize", str(definitions_file), "2026-01-01T00:00",
             "2027-01-01T00:00", "--online-store", str(online), "--json"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert materialized.returncode == 0, materialized.stdout + materialized.stderr
        for replica in replicas:
            client = grpcclient.InferenceServerClient(replica.grpc_url)
            wait_until(lambda client=client: score(client, "score", 2) == pytest.approx(73.25),
                       message="the replica to enrich with the applied definitions")  # fmt: skip
            client.close()
    finally:
        for replica in replicas:
            replica.terminate_and_wait()
        control.process.terminate()
        control.process.wait(timeout=30)


def test_a_built_in_trained_model_is_served_by_entity_key_alone(tmp_path: Path) -> None:
    """Issue 15, item 1: the built-in trainer's model has one input, FEATURES, filled from the online
    store; tritonclient's typed path with no inputs at all and only parameters={"entity_key": ...}
    answered INTERNAL (the [1, n] lookup's nested list into fp32_contents: "must be real number, not
    list"). Several keys answer the model's own output on the key's features; a missing key is
    NOT_FOUND naming it."""
    import shutil

    from training_data import build_training_data  # examples/ (on the path: tests/conftest.py)

    from tests.controlplane.test_builtin_trainer import succeeded, train

    definitions_file, entities = build_training_data(tmp_path / "churn", rows=300)
    params = {"entities": str(entities), "definitions": str(definitions_file), "feature_service": "churn",
              "label": "churned", "epochs": 2, "hidden": "8"}  # fmt: skip
    run = succeeded(train(tmp_path / "job", params))
    repository = tmp_path / "repository"
    (repository / "churn" / "1").mkdir(parents=True)
    shutil.copy(run.directory / "output" / "model.pt", repository / "churn" / "1" / "model.pt")
    shutil.copy(run.directory / "output" / "config.pbtxt", repository / "churn" / "config.pbtxt")
    definitions = load_definitions(definitions_file)
    online = SqliteOnlineStore(tmp_path / "online.db")
    materialize(
        definitions, online, datetime.datetime(2023, 1, 1, tzinfo=UTC), datetime.datetime(2025, 1, 1, tzinfo=UTC)
    )
    features = {}
    for key in ("1", "17", "250"):
        found = online.read(key, {"customer_stats": {name: "FLOAT64" for name in FEATURE_NAMES}})
        features[key] = [float(found["customer_stats"][1][name]) for name in FEATURE_NAMES]
    online.close()
    assert list(definitions.services["churn"].features) == [("customer_stats", name) for name in FEATURE_NAMES]
    model = torch.jit.load(str(repository / "churn" / "1" / "model.pt"))
    server = start_weir(repository, "--feature-definitions", str(definitions_file), "--online-store",
                        str(tmp_path / "online.db"))  # fmt: skip
    try:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        for key, values in features.items():
            result = client.infer("churn", [], parameters={"entity_key": key}, client_timeout=30)
            with torch.no_grad():
                expected = model(torch.tensor([values], dtype=torch.float32)).numpy()
            np.testing.assert_allclose(result.as_numpy("PROBABILITIES"), expected, rtol=1e-5, atol=1e-6)
        with pytest.raises(InferenceServerException) as missing:
            client.infer("churn", [], parameters={"entity_key": "99999"}, client_timeout=30)
        assert "NOT_FOUND" in str(missing.value) and "entity '99999'" in str(missing.value), str(missing.value)
        assert "INTERNAL" not in str(missing.value)
        with pytest.raises(InferenceServerException) as keyless:
            client.infer("churn", [], client_timeout=30)
        assert "INVALID_ARGUMENT" in str(keyless.value) and "parameters['entity_key']" in str(keyless.value)
        client.close()
    finally:
        assert server.terminate_and_wait() == 0


FEATURE_NAMES = ["orders_30d", "spend_30d", "days_since_last_order", "support_tickets"]
