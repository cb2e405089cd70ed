"""The MLOps loop's data (``examples/mlops_loop.py``): customers with a known churn concept, and the
shift that follows (nothing is downloaded).

Four features per customer (``FEATURES``, the names of ``examples/training_data.py``), one snapshot at
``SNAPSHOT`` in the feature view ``customer_stats``. The label follows a known linear concept
(``concept_before``: the churn score of ``training_data.py`` against its median, a little noise), so the
built-in MLP learns it well. Then the world moves: ``days_since_last_order`` grows by ``SHIFT_DAYS`` for
every customer (the other three features stay exactly as they were) and the concept moves with it
(``concept_after``: churn is judged on the days beyond the new normal, with support tickets weighing
more): a model of the old concept predicts nearly everyone churned, so its accuracy on the shifted data
falls to about the share of churners.

Customers 1..N split into training customers (their labels are the training job's entity rows) and
held-out customers (never trained on: each version's accuracy is measured on them, before and after the
shift).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FEATURES = ("orders_30d", "spend_30d", "days_since_last_order", "support_tickets")
SHIFTED_FEATURE = "days_since_last_order"
SHIFT_DAYS = 30.0
VIEW = "customer_stats"
SERVICE = "churn"
LABEL = "churned"
SNAPSHOT = datetime(2024, 2, 1, tzinfo=UTC)  # the features every customer starts with
LABELLED = datetime(2024, 3, 1, tzinfo=UTC)  # the training labels' time (after the snapshot)
SHIFTED = datetime(2024, 4, 1, tzinfo=UTC)  # the shifted features' time
RELABELLED = datetime(2024, 4, 15, tzinfo=UTC)  # the fresh labels' time (after the shift)
TIMESTAMP = pa.timestamp("us", tz="UTC")

_FEATURE_LINES = "".join(f'  {{ name = "{name}", dtype = "FLOAT64" }},{chr(10)}' for name in FEATURES)
_SERVICE_LINES = "".join(f'  "{VIEW}:{name}",{chr(10)}' for name in FEATURES)
DEFINITIONS = f"""\
[[entity]]
name = "customer"
join_keys = ["customer_id"]
value_type = "INT64"

[[feature_view]]
name = "{VIEW}"
entities = ["customer"]
source = "{VIEW}"
timestamp_field = "event_timestamp"
ttl_seconds = 0
freshness = "batch"
features = [
{_FEATURE_LINES}]

[[feature_service]]
name = "{SERVICE}"
features = [
{_SERVICE_LINES}]
"""


def _score(features: dict[str, np.ndarray]) -> np.ndarray:
    return (
        0.08 * features["days_since_last_order"]
        - 0.30 * features["orders_30d"]
        + 0.70 * features["support_tickets"]
        - 0.004 * features["spend_30d"]
    )


def concept_before(features: dict[str, np.ndarray], noise: np.ndarray, threshold: float) -> np.ndarray:
    return (_score(features) - threshold + noise > 0).astype(np.int64)


def concept_after(features: dict[str, np.ndarray], noise: np.ndarray, threshold: float) -> np.ndarray:
    """The same customers judged after the shift: days count from the new normal, tickets weigh more."""
    moved = dict(features)
    moved["days_since_last_order"] = features["days_since_last_order"] - SHIFT_DAYS
    return (_score(moved) + 0.9 * features["support_tickets"] - threshold + noise > 0).astype(np.int64)


@dataclass
class LoopData:
    """Every customer's features before and after the shift and both concepts' labels."""

    customers: np.ndarray  # int64 ids 1..N
    before: dict[str, np.ndarray]
    after: dict[str, np.ndarray]
    label_before: np.ndarray
    label_after: np.ndarray
    training: np.ndarray  # bool mask: the customers whose labels training sees
    definitions: Path
    entities: Path  # the label table the training job reads (rewritten with fresh labels after the shift)
    inverted: Path  # the same table with every label inverted (a broken label pipeline: --bad-retrain)
    shifted_rows: Path  # the shifted snapshot, pushed to the feature store when the world moves

    def matrix(self, when: str, mask: np.ndarray) -> np.ndarray:
        """Model inputs in the feature service's order."""
        values = self.before if when == "before" else self.after
        return np.stack([values[name][mask] for name in FEATURES], axis=1).astype(np.float32)

    def write_labels(self, when: str) -> None:
        """The training customers' labels of the moment into the label table (and its inverted copy)."""
        at = LABELLED if when == "before" else RELABELLED
        labels = self.labels(when, self.training)
        write_parquet(label_table(self.customers[self.training], labels, at), self.entities)
        write_parquet(label_table(self.customers[self.training], 1 - labels, at), self.inverted)

    def labels(self, when: str, mask: np.ndarray) -> np.ndarray:
        return (self.label_before if when == "before" else self.label_after)[mask]


def _view_table(customers: np.ndarray, values: dict[str, np.ndarray], at: datetime) -> pa.Table:
    return pa.table(
        {
            "customer_id": pa.array(customers, pa.int64()),
            "event_timestamp": pa.array([at] * customers.size, TIMESTAMP),
            **{name: pa.array(values[name], pa.float64()) for name in FEATURES},
        }
    )


def label_table(customers: np.ndarray, labels: np.ndarray, at: datetime) -> pa.Table:
    return pa.table(
        {
            "customer_id": pa.array(customers, pa.int64()),
            "event_timestamp": pa.array([at] * customers.size, TIMESTAMP),
            LABEL: pa.array(labels, pa.int64()),
        }
    )


def write_parquet(table: pa.Table, path: Path) -> None:
    """Atomically: a training job reading the file sees the old table or the new one."""
    staged = path.with_suffix(".incoming")
    pq.write_table(table, staged)
    staged.replace(path)


def build(directory: Path, customers: int = 2000, held_out: float = 0.25, seed: int = 0) -> LoopData:
    """Write the feature view (the snapshot before the shift), its definitions, the training label table
    and the shifted snapshot (pushed later) under ``directory``."""
    if customers < 100:
        raise ValueError(f"customers: expected at least 100, got {customers}")
    generator = np.random.default_rng(seed)
    ids = np.arange(1, customers + 1, dtype=np.int64)
    orders = generator.poisson(6.0, customers).astype(np.float64)
    before = {
        "orders_30d": orders,
        "spend_30d": np.round(orders * generator.gamma(4.0, 12.0, customers), 2),
        "days_since_last_order": np.round(generator.uniform(0.0, 60.0, customers), 1),
        "support_tickets": generator.poisson(1.0, customers).astype(np.float64),
    }
    after = dict(before)
    after[SHIFTED_FEATURE] = before[SHIFTED_FEATURE] + SHIFT_DAYS
    noise = generator.normal(0.0, 0.15, customers)
    label_before = concept_before(before, noise, float(np.median(_score(before))))
    label_after = concept_after(after, noise, float(np.median(_score(before) + 0.9 * before["support_tickets"])))
    training = generator.random(customers) >= held_out

    directory.mkdir(parents=True, exist_ok=True)
    view_dir = directory / VIEW
    view_dir.mkdir(exist_ok=True)
    for stale in view_dir.glob("*.parquet"):
        stale.unlink()  # a rerun starts from the snapshot before the shift
    pq.write_table(_view_table(ids, before, SNAPSHOT), view_dir / "part-0.parquet")
    definitions = directory / "features.toml"
    definitions.write_text(DEFINITIONS, encoding="utf-8")
    shifted_rows = directory / "shifted.parquet"
    pq.write_table(_view_table(ids, after, SHIFTED), shifted_rows)
    data = LoopData(
        ids, before, after, label_before, label_after, training, definitions, directory / "labels.parquet",
        directory / "labels-inverted.parquet", shifted_rows,
    )  # fmt: skip
    data.write_labels("before")
    return data
