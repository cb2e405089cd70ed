"""Weir's built-in trainer (``builtin:mlp``): an MLP on a feature service's point-in-time training table.

    WEIR_JOB_PARAMS='{"entities": "entities.parquet", "feature_service": "churn", "label": "churned"}' \\
        python -m weir_control.training.builtin          # or: torchrun --nproc-per-node N -m ...

Parameters (``run.parameters``; defaults in brackets):

  entities        Parquet file with the entity join keys, ``event_timestamp`` and the label column
  feature_service the feature service whose features are the model's inputs, in the service's order
  label           the label column of ``entities``
  task            classification | regression [classification]
  hidden          hidden layer widths, e.g. "64,32" [64,32]; "" for none (a linear model)
  epochs [20], lr [0.01] (Adam), batch_size [256] (per process), seed [0]
  patience [3]    epochs without a validation-loss improvement (by more than min_delta [0]) before stopping
  val_fraction    share of the rows held out for validation [0.2]
  definitions     feature definitions TOML [<job directory>/features.toml, written by the job runner]
  epoch_sleep     seconds to sleep after each epoch [0] (tests use it to stop a job mid-run)
  monitoring_sample_rate  the share of requests (0 to 1) the data plane samples for drift monitoring,
                  written into the exported config [unset: the data plane's default]

The training table comes from ``get_historical_features`` (rows with a null or NaN feature or label are
dropped and counted); its SHA-256 as an Arrow IPC stream is the run's dataset hash. The split is by
``seed``; feature means and standard deviations of the training rows live inside the model as buffers,
so the exported model takes raw feature values. Classification predicts the sorted distinct label
values (recorded in the config's ``weir_classes`` parameter); regression standardises its target
during training (``loss`` and ``val_loss`` are on that scale, ``val_rmse`` on the label's own) and
undoes that in the exported model.

Under torchrun (WORLD_SIZE > 1) the ranks train one DistributedDataParallel model on gloo, each on its
DistributedSampler shard; every rank evaluates the whole validation set and rank 0's result (with
its stop flag) is broadcast, so all ranks take the same early-stopping decision. A checkpoint (every
``run.should_checkpoint(epoch)`` and at the end) holds the model, the optimizer and the early-stopping
state; a new attempt resumes from it when it was made for the same data and architecture.

Rank 0 writes into ``run.output_dir``: ``model.pt`` (TorchScript, the best epoch's weights; FP32
FEATURES [batch, n_features] -> PROBABILITIES [batch, n_classes] or PREDICTION [batch, 1]),
``config.pbtxt`` (with the enrichment parameters, so the data plane fills FEATURES from the online
store by entity key) and ``metrics.json`` (the best epoch's metrics, plus best_epoch and epochs_run
counted from 1, and the row counts; metrics.jsonl's steps are epochs counted from 0); a torch.export
``model.pt2`` goes to the run's artifacts. Bad parameters end the process with status 2 and a message naming the
parameter.
"""

import hashlib
import json
import logging
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler, TensorDataset

from weir_control import tracking
from weir_control.features.offline import ENTITY_TIMESTAMP, get_historical_features
from weir_control.training.builtin_params import KNOWN, ParameterError, Settings, parse_parameters
from weir_proto.errors import WeirError
from weir_proto.feature_definitions import Definitions, load_definitions

log = logging.getLogger("weir_control.training.builtin")

MAX_BATCH_SIZE = 64
INPUT_NAME = "FEATURES"
OUTPUT_NAMES = {"classification": "PROBABILITIES", "regression": "PREDICTION"}
EXIT_BAD_PARAMETERS = 2


# --- data ----------------------------------------------------------------------------------------


@dataclass
class Dataset:
    table: pa.Table  # the training table, rows with missing values dropped
    feature_names: list[str]
    features: np.ndarray  # float32 [rows, n_features]
    targets: np.ndarray  # int64 class indices, or float32 values
    classes: list[Any]  # classification: the sorted distinct labels
    dropped: int
    dataset_hash: str


def _read_entities(settings: Settings) -> pa.Table:
    if not settings.entities.is_file():
        raise ParameterError("entities", f"expected a Parquet file, {settings.entities} does not exist")
    try:
        entities = pq.read_table(settings.entities)
    except (OSError, pa.ArrowException) as error:
        raise ParameterError("entities", f"cannot read {settings.entities} as Parquet: {error}") from error
    if ENTITY_TIMESTAMP not in entities.column_names:
        raise ParameterError(
            "entities", f"{settings.entities} has no column '{ENTITY_TIMESTAMP}' (columns: {entities.column_names})"
        )
    if settings.label not in entities.column_names:
        raise ParameterError(
            "label", f"{settings.entities} has no column '{settings.label}' (columns: {entities.column_names})"
        )
    return entities


def _read_definitions(settings: Settings) -> Definitions:
    if not settings.definitions.is_file():
        raise ParameterError(
            "definitions", f"expected a feature definitions TOML, {settings.definitions} does not exist"
        )
    try:
        definitions = load_definitions(settings.definitions)
    except WeirError as error:
        raise ParameterError("definitions", error.message) from error
    service = definitions.services.get(settings.feature_service)
    if service is None:
        raise ParameterError(
            "feature_service",
            f"no feature service '{settings.feature_service}' in {settings.definitions} "
            f"(services: {sorted(definitions.services)})",
        )
    keys = {key for view, _ in service.features for key in definitions.join_keys(definitions.views[view])}
    if settings.label in keys | {ENTITY_TIMESTAMP}:
        raise ParameterError(
            "label", f"'{settings.label}' is a join key or the event timestamp, not a label (join keys: {sorted(keys)})"
        )
    return definitions


def dataset_hash(table: pa.Table) -> str:
    """SHA-256 of ``table`` as one Arrow IPC stream (chunking and schema metadata do not count)."""
    table = table.combine_chunks().replace_schema_metadata(None)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()


def _present(column: pa.ChunkedArray) -> pa.ChunkedArray:
    valid = pc.is_valid(column)
    if pa.types.is_floating(column.type):
        valid = pc.and_(valid, pc.invert(pc.fill_null(pc.is_nan(column), True)))
    return valid


def load_dataset(settings: Settings) -> Dataset:
    entities = _read_entities(settings)
    definitions = _read_definitions(settings)
    try:
        table = get_historical_features(definitions, settings.feature_service, entities)
    except WeirError as error:
        raise ParameterError("feature_service", error.message) from error
    except duckdb.Error as error:
        raise ParameterError(
            "feature_service", f"cannot read the features of '{settings.feature_service}': {error}"
        ) from error
    feature_names = [name for name in table.column_names if name not in entities.column_names]
    if not feature_names:
        raise ParameterError(
            "feature_service",
            f"'{settings.feature_service}' adds no columns to the entity rows (its features share names with "
            f"the columns of {settings.entities}: {entities.column_names})",
        )
    for name in feature_names:
        kind = table.schema.field(name).type
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)):
            raise ParameterError(
                "feature_service",
                f"feature '{name}' of '{settings.feature_service}' is {kind}; the built-in trainer takes numbers",
            )
    label_type = table.schema.field(settings.label).type
    numeric_label = pa.types.is_integer(label_type) or pa.types.is_floating(label_type)
    if settings.task == "regression" and not numeric_label:
        raise ParameterError("label", f"regression needs a numeric label, '{settings.label}' is {label_type}")

    features_present = _present(table[feature_names[0]])
    for name in feature_names[1:]:
        features_present = pc.and_(features_present, _present(table[name]))
    label_present = _present(table[settings.label])
    keep = pc.and_(features_present, label_present)
    filtered = table.filter(keep)
    dropped = table.num_rows - filtered.num_rows
    if filtered.num_rows < 2:
        raise ParameterError(
            "entities",
            f"{filtered.num_rows} usable rows of {table.num_rows} (the rest lack a feature or the label); "
            "training needs at least 2",
        )

    features = np.column_stack(
        [filtered[name].cast(pa.float64()).to_numpy().astype(np.float32) for name in feature_names]
    )
    labels = filtered[settings.label]
    classes: list[Any] = []
    if settings.task == "classification":
        if pa.types.is_floating(label_type):
            values = labels.to_numpy()
            if not np.all(np.equal(np.mod(values, 1), 0)):
                raise ParameterError(
                    "task", f"classification needs discrete labels, '{settings.label}' has fractional values"
                )
        classes = sorted(pc.unique(labels).to_pylist())
        if len(classes) < 2:
            raise ParameterError(
                "label", f"classification needs 2 or more distinct values, '{settings.label}' has {classes}"
            )
        targets = pc.index_in(labels, value_set=pa.array(classes, type=label_type)).to_numpy().astype(np.int64)
    else:
        targets = labels.cast(pa.float64()).to_numpy().astype(np.float32)
    return Dataset(filtered, feature_names, features, targets, classes, dropped, dataset_hash(filtered))


def split(rows: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) row indices, the same for a seed on every rank and every attempt."""
    order = np.random.default_rng(seed).permutation(rows)
    validation = min(rows - 1, max(1, round(rows * val_fraction)))
    return np.sort(order[validation:]), np.sort(order[:validation])


# --- model ---------------------------------------------------------------------------------------


class Network(nn.Module):
    """An MLP over standardised features; the standardisation is part of the model."""

    feature_mean: torch.Tensor
    feature_std: torch.Tensor

    def __init__(self, n_features: int, hidden: tuple[int, ...], n_outputs: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = n_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, n_outputs))
        self.layers = nn.Sequential(*layers)
        self.register_buffer("feature_mean", torch.zeros(n_features))
        self.register_buffer("feature_std", torch.ones(n_features))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers((features - self.feature_mean) / self.feature_std)


class Probabilities(nn.Module):
    def __init__(self, network: Network) -> None:
        super().__init__()
        self.network = network

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.network(features), dim=1)


class Prediction(nn.Module):
    target_mean: torch.Tensor
    target_std: torch.Tensor

    def __init__(self, network: Network, target_mean: float, target_std: float) -> None:
        super().__init__()
        self.network = network
        self.register_buffer("target_mean", torch.tensor(target_mean, dtype=torch.float32))
        self.register_buffer("target_std", torch.tensor(target_std, dtype=torch.float32))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.network(features) * self.target_std + self.target_mean


def _standardisation(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = values.astype(np.float64).mean(axis=0)
    std = values.astype(np.float64).std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)
    return mean, std


# --- training ------------------------------------------------------------------------------------


@dataclass
class Progress:
    epoch: int = -1  # the last completed epoch
    best_val_loss: float = math.inf
    best_epoch: int = -1
    best_model: dict[str, torch.Tensor] | None = None
    best_metrics: dict[str, float] | None = None
    epochs_without_improvement: int = 0


def _say(run: tracking.Run, message: str) -> None:
    if run.is_main:
        print(message, flush=True)


def _clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in state.items()}


def _evaluate(
    network: Network, settings: Settings, features: torch.Tensor, targets: torch.Tensor, target_std: float
) -> tuple[float, float]:
    """(validation loss, val_accuracy or val_rmse) on the whole validation set."""
    network.eval()
    with torch.no_grad():
        outputs = network(features)
        if settings.task == "classification":
            loss = nn.functional.cross_entropy(outputs, targets)
            metric = (outputs.argmax(dim=1) == targets).float().mean()
            return float(loss), float(metric)
        loss = nn.functional.mse_loss(outputs.squeeze(1), targets)
        return float(loss), float(loss.sqrt()) * target_std


def train(run: tracking.Run, settings: Settings, data: Dataset) -> None:
    distributed = run.world_size > 1
    torch.manual_seed(settings.seed)
    train_rows, val_rows = split(len(data.features), settings.val_fraction, settings.seed)
    classification = settings.task == "classification"
    n_features = len(data.feature_names)
    n_outputs = len(data.classes) if classification else 1

    feature_mean, feature_std = _standardisation(data.features[train_rows])
    target_mean, target_std = 0.0, 1.0
    if not classification:
        mean, std = _standardisation(data.targets[train_rows, None])
        target_mean, target_std = float(mean[0]), float(std[0])
    features = torch.from_numpy(data.features)
    if classification:
        targets = torch.from_numpy(data.targets)
    else:
        targets = torch.from_numpy(((data.targets - target_mean) / target_std).astype(np.float32))
    x_train, y_train = features[train_rows], targets[train_rows]
    x_val, y_val = features[val_rows], targets[val_rows]

    network = Network(n_features, settings.hidden, n_outputs)
    network.feature_mean.copy_(torch.from_numpy(feature_mean))
    network.feature_std.copy_(torch.from_numpy(feature_std))
    optimizer = torch.optim.Adam(network.parameters(), lr=settings.lr)
    signature = {
        "dataset_hash": data.dataset_hash,
        "task": settings.task,
        "hidden": list(settings.hidden),
        "features": data.feature_names,
        "classes": data.classes,
        "val_fraction": settings.val_fraction,
        "seed": settings.seed,
    }

    progress = Progress()
    state = run.load_checkpoint()
    if state is not None and state.get("signature") != signature:
        _say(run, "the checkpoint was made for other data or another architecture; starting from scratch")
        state = None
    if state is not None:
        network.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:
            group["lr"] = settings.lr
        progress = Progress(
            epoch=state["epoch"],
            best_val_loss=state["best_val_loss"],
            best_epoch=state["best_epoch"],
            best_model=state["best_model"],
            best_metrics=state["best_metrics"],
            epochs_without_improvement=state["epochs_without_improvement"],
        )
        _say(
            run,
            f"resumed from checkpoint at epoch {progress.epoch + 1}/{settings.epochs} "
            f"(continuing with epoch {progress.epoch + 2})",
        )
    if distributed:
        dist.barrier()  # every rank has read the checkpoint before rank 0 writes the next one
    model: nn.Module = DistributedDataParallel(network) if distributed else network
    sampler: DistributedSampler[Any] = DistributedSampler(
        TensorDataset(x_train), num_replicas=run.world_size, rank=run.rank, shuffle=True, seed=settings.seed
    )
    loss_function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = (
        nn.functional.cross_entropy if classification else (lambda out, y: nn.functional.mse_loss(out.squeeze(1), y))
    )
    metric_name = "val_accuracy" if classification else "val_rmse"

    done = progress.epochs_without_improvement >= settings.patience
    if done:
        _say(run, f"early stopping had already ended training after epoch {progress.epoch + 1}")
    epoch = progress.epoch + 1
    stop_reason = "early_stopping" if done else "completed"
    while not done and epoch < settings.epochs:
        model.train()
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler), dtype=torch.int64)
        totals = torch.zeros(2, dtype=torch.float64)  # sum of losses, rows
        for batch in order.split(settings.batch_size):
            optimizer.zero_grad()
            loss = loss_function(model(x_train[batch]), y_train[batch])
            loss.backward()
            optimizer.step()
            totals += torch.tensor([loss.item() * len(batch), len(batch)], dtype=torch.float64)
        if distributed:
            dist.all_reduce(totals)
        train_loss = float(totals[0] / totals[1])
        val_loss, val_metric = _evaluate(network, settings, x_val, y_val, target_std)
        metrics = {"loss": train_loss, "val_loss": val_loss, metric_name: val_metric}
        run.log_metrics(metrics, step=epoch)
        run.progress(epoch=epoch + 1, total_epochs=settings.epochs)
        decision = torch.tensor([val_loss, val_metric, float(run.stop_requested)], dtype=torch.float64)
        if distributed:
            dist.broadcast(decision, src=0)  # rank 0's numbers and stop flag decide for every rank
        val_loss, val_metric, stop = float(decision[0]), float(decision[1]), bool(decision[2])
        metrics.update({"val_loss": val_loss, metric_name: val_metric})
        _say(
            run,
            f"epoch {epoch + 1}/{settings.epochs} loss={train_loss:.4f} val_loss={val_loss:.4f} "
            f"{metric_name}={val_metric:.4f}",
        )
        if val_loss < progress.best_val_loss - settings.min_delta:
            progress.best_val_loss, progress.best_epoch = val_loss, epoch
            progress.best_model, progress.best_metrics = _clone(network.state_dict()), metrics
            progress.epochs_without_improvement = 0
        else:
            progress.epochs_without_improvement += 1
        progress.epoch = epoch
        if progress.epochs_without_improvement >= settings.patience:
            done, stop_reason = True, "early_stopping"
            _say(run, f"early stopping: no improvement of val_loss for {settings.patience} epochs")
        elif stop:
            done, stop_reason = True, "stop_requested"
            _say(run, "stop requested: ending after this epoch")
        last = done or epoch + 1 >= settings.epochs
        if run.should_checkpoint(epoch) or last:
            run.save_checkpoint(
                {
                    "epoch": epoch,
                    "model": network.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "best_val_loss": progress.best_val_loss,
                    "best_epoch": progress.best_epoch,
                    "best_model": progress.best_model,
                    "best_metrics": progress.best_metrics,
                    "epochs_without_improvement": progress.epochs_without_improvement,
                    "signature": signature,
                }
            )
        epoch += 1
        if not last and settings.epoch_sleep:
            time.sleep(settings.epoch_sleep)

    if distributed:
        dist.barrier()
    if not run.is_main:
        return
    if progress.best_model is None or progress.best_metrics is None:
        raise RuntimeError("no epoch completed: nothing to export")
    network.load_state_dict(progress.best_model)
    network.eval()
    serving: nn.Module = Probabilities(network) if classification else Prediction(network, target_mean, target_std)
    export(run, settings, data, serving)
    summary = {
        **progress.best_metrics,
        "best_epoch": progress.best_epoch + 1,
        "epochs_run": progress.epoch + 1,
        "rows": len(data.features),
        "rows_train": len(train_rows),
        "rows_val": len(val_rows),
        "rows_dropped": data.dropped,
        "early_stopped": int(stop_reason == "early_stopping"),
        "stop_requested": int(stop_reason == "stop_requested"),
    }
    (run.output_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    _say(
        run,
        f"done ({stop_reason}): best epoch {progress.best_epoch + 1} val_loss={progress.best_val_loss:.4f} "
        f"{metric_name}={progress.best_metrics[metric_name]:.4f}; model in {run.output_dir}",
    )


# --- export --------------------------------------------------------------------------------------


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def config_text(settings: Settings, data: Dataset) -> str:
    classification = settings.task == "classification"
    output = OUTPUT_NAMES[settings.task]
    width = len(data.classes) if classification else 1
    lines = [
        f"# Trained by Weir's built-in trainer on feature service '{settings.feature_service}'.",
        f"# {INPUT_NAME} holds, in order: {', '.join(data.feature_names)}",
        'platform: "pytorch_libtorch"',
        f"max_batch_size: {MAX_BATCH_SIZE}",
        f'input [ {{ name: "{INPUT_NAME}" data_type: TYPE_FP32 dims: [ {len(data.feature_names)} ] }} ]',
        f'output [ {{ name: "{output}" data_type: TYPE_FP32 dims: [ {width} ] }} ]',
        f'parameters {{ key: "weir_feature_service" value: {{ string_value: {_quoted(settings.feature_service)} }} }}',
        f'parameters {{ key: "weir_feature_input" value: {{ string_value: "{INPUT_NAME}" }} }}',
    ]
    if classification:
        classes = json.dumps(data.classes, default=str)
        lines.append(f'parameters {{ key: "weir_classes" value: {{ string_value: {_quoted(classes)} }} }}')
    if settings.monitoring_sample_rate is not None:  # drift monitoring's share of requests (else the default)
        rate = _quoted(repr(settings.monitoring_sample_rate))
        lines.append(f'parameters {{ key: "weir_monitoring_sample_rate" value: {{ string_value: {rate} }} }}')
    return "\n".join(lines) + "\n"


REFERENCE_FILE = "reference.parquet"  # drift monitoring's reference when the version's lineage is asked for


def write_reference(path: Path, settings: Settings, data: Dataset, serving: nn.Module) -> None:
    """The training data as drift monitoring sees traffic: one column per feature (named as the data
    plane names an enriched input's elements) and, for a classifier, the class the exported model
    predicts for each row as ``<OUTPUT>.argmax``. Predictions, not labels: prediction drift compares
    what the model answers with what it answered on its training data (the labels' shares differ
    from the predictions' and raised a false alarm on unshifted traffic)."""
    columns: dict[str, Any] = {name: data.features[:, index] for index, name in enumerate(data.feature_names)}
    if settings.task == "classification":
        predicted: list[np.ndarray] = []
        with torch.no_grad():
            for start in range(0, len(data.features), 65_536):
                rows = torch.from_numpy(np.ascontiguousarray(data.features[start : start + 65_536]))
                predicted.append(serving(rows).argmax(dim=1).numpy())
        classes = np.concatenate(predicted) if predicted else np.zeros(0, dtype=np.int64)
        columns[f"{OUTPUT_NAMES[settings.task]}.argmax"] = [str(int(index)) for index in classes]
    pq.write_table(pa.table(columns), path)


def export(run: tracking.Run, settings: Settings, data: Dataset, serving: nn.Module) -> None:
    """model.pt and config.pbtxt into the output directory, model.pt2 to the artifacts (best effort)."""
    serving.eval()
    scripted = torch.jit.script(serving)
    staged = run.output_dir / "model.pt.tmp"
    scripted.save(str(staged))
    staged.replace(run.output_dir / "model.pt")
    (run.output_dir / "config.pbtxt").write_text(config_text(settings, data), encoding="utf-8")
    write_reference(run.output_dir / REFERENCE_FILE, settings, data, serving)
    try:
        example = (torch.zeros(2, len(data.feature_names)),)
        batch = torch.export.Dim("batch", min=1, max=1 << 20)
        program = torch.export.export(serving, example, dynamic_shapes={"features": {0: batch}})
        with tempfile.TemporaryDirectory(dir=run.directory) as scratch:
            program_path = Path(scratch) / "model.pt2"
            torch.export.save(program, str(program_path))
            run.log_artifact(program_path)
    except Exception as error:  # the TorchScript model is the one served; the .pt2 is a bonus
        log.warning("the torch.export model (model.pt2) could not be written: %s", error)


# --- entry point ---------------------------------------------------------------------------------


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run = tracking.init()
    try:
        try:
            unknown = sorted(set(run.parameters) - KNOWN)
            if unknown and run.is_main:
                log.warning("ignoring unknown parameters %s (known: %s)", unknown, sorted(KNOWN))
            settings = parse_parameters(run.parameters, run.directory)
            data = load_dataset(settings)
        except ParameterError as error:
            if run.is_main:
                print(f"weir builtin trainer: {error}", file=sys.stderr, flush=True)
            return EXIT_BAD_PARAMETERS
        _say(
            run,
            f"training table: {len(data.features)} rows, {len(data.feature_names)} features "
            f"({', '.join(data.feature_names)}); dropped {data.dropped} rows with a missing feature or label",
        )
        run.log_params(
            {**settings.as_params(), "rows": len(data.features), "rows_dropped": data.dropped},
            dataset_hash=data.dataset_hash,
        )
        if run.world_size > 1:
            dist.init_process_group("gloo")
        try:
            train(run, settings, data)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        return 0
    finally:
        run.close()


if __name__ == "__main__":
    sys.exit(main())
