"""The built-in trainer (`python -m weir_control.training.builtin`) as a real subprocess in local mode
(WEIR_JOB_DIR and WEIR_JOB_PARAMS, no control plane) on examples/training_data.py's churn data set:
training and export, the exported model on raw features, the enrichment config, per-epoch metrics,
early stopping, resuming from a checkpoint, two processes under torchrun, and bad parameters."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from training_data import build_training_data

from weir.enrichment import EnrichmentSpec
from weir.model_config import normalize_config, parse_config_text
from weir_control.features.offline import get_historical_features
from weir_proto.feature_definitions import load_definitions

ROWS = 1000
FEATURES = 4
TRAINER = ["-m", "weir_control.training.builtin"]
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


@dataclass(frozen=True)
class Data:
    definitions: Path
    entities: Path

    def params(self, **overrides: Any) -> dict[str, Any]:
        params: dict[str, Any] = {
            "entities": str(self.entities),
            "definitions": str(self.definitions),
            "feature_service": "churn",
            "label": "churned",
            "hidden": "32,16",
            "lr": 0.02,
            "batch_size": 128,
        }
        params.update(overrides)
        return params


@dataclass(frozen=True)
class Result:
    directory: Path
    returncode: int
    stdout: str
    stderr: str

    def metrics(self) -> dict[str, float]:
        loaded: dict[str, float] = json.loads((self.directory / "output" / "metrics.json").read_text())
        return loaded

    def epochs(self) -> list[dict[str, float]]:
        lines = (self.directory / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]


def train(directory: Path, params: dict[str, Any], launcher: list[str] | None = None) -> Result:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("WEIR_") and key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(WEIR_JOB_DIR=str(directory), WEIR_JOB_PARAMS=json.dumps(params), OMP_NUM_THREADS="1")
    directory.mkdir(parents=True, exist_ok=True)
    completed = subprocess.run(
        [sys.executable, *(launcher or []), *TRAINER],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return Result(directory, completed.returncode, completed.stdout, completed.stderr)


def succeeded(result: Result) -> Result:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Data:
    definitions, entities = build_training_data(tmp_path_factory.mktemp("churn-data"), rows=ROWS, seed=0)
    return Data(definitions, entities)


@pytest.fixture(scope="module")
def trained(data: Data, tmp_path_factory: pytest.TempPathFactory) -> Result:
    """One 6-epoch run (patience high enough not to stop early), shared by the read-only tests."""
    return train(tmp_path_factory.mktemp("job") / "run", data.params(epochs=6, patience=10, monitoring_sample_rate=0.5))


def training_table(data: Data) -> tuple[np.ndarray, np.ndarray]:
    """(raw features, labels) as the feature store returns them, rows with missing features dropped."""
    table = get_historical_features(load_definitions(data.definitions), "churn", pq.read_table(data.entities))
    table = table.drop_null()
    names = ["orders_30d", "spend_30d", "days_since_last_order", "support_tickets"]
    features = np.column_stack([table[name].to_numpy() for name in names]).astype(np.float32)
    return features, table["churned"].to_numpy()


def test_trains_and_reports_every_epoch(trained: Result) -> None:
    succeeded(trained)
    metrics = trained.metrics()
    assert metrics["val_accuracy"] > 0.9, metrics
    assert metrics["epochs_run"] == 6
    assert 1 <= metrics["best_epoch"] <= 6
    assert metrics["rows_dropped"] == ROWS // 100  # customers without features: null features, dropped
    assert metrics["rows"] == ROWS - metrics["rows_dropped"]
    assert f"dropped {ROWS // 100} rows" in trained.stdout

    epochs = trained.epochs()
    assert [epoch["step"] for epoch in epochs] == list(range(6))
    assert all({"loss", "val_loss", "val_accuracy"} <= epoch.keys() for epoch in epochs)
    best = epochs[int(metrics["best_epoch"]) - 1]
    assert best["val_loss"] == pytest.approx(metrics["val_loss"]) == min(epoch["val_loss"] for epoch in epochs)

    (params,) = [json.loads(line) for line in (trained.directory / "params.jsonl").read_text().splitlines()]
    assert len(params["dataset_hash"]) == 64 and int(params["dataset_hash"], 16) >= 0
    assert params["params"]["feature_service"] == "churn" and params["params"]["epochs"] == "6"
    assert list((trained.directory / "checkpoints").glob("checkpoint-*.pt"))
    assert (trained.directory / "artifacts" / "model.pt2").is_file()


def test_exported_model_takes_raw_features(trained: Result, data: Data) -> None:
    succeeded(trained)
    features, labels = training_table(data)
    model = torch.jit.load(str(trained.directory / "output" / "model.pt"))
    with torch.no_grad():
        probabilities = model(torch.from_numpy(features[:64]))
    assert probabilities.dtype == torch.float32 and probabilities.shape == (64, 2)
    assert torch.allclose(probabilities.sum(dim=1), torch.ones(64))
    with torch.no_grad():
        predicted = model(torch.from_numpy(features)).argmax(dim=1).numpy()
    assert (predicted == labels).mean() > 0.9  # classes [0, 1]: index == label

    program = torch.export.load(str(trained.directory / "artifacts" / "model.pt2")).module()
    with torch.no_grad():
        assert torch.allclose(program(torch.from_numpy(features[:5])), probabilities[:5], atol=1e-5)


def test_the_drift_reference_holds_the_models_predictions_not_the_labels(trained: Result) -> None:
    """Issue 15, item 2: the reference's PROBABILITIES.argmax held the training labels, whose class
    shares differ from the model's predictions, so unshifted traffic raised prediction drift."""
    succeeded(trained)
    reference = pq.read_table(trained.directory / "output" / "reference.parquet")
    feature_columns = [name for name in reference.column_names if name != "PROBABILITIES.argmax"]
    features = np.stack([reference.column(name).to_numpy() for name in feature_columns], axis=1).astype(np.float32)
    model = torch.jit.load(str(trained.directory / "output" / "model.pt"))
    with torch.no_grad():
        predicted = [str(index) for index in model(torch.from_numpy(features)).argmax(dim=1).tolist()]
    assert reference.column("PROBABILITIES.argmax").to_pylist() == predicted


def test_config_enriches_by_entity_key(trained: Result) -> None:
    succeeded(trained)
    text = (trained.directory / "output" / "config.pbtxt").read_text()
    config = normalize_config(parse_config_text(text, "config.pbtxt"), "churn_model")
    assert not parse_config_text(text, "config.pbtxt").name  # the registry names it
    assert config.platform == "pytorch_libtorch" and config.max_batch_size == 64
    assert [(tensor.name, list(tensor.dims)) for tensor in config.input] == [("FEATURES", [FEATURES])]
    assert [(tensor.name, list(tensor.dims)) for tensor in config.output] == [("PROBABILITIES", [2])]
    spec = EnrichmentSpec.from_config(config)
    assert spec is not None and spec.service == "churn" and spec.feature_input == "FEATURES"
    assert json.loads(config.parameters["weir_classes"].string_value) == [0, 1]
    # the job's monitoring_sample_rate reaches the data plane's drift sampling (issue 15: the loop's windows)
    assert config.parameters["weir_monitoring_sample_rate"].string_value == "0.5"


def test_resumes_from_the_last_checkpoint(trained: Result, data: Data, tmp_path: Path) -> None:
    succeeded(trained)
    directory = tmp_path / "run"
    shutil.copytree(trained.directory, directory)
    resumed = succeeded(train(directory, data.params(epochs=8, patience=10)))
    assert "resumed from checkpoint at epoch 6/8" in resumed.stdout
    assert [epoch["step"] for epoch in resumed.epochs()] == list(range(8))  # 6 from before, 2 new
    assert resumed.metrics()["epochs_run"] == 8
    hashes = {json.loads(line)["dataset_hash"] for line in (directory / "params.jsonl").read_text().splitlines()}
    assert len(hashes) == 1  # the same training table, the same hash


def test_early_stopping(data: Data, tmp_path: Path) -> None:
    result = succeeded(train(tmp_path / "run", data.params(epochs=40, patience=1, lr=0.05)))
    metrics = result.metrics()
    assert metrics["early_stopped"] == 1 and "early stopping" in result.stdout
    assert metrics["epochs_run"] < 40
    assert metrics["epochs_run"] == metrics["best_epoch"] + 1  # patience 1: the first epoch without improvement
    assert len(result.epochs()) == metrics["epochs_run"]
    assert metrics["val_accuracy"] > 0.9


def test_regression(data: Data, tmp_path: Path) -> None:
    result = succeeded(train(tmp_path / "run", data.params(task="regression", epochs=3)))
    metrics = result.metrics()
    assert "val_rmse" in metrics and metrics["val_rmse"] < 0.5  # of a 0/1 target
    config = parse_config_text((result.directory / "output" / "config.pbtxt").read_text(), "config.pbtxt")
    assert [(tensor.name, list(tensor.dims)) for tensor in config.output] == [("PREDICTION", [1])]
    model = torch.jit.load(str(result.directory / "output" / "model.pt"))
    with torch.no_grad():
        assert model(torch.from_numpy(training_table(data)[0][:7])).shape == (7, 1)


def test_two_processes_under_torchrun(data: Data, tmp_path: Path) -> None:
    result = succeeded(train(tmp_path / "run", data.params(epochs=4, patience=10), launcher=TORCHRUN))
    metrics = result.metrics()
    assert metrics["epochs_run"] == 4 and metrics["val_accuracy"] > 0.85
    assert [epoch["step"] for epoch in result.epochs()] == list(range(4))  # rank 0 alone reports
    assert len((result.directory / "params.jsonl").read_text().splitlines()) == 1
    assert (result.directory / "output" / "model.pt").is_file()


@pytest.mark.parametrize(
    ("change", "parameter"),
    [
        ({"entities": None}, "entities"),
        ({"label": "no_such_column"}, "label"),
        ({"task": "ranking"}, "task"),
        ({"hidden": "64,x"}, "hidden"),
        ({"feature_service": "no_such_service"}, "feature_service"),
        ({"monitoring_sample_rate": 1.5}, "monitoring_sample_rate"),
    ],
)
def test_bad_parameters_name_the_parameter(data: Data, tmp_path: Path, change: dict[str, Any], parameter: str) -> None:
    params = {key: value for key, value in (data.params() | change).items() if value is not None}
    result = train(tmp_path / "run", params)
    assert result.returncode != 0
    assert f"parameter '{parameter}'" in result.stderr, result.stderr
    assert not (tmp_path / "run" / "output" / "model.pt").exists()


def test_stop_request_ends_after_the_epoch(data: Data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In this process (a stop request needs a control plane's answer, simulated here), with the
    definitions at their default place: the job directory's features.toml, as the job runner writes it."""
    from weir_control import tracking
    from weir_control.training import builtin

    directory = tmp_path / "run"
    directory.mkdir()
    text = data.definitions.read_text()
    (directory / "features.toml").write_text(f"base_directory = {json.dumps(str(data.definitions.parent))}\n{text}")
    params = {key: value for key, value in data.params(epochs=10, patience=10).items() if key != "definitions"}
    monkeypatch.setenv("WEIR_JOB_DIR", str(directory))
    monkeypatch.setenv("WEIR_JOB_PARAMS", json.dumps(params))
    for name in ("WEIR_CONTROL_PLANE", "WEIR_JOB_ID", "WEIR_CHECKPOINT_EVERY", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    reported = tracking.Run.progress

    def progress(run: tracking.Run, epoch: int = 0, total_epochs: int = 0, step: int = 0, message: str = "") -> None:
        reported(run, epoch=epoch, total_epochs=total_epochs, step=step, message=message)
        run.stop_requested = run.stop_requested or epoch >= 2  # the control plane's answer to the 2nd report

    monkeypatch.setattr(tracking.Run, "progress", progress)
    assert builtin.main() == 0
    result = Result(directory, 0, "", "")
    metrics = result.metrics()
    assert metrics["stop_requested"] == 1 and metrics["epochs_run"] == 2
    assert len(result.epochs()) == 2
    assert torch.load(sorted((directory / "checkpoints").glob("*.pt"))[-1], weights_only=True)["epoch"] == 1
