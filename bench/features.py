"""Historical feature retrieval: Weir's DuckDB point-in-time join against pandas `merge_asof` (the
usual hand-written baseline) and, where its virtualenv exists, Feast 0.67: same data, same machine,
same run.

    .venv/bin/python bench/features.py [--entity-rows 1000000] [--feature-rows 10000000] [--entities 100000]
        [--feast-python .peers/feast/bin/python] [--feast-scale 0.1] [--feast-stores file,duckdb]
        [--feast-full-stores duckdb] [--feast-timeout 900] [--no-feast] [--out bench/results]

Generates one feature view (10 float features, one row per entity per event time, random event
times over 30 days, a 7-day TTL) as Parquet and entity rows with random timestamps, checks that the
methods give the same values, and reports rows/s and the ratios. Writes features.json and features.md.

Feast runs in its own virtualenv (never Weir's), one subprocess per offline store
(`bench/feast_peer.py`), bounded by --feast-timeout. Its file (Dask) store's memory grows with entity rows
x feature rows per entity (about 3 GiB at 100k x 1M, 8 GiB at 300k x 3M here; extrapolated, beyond this
machine's 24 GiB at full size), so a second, smaller data set (--feast-scale times the entity rows, feature
rows and entities: the same feature rows per entity) is run with Weir, pandas and every store in
--feast-stores, for a same-scale, same-run ratio; the stores in --feast-full-stores also run on the
full-size data. Set up the venv with

    python3.11 -m venv .peers/feast && .peers/feast/bin/pip install 'feast[duckdb]==0.67.0'
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402

FEATURES = [f"f{index}" for index in range(10)]
DAY = 86400
TTL_SECONDS = 7 * DAY
FEAST_PYTHON = harness.ROOT / ".peers" / "feast" / "bin" / "python"
FEAST_SETUP = "python3.11 -m venv .peers/feast && .peers/feast/bin/pip install 'feast[duckdb]==0.67.0'"
FEAST_STORES = {"file": "Feast 0.67, file offline store (Dask)", "duckdb": "Feast 0.67, duckdb offline store (ibis)"}


def say(message: str) -> None:
    print(f"[features {time.strftime('%H:%M:%S')}] {message}", flush=True)


def generate(tmp: Path, args: argparse.Namespace) -> tuple[Path, Any]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    start = np.datetime64("2026-10-01T00:00:00", "s")
    feature_times = start + rng.integers(0, 30 * DAY, args.feature_rows).astype("timedelta64[s]")
    columns: dict[str, Any] = {
        "entity_id": rng.integers(0, args.entities, args.feature_rows),
        "event_timestamp": pa.array(feature_times, pa.timestamp("s", tz="UTC")),
    }
    for name in FEATURES:
        columns[name] = rng.random(args.feature_rows)
    source = tmp / "view.parquet"
    pq.write_table(pa.table(columns), source, row_group_size=1_000_000)
    entity_times = start + rng.integers(0, 30 * DAY, args.entity_rows).astype("timedelta64[s]")
    entity_rows = pa.table(
        {
            "entity_id": rng.integers(0, args.entities, args.entity_rows),
            "event_timestamp": pa.array(entity_times, pa.timestamp("s", tz="UTC")),
        }
    )
    return source, entity_rows


def weir(source: Path, entity_rows: Any) -> Any:
    from weir_control.features.definitions import parse_definitions
    from weir_control.features.offline import get_historical_features

    definitions = parse_definitions(
        {
            "entity": [{"name": "entity", "join_keys": ["entity_id"], "value_type": "INT64"}],
            "feature_view": [
                {
                    "name": "view",
                    "entities": ["entity"],
                    "source": str(source),
                    "ttl_seconds": TTL_SECONDS,
                    "features": [{"name": name, "dtype": "FLOAT64"} for name in FEATURES],
                }
            ],
            "feature_service": [{"name": "all", "features": ["view"]}],
        },
        "bench",
    )
    return get_historical_features(definitions, "all", entity_rows)


def pandas_merge_asof(source: Path, entity_rows: Any) -> Any:
    import pandas as pd

    features = pd.read_parquet(source)
    features["event_timestamp"] = features["event_timestamp"].astype("datetime64[ns, UTC]")
    features = features.sort_values("event_timestamp", kind="stable")
    left = entity_rows.to_pandas()
    left["event_timestamp"] = left["event_timestamp"].astype("datetime64[ns, UTC]")
    left["__row"] = range(len(left))
    left = left.sort_values("event_timestamp", kind="stable")
    merged = pd.merge_asof(
        left, features.rename(columns={"event_timestamp": "__feature_ts"}), left_on="event_timestamp",
        right_on="__feature_ts", by="entity_id", direction="backward",
        tolerance=pd.Timedelta(seconds=TTL_SECONDS), allow_exact_matches=True,
    )  # fmt: skip
    return merged.sort_values("__row").reset_index(drop=True)


def feast(python: Path, store: str, source: Path, entity_path: Path, result: Path, timeout: float) -> dict[str, Any]:
    """One `bench/feast_peer.py` run in the Feast venv: its JSON line, or {"error": ...} on failure or timeout."""
    command = [
        str(python), "-W", "ignore::DeprecationWarning", str(HERE / "feast_peer.py"),
        "--entity-rows", str(entity_path), "--source", str(source), "--offline-store", store,
        "--join-key", "entity_id", "--features", ",".join(FEATURES), "--ttl-seconds", str(TTL_SECONDS),
        "--result", str(result),
    ]  # fmt: skip
    began = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return {"offline_store": store, "error": f"timed out after {timeout:.0f} s (killed)", "timed_out": True}
    wall = time.perf_counter() - began
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"offline_store": store, "error": f"exit status {done.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1]) | {"process_wall_s": wall}


def compare_feast(ours: Any, result: Path, source: Path) -> dict[str, Any]:
    """Feast's rows (sorted by row_id) against Weir's (in input order): every feature value, and why rows
    are missing or differ. A mismatch is 'tied' when the entity has two or more feature rows at the latest
    valid event time and Weir's and Feast's values are both among them: either answer is right (neither
    declares a created timestamp to break ties)."""
    import numpy as np
    import pandas as pd
    import pyarrow.parquet as pq

    theirs = pq.read_table(result).to_pandas()
    ids = theirs["row_id"].to_numpy()
    mine = {name: ours.column(name).to_numpy(zero_copy_only=False).astype(float) for name in FEATURES}
    cells = equal = null_equal = 0
    mismatched_rows: set[int] = set()
    for name in FEATURES:
        a, b = mine[name][ids], theirs[name].to_numpy(dtype=float)
        both = ~np.isnan(a) & ~np.isnan(b)
        cells += int(both.sum())
        equal += int((a[both] == b[both]).sum())
        null_equal += int((np.isnan(a) == np.isnan(b)).sum())
        mismatched_rows.update(ids[both & (a != b)].tolist())
    entity = ours.select(["entity_id", "event_timestamp"]).to_pandas()
    returned = np.zeros(ours.num_rows, dtype=bool)
    returned[ids] = True
    # A dropped row whose entity key and timestamp repeat a returned row's is a collapsed duplicate.
    key_returned = entity.assign(returned=returned).groupby(["entity_id", "event_timestamp"])["returned"]
    duplicate = key_returned.transform("any").to_numpy()
    weir_null = np.isnan(mine[FEATURES[0]])
    tied = 0
    if mismatched_rows:
        first = FEATURES[0]
        feast_first = dict(zip(ids.tolist(), theirs[first].to_numpy(dtype=float).tolist(), strict=True))
        keys = sorted({int(entity["entity_id"].iat[row]) for row in mismatched_rows})
        view = pd.read_parquet(
            source, columns=["entity_id", "event_timestamp", first], filters=[("entity_id", "in", keys)]
        )
        for row in mismatched_rows:
            at = entity["event_timestamp"].iat[row]
            candidates = view[
                (view["entity_id"] == entity["entity_id"].iat[row])
                & (view["event_timestamp"] <= at)
                & (view["event_timestamp"] >= at - pd.Timedelta(seconds=TTL_SECONDS))
            ]
            latest = set(candidates.loc[candidates["event_timestamp"] == candidates["event_timestamp"].max(), first])
            tied += int(len(latest) > 1 and {mine[first][row], feast_first[row]} <= latest)
    return {
        "rows_returned": len(ids),
        "distinct_rows_returned": len(np.unique(ids)),
        "value_agreement": equal / cells if cells else 1.0,
        "null_agreement": null_equal / (len(ids) * len(FEATURES)) if len(ids) else 1.0,
        "mismatched_rows": len(mismatched_rows),
        "mismatched_rows_at_tied_event_times": tied,
        "missing_rows": int((~returned).sum()),
        "missing_rows_weir_null": int((~returned & weir_null).sum()),
        "missing_rows_duplicate_entity_row": int((~returned & ~weir_null & duplicate).sum()),
        "missing_rows_other": int((~returned & ~weir_null & ~duplicate).sum()),
    }


def run_scale(tmp: Path, sizes: argparse.Namespace, stores: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Weir and pandas on one generated data set, then each Feast store on the same files."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    say(
        f"generating {sizes.feature_rows:,} feature rows and {sizes.entity_rows:,} entity rows "
        f"({sizes.entities:,} entities)"
    )
    source, entity_rows = generate(tmp, sizes)
    timings: dict[str, float] = {}
    began = time.perf_counter()
    ours = weir(source, entity_rows)
    timings["weir_duckdb_s"] = time.perf_counter() - began
    say(f"weir (DuckDB ASOF): {timings['weir_duckdb_s']:.2f} s")
    began = time.perf_counter()
    theirs = pandas_merge_asof(source, entity_rows)
    timings["pandas_merge_asof_s"] = time.perf_counter() - began
    say(f"pandas merge_asof: {timings['pandas_merge_asof_s']:.2f} s")
    # Same answers: ties in (entity, event time) are absent with random seconds over 30 days,
    # bar rare collisions, which both would settle arbitrarily; compare where both have a value.
    mine = np.array(ours.column("f0").to_pylist(), dtype=float)
    other = theirs["f0"].to_numpy(dtype=float)
    both = ~np.isnan(mine) & ~np.isnan(other)
    del theirs
    outcome: dict[str, Any] = {
        "settings": {"entity_rows": sizes.entity_rows, "feature_rows": sizes.feature_rows, "entities": sizes.entities},
        "timings": timings,
        "value_agreement": float(np.mean(mine[both] == other[both])) if both.any() else 1.0,
        "null_agreement": float(np.mean(np.isnan(mine) == np.isnan(other))),
        "feast": {},
    }
    if stores:
        entity_path = tmp / "entity_rows.parquet"
        pq.write_table(entity_rows.append_column("row_id", pa.array(np.arange(entity_rows.num_rows))), entity_path)
    for store in stores:
        result = tmp / f"feast_{store}.parquet"
        say(f"{FEAST_STORES[store]}: running (timeout {args.feast_timeout:.0f} s)")
        run = feast(args.feast_python, store, source, entity_path, result, args.feast_timeout)
        if "error" in run:
            say(f"{FEAST_STORES[store]}: {run['error']}")
        else:
            run["check"] = compare_feast(ours, result, source)
            result.unlink()
            say(
                f"{FEAST_STORES[store]}: {run['seconds']:.2f} s, {run['rows']:,} rows; values agree with Weir's "
                f"on {run['check']['value_agreement']:.4%} of cells both fill"
            )
        outcome["feast"][store] = run
    return outcome


def table_lines(outcome: dict[str, Any]) -> list[str]:
    """The markdown table for one scale: every method's seconds, rows/s and Weir's speedup over it."""
    rows = outcome["settings"]["entity_rows"]
    weir_s = outcome["timings"]["weir_duckdb_s"]
    pandas_s = outcome["timings"]["pandas_merge_asof_s"]
    lines = [
        "| method | seconds | entity rows/s | rows returned | Weir speedup | values vs Weir |",
        "|---|--:|--:|--:|--:|---|",
        f"| Weir, DuckDB ASOF join | {weir_s:.2f} | {rows / weir_s:,.0f} | {rows:,} | 1.00x | - |",
        f"| pandas merge_asof | {pandas_s:.2f} | {rows / pandas_s:,.0f} | {rows:,} | **{pandas_s / weir_s:.2f}x** | "
        f"f0 agrees on {outcome['value_agreement']:.4%} of rows both fill |",
    ]
    for store, run in outcome["feast"].items():
        if "error" in run:
            lines.append(f"| {FEAST_STORES[store]} | {run['error']} | - | - | - | - |")
            continue
        check = run["check"]
        lines.append(
            f"| {FEAST_STORES[store]} | {run['seconds']:.2f} | {rows / run['seconds']:,.0f} | {run['rows']:,} | "
            f"**{run['seconds'] / weir_s:.2f}x** | {check['value_agreement']:.4%} of cells both fill; "
            f"rows differing: {check['mismatched_rows']} ({check['mismatched_rows_at_tied_event_times']} at tied "
            "event times) |"
        )
    return lines


def summary_lines(outcome: dict[str, Any]) -> list[str]:
    weir_s = outcome["timings"]["weir_duckdb_s"]
    lines = [f"Weir/pandas throughput: **{outcome['timings']['pandas_merge_asof_s'] / weir_s:.2f}x**"]
    for store, run in outcome["feast"].items():
        if "error" not in run:
            lines += ["", f"Weir/{FEAST_STORES[store]} throughput: **{run['seconds'] / weir_s:.2f}x**"]
    return lines


def feast_notes(outcomes: list[dict[str, Any]]) -> list[str]:
    runs = [(outcome, run) for outcome in outcomes for run in outcome["feast"].values() if "error" not in run]
    if not runs:
        return []
    notes = [
        "",
        "## How Feast was run, and where its answers differ",
        "",
        f"- Feast {runs[0][1]['feast']} in its own virtualenv (`{FEAST_SETUP}`), one `bench/feast_peer.py` "
        "subprocess per offline store: a throwaway repository built in code (`RepoConfig`, provider `local`, "
        "SQLite online store, file registry), one Entity, FileSource (the same Parquet file), FeatureView "
        "(TTL 7 days) and FeatureService applied, then `get_historical_features(entity_df, features=service)"
        ".to_arrow()` timed on the wall clock: not the import, the apply or reading the entity rows into pandas. "
        "Weir is timed the same way: from entity rows in memory to an Arrow table.",
        "- Same semantics: both stores take the latest feature row with event time <= the entity row's and >= "
        "that minus the TTL, as Weir does; no created timestamp, so ties at one event time may go either way "
        "(the 'tied' counts). The check compares all 10 features of every row Feast returns with Weir's, lined "
        "up by a `row_id` column passed through the entity dataframe (Feast returns rows in another order).",
    ]
    if len(outcomes) > 1:
        full, scaled = outcomes[0]["settings"], outcomes[-1]["settings"]
        notes.append(
            "- Why a smaller data set too: Feast's file store merges each entity row with every feature row of its "
            "key before filtering on time and TTL (`feast/infra/offline_stores/dask.py`: `_merge`, then "
            f"`_filter_ttl`), {full['entity_rows'] * full['feature_rows'] // full['entities']:,} rows at full size "
            f"against {scaled['entity_rows'] * scaled['feature_rows'] // scaled['entities']:,} here; its memory "
            "grows with that, so each store runs on both sizes only where it fits (--feast-full-stores)."
        )
    for outcome, run in runs:
        check, size = run["check"], outcome["settings"]["entity_rows"]
        note = f"- {FEAST_STORES[run['offline_store']]}, {size:,} entity rows: {check['rows_returned']:,} rows back"
        if run.get("max_rss_mib"):
            note += f", peak RSS of the Feast process {run['max_rss_mib']:,.0f} MiB"
        if check["missing_rows"]:
            note += (
                f"; of the {check['missing_rows']:,} rows it left out, {check['missing_rows_weir_null']:,} have no "
                "feature row within the TTL (Weir returns them with nulls; the Dask store's TTL filter drops the "
                f"entity row), {check['missing_rows_duplicate_entity_row']:,} repeat another entity row's key and "
                f"timestamp (its `drop_duplicates` keeps one of them), {check['missing_rows_other']:,} other"
            )
        notes.append(note + ".")
    return notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entity-rows", type=int, default=1_000_000)
    parser.add_argument("--feature-rows", type=int, default=10_000_000)
    parser.add_argument("--entities", type=int, default=100_000)
    parser.add_argument("--feast-python", type=Path, default=FEAST_PYTHON, help="Python of the Feast virtualenv")
    parser.add_argument("--feast-scale", type=float, default=0.1, help="size of the Feast data set; 0: none")
    parser.add_argument("--feast-stores", default="file,duckdb", help="Feast offline stores run at --feast-scale")
    parser.add_argument("--feast-full-stores", default="duckdb", help="Feast offline stores also run at full size")
    parser.add_argument("--feast-timeout", type=float, default=900.0, help="seconds per Feast run")
    parser.add_argument("--no-feast", action="store_true")
    parser.add_argument("--out", type=Path, default=harness.RESULTS)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    scaled_stores = [store for store in args.feast_stores.split(",") if store]
    full_stores = [store for store in args.feast_full_stores.split(",") if store]
    for store in {*scaled_stores, *full_stores} - set(FEAST_STORES):
        parser.error(f"unknown Feast offline store '{store}' (choose from {', '.join(FEAST_STORES)})")
    feast_skipped = None
    if args.no_feast:
        feast_skipped = "--no-feast"
    elif not args.feast_python.exists():
        feast_skipped = f"no Python at {args.feast_python} (set it up with: {FEAST_SETUP})"
    if feast_skipped:
        say(f"Feast: skipped, {feast_skipped}")
        scaled_stores = full_stores = []

    outcomes = []
    with tempfile.TemporaryDirectory(prefix="weir-features-") as tmp_name:
        outcomes.append(run_scale(Path(tmp_name), args, full_stores, args))
    if scaled_stores and args.feast_scale > 0:
        sizes = argparse.Namespace(
            entity_rows=round(args.entity_rows * args.feast_scale),
            feature_rows=round(args.feature_rows * args.feast_scale),
            entities=max(1, round(args.entities * args.feast_scale)),
        )
        with tempfile.TemporaryDirectory(prefix="weir-features-feast-") as tmp_name:
            outcomes.append(run_scale(Path(tmp_name), sizes, scaled_stores, args))
    full = outcomes[0]
    timings = full["timings"]
    rows = args.entity_rows
    report = {
        "command": harness.command_line(),
        "machine": harness.machine_info(),
        "settings": vars(args)
        | {
            "out": str(args.out),
            "feast_python": str(args.feast_python),
            "features": len(FEATURES),
            "ttl_seconds": TTL_SECONDS,
        },
        "timings": timings,
        "rows_per_second": {name.removesuffix("_s"): rows / seconds for name, seconds in timings.items()},
        "speedup_weir_over_pandas": timings["pandas_merge_asof_s"] / timings["weir_duckdb_s"],
        "value_agreement": full["value_agreement"],
        "null_agreement": full["null_agreement"],
        "feast_skipped": feast_skipped,
        "scales": outcomes,
    }
    (args.out / "features.json").write_text(json.dumps(report, indent=2) + "\n")
    title = "Weir (DuckDB ASOF join) vs pandas merge_asof" + (" and Feast 0.67" if not feast_skipped else "")
    lines = [
        f"# Historical retrieval: {title}, same run",
        "",
        "```",
        report["command"],
        "```",
        "",
        f"- Machine: {report['machine']['cpu_count']} CPUs, {report['machine']['cpu_model']}",
        f"- One feature view: {len(FEATURES)} float features, event times random over 30 days, TTL 7 days; every "
        "method reads the same Parquet file. Weir and pandas return rows in input order.",
    ]
    if feast_skipped:
        lines.append(f"- Feast: skipped, {feast_skipped}.")
    for index, outcome in enumerate(outcomes):
        settings = outcome["settings"]
        heading = f"{settings['entity_rows']:,} entity rows x {settings['feature_rows']:,} feature rows"
        if index:
            heading += f" (--feast-scale {args.feast_scale:g})"
        lines += [
            "",
            f"## {heading}",
            "",
            f"{settings['entities']:,} entities ({settings['feature_rows'] // settings['entities']:,} feature rows "
            "each). Weir speedup: the method's seconds over Weir's, in this run.",
            "",
            *table_lines(outcome),
            "",
            *summary_lines(outcome),
        ]
    lines += [*feast_notes(outcomes), ""]
    (args.out / "features.md").write_text("\n".join(lines))
    say(
        f"Weir/pandas {report['speedup_weir_over_pandas']:.2f}x; wrote {harness.display_path(args.out / 'features.md')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
