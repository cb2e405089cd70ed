"""The built-in trainer's parameters, checked without torch: by the trainer itself and by the control
plane when a ``builtin:mlp`` job is submitted (a bad parameter is refused at submission, naming it,
instead of ending the job with status 2 minutes later). See ``weir_control.training.builtin``."""

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

TASKS = ("classification", "regression")


class ParameterError(Exception):
    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(f"parameter '{parameter}': {message}")
        self.parameter = parameter
        self.detail = message


# --- parameters ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    entities: Path
    feature_service: str
    label: str
    task: str
    hidden: tuple[int, ...]
    epochs: int
    lr: float
    batch_size: int
    patience: int
    min_delta: float
    val_fraction: float
    seed: int
    definitions: Path
    epoch_sleep: float
    monitoring_sample_rate: float | None = None  # the exported config's weir_monitoring_sample_rate (unset: none)

    def as_params(self) -> dict[str, Any]:
        values = asdict(self)
        values["hidden"] = ",".join(str(width) for width in self.hidden)
        return {key: str(value) for key, value in values.items() if value is not None}


KNOWN = {field for field in Settings.__dataclass_fields__}


def _text(parameters: dict[str, Any], name: str, default: str | None = None) -> str:
    value = parameters.get(name, default)
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)  # a typed parameter (e.g. a label column named 2024) is still a name
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ParameterError(name, "required, got none")
    if not isinstance(value, str):
        raise ParameterError(name, f"expected a string, got {value!r}")
    return value.strip()


def _number(parameters: dict[str, Any], name: str, default: float, kind: Callable[[Any], Any]) -> Any:
    value = parameters.get(name, default)
    if isinstance(value, bool):
        raise ParameterError(name, f"expected a number, got {value!r}")
    try:
        number = kind(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ParameterError(name, f"expected {'an integer' if kind is int else 'a number'}, got {value!r}") from None
    if isinstance(number, float) and not math.isfinite(number):
        raise ParameterError(name, f"expected a finite number, got {value!r}")
    if kind is int and isinstance(value, float) and value != number:
        raise ParameterError(name, f"expected an integer, got {value!r}")
    return number


def _hidden(value: Any) -> tuple[int, ...]:
    if isinstance(value, bool):
        raise ParameterError("hidden", f"expected layer widths like '64,32', got {value!r}")
    if isinstance(value, int):
        parts: list[Any] = [value]
    elif isinstance(value, list):
        parts = value
    elif isinstance(value, str):
        parts = [part.strip() for part in value.split(",") if part.strip()]
    else:
        raise ParameterError("hidden", f"expected layer widths like '64,32', got {value!r}")
    try:
        widths = tuple(int(part) for part in parts)
    except (TypeError, ValueError):
        raise ParameterError("hidden", f"expected layer widths like '64,32', got {value!r}") from None
    if any(width < 1 for width in widths):
        raise ParameterError("hidden", f"expected positive layer widths, got {value!r}")
    return widths


def parse_parameters(parameters: dict[str, Any], directory: Path) -> Settings:
    """Checked settings from a job's parameters; ``ParameterError`` names the first bad one."""
    task = _text(parameters, "task", "classification").lower()
    if task not in TASKS:
        raise ParameterError("task", f"expected one of {list(TASKS)}, got {parameters.get('task')!r}")
    settings = Settings(
        entities=Path(_text(parameters, "entities")),
        feature_service=_text(parameters, "feature_service"),
        label=_text(parameters, "label"),
        task=task,
        hidden=_hidden(parameters.get("hidden", "64,32")),
        epochs=_number(parameters, "epochs", 20, int),
        lr=_number(parameters, "lr", 0.01, float),
        batch_size=_number(parameters, "batch_size", 256, int),
        patience=_number(parameters, "patience", 3, int),
        min_delta=_number(parameters, "min_delta", 0.0, float),
        val_fraction=_number(parameters, "val_fraction", 0.2, float),
        seed=_number(parameters, "seed", 0, int),
        definitions=Path(_text(parameters, "definitions", str(directory / "features.toml"))),
        epoch_sleep=_number(parameters, "epoch_sleep", 0.0, float),
        monitoring_sample_rate=(
            _number(parameters, "monitoring_sample_rate", 0.0, float)
            if "monitoring_sample_rate" in parameters
            else None
        ),
    )
    checks = (
        ("epochs", settings.epochs >= 1, "expected 1 or more"),
        ("lr", settings.lr > 0, "expected a positive number"),
        ("batch_size", settings.batch_size >= 1, "expected 1 or more"),
        ("patience", settings.patience >= 1, "expected 1 or more"),
        ("min_delta", settings.min_delta >= 0, "expected 0 or more"),
        ("val_fraction", 0 < settings.val_fraction < 1, "expected a number between 0 and 1 (exclusive)"),
        ("epoch_sleep", settings.epoch_sleep >= 0, "expected 0 or more seconds"),
        (
            "monitoring_sample_rate",
            settings.monitoring_sample_rate is None or 0 <= settings.monitoring_sample_rate <= 1,
            "expected a share of requests from 0 (none) to 1 (all)",
        ),
    )
    for name, ok, expected in checks:
        if not ok:
            raise ParameterError(name, f"{expected}, got {parameters.get(name)!r}")
    return settings
