"""Propagation latency of a kill-switch change to two data planes attached to two control-plane
replicas on one PostgreSQL database (issue 16: p99 <= 1 s, idle and while a 200 MB artifact installs).

Two `weir control` replicas (A, B) share a fresh database and a state directory; data plane 0 is
attached to A, data plane 1 to B. The endpoint `flip` has two variants (stable x2, canary x3); each
change sets its `kill_switch` flag to the other variant, through A and B in turn, so every data plane
sees half its changes through its own replica (the baseline path, the only one before issue 16) and
half through the other one (the database path: NOTIFY or polling). A change has reached a data plane
when a keyed request to it is answered by the new variant: pollers ask each data plane every
``--poll-ms`` from just before the SetFlag call, and the latency is the time from the call to the
first such answer.

(a) idle: ``--changes`` changes, ``--gap-ms`` apart.
(b) during installs: versions of the endpoint `big` carrying ``--big-mb`` MB of weights each are
    deployed one after another on both data planes; changes are made while they install, and only
    the changes a data plane applied before it finished installing count for it (``--changes`` per
    data plane, at most ``--max-seconds``).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cluster as bench_cluster
import harness

FLIP, BIG = "flip", "big"
VARIANTS = {"stable": 2.0, "canary": 3.0}


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass
class Change:
    scenario: str
    through: str  # the replica the SetFlag went to
    target: str  # the variant the kill switch names
    latencies: dict[str, float | None]  # data plane -> seconds (None: not seen within the timeout)
    during_install: dict[str, bool]  # data plane -> applied while `big` was still installing there
    logged: dict[str, float | None]  # data plane -> seconds until its "endpoint flags applied" line was read
    rpc_seconds: float  # the SetFlag call itself (the change committed and the caller answered)


class Poller:
    """Asks one data plane for ``flip`` until the answer comes from ``target``; the time it did."""

    def __init__(self, url: str, poll_seconds: float) -> None:
        import tritonclient.grpc as grpcclient

        self.client = grpcclient.InferenceServerClient(url)
        self.poll_seconds = poll_seconds

    def current(self) -> str | None:
        try:
            return bench_cluster.answer(self.client, FLIP, key="bench")[0]
        except Exception:
            return None

    def wait_for(self, target: str, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if bench_cluster.answer(self.client, FLIP, key="bench")[0] == target:
                    return time.monotonic()
            except Exception:  # a failed request: keep asking
                pass
            time.sleep(self.poll_seconds)
        return None


class InstallWatch:
    """Follows which version of ``big`` each data plane serves (by its answer), in a thread."""

    def __init__(self, urls: dict[str, str]) -> None:
        import tritonclient.grpc as grpcclient

        self.clients = {name: grpcclient.InferenceServerClient(url) for name, url in urls.items()}
        self.serving: dict[str, float] = dict.fromkeys(urls, 0.0)  # factor answered (0: none yet)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="install-watch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.wait(0.02):
            for name, client in self.clients.items():
                with contextlib.suppress(Exception):  # not deployed yet
                    self.serving[name] = bench_cluster.answer(client, BIG, timeout=5)[1]

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=10)
        for client in self.clients.values():
            client.close()


def make_change(
    scenario: str, through: str, target: str, stubs: dict[str, Any], pollers: dict[str, Poller],
    planes: dict[str, bench_cluster.Process], install: tuple[InstallWatch, float] | None, timeout: float,
) -> Change:  # fmt: skip
    from weir_proto.control.v1 import deployments_pb2

    seen: dict[str, float | None] = {}
    during: dict[str, bool] = {}
    # a data plane that still shows the target (it missed the previous change) cannot time this one
    stale = {name for name, poller in pollers.items() if poller.current() in (target, None)}

    def follow(name: str) -> None:
        seen[name] = pollers[name].wait_for(target, timeout) if name not in stale else None
        # still installing when the change showed: the data plane did not answer the new big yet
        during[name] = install is not None and install[0].serving[name] != install[1]

    stub, metadata = stubs[through]
    threads = [threading.Thread(target=follow, args=(name,)) for name in pollers]
    sent = time.monotonic()
    for thread in threads:
        thread.start()
    stub.SetFlag(deployments_pb2.SetFlagRequest(endpoint=FLIP, name="kill_switch", value=target), metadata=metadata)
    answered = time.monotonic() - sent
    for thread in threads:
        thread.join()
    latencies = {name: (stamp - sent if stamp is not None else None) for name, stamp in seen.items()}
    logged = {name: flags_logged(planes[name], target, sent) if seen[name] is not None else None for name in pollers}
    return Change(scenario, through, target, latencies, during, logged, answered)


def flags_logged(plane: bench_cluster.Process, target: str, sent: float) -> float | None:
    """Seconds from ``sent`` until the data plane's log said the kill switch names ``target`` (the
    line is written before the answers change, so it is there by now, give or take the pipe)."""
    deadline = time.monotonic() + 1.0
    while True:
        for stamp, record in plane.records("endpoint flags applied"):
            if stamp > sent and record.get("endpoint") == FLIP and record.get("flags", {}).get("kill_switch") == target:
                return stamp - sent
        if time.monotonic() > deadline:
            return None
        time.sleep(0.01)


def percentile(values: list[float], q: float) -> float | None:
    import numpy as np

    return float(np.percentile(values, q)) if values else None


def summarise(changes: list[Change], attached: dict[str, str]) -> list[dict[str, Any]]:
    """A row per scenario and path (own replica / other replica / both)."""
    rows = []
    for scenario in ("idle", "installing"):
        for path in ("own replica", "other replica", "all"):
            values, missed, logged = [], 0, []
            for change in changes:
                if change.scenario != scenario:
                    continue
                for plane, latency in change.latencies.items():
                    own = attached[plane] == change.through
                    if path != "all" and own != (path == "own replica"):
                        continue
                    if scenario == "installing" and not change.during_install.get(plane):
                        continue
                    if latency is None:
                        missed += 1
                    else:
                        values.append(latency)
                    if change.logged.get(plane) is not None:
                        logged.append(change.logged[plane])
            rows.append({
                "scenario": scenario, "path": path, "samples": len(values), "missed": missed,
                "p50_ms": _ms(percentile(values, 50)), "p99_ms": _ms(percentile(values, 99)),
                "max_ms": _ms(max(values) if values else None),
                "logged_p50_ms": _ms(percentile(logged, 50)), "logged_p99_ms": _ms(percentile(logged, 99)),
            })  # fmt: skip
    return rows


def _ms(seconds: float | None) -> float | None:
    return round(seconds * 1000, 1) if seconds is not None else None


def plot(path: Path, changes: list[Change], attached: dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axis = plt.subplots(figsize=(8, 4.5))
    for scenario in ("idle", "installing"):
        for own in (True, False):
            values = sorted(
                latency * 1000
                for change in changes if change.scenario == scenario
                for plane, latency in change.latencies.items()
                if latency is not None and (attached[plane] == change.through) == own
                and (scenario == "idle" or change.during_install.get(plane))
            )  # fmt: skip
            if values:
                label = f"{scenario}, {'own' if own else 'other'} replica (n={len(values)})"
                axis.plot(values, np.arange(1, len(values) + 1) / len(values), label=label, drawstyle="steps-post")
    axis.axvline(1000, color="grey", linestyle="--", label="goal: p99 1 s")
    axis.set_xscale("log")
    axis.set_xlabel("kill switch change -> answered by the new variant (ms, log)")
    axis.set_ylabel("share of changes")
    axis.set_title("Propagation to two data planes on two control-plane replicas")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def write_markdown(path: Path, report: dict[str, Any]) -> None:
    lines = [
        "# Propagation of a kill-switch change (bench/propagation.py)", "",
        f"Command: `{report['command']}`", "",
        f"Machine: {report['machine']['cpu_count']} CPUs ({report['machine']['cpu_model']}), "
        f"Python {report['machine']['python']}; control planes, data planes, PostgreSQL and the pollers share them.",
        "", "| scenario | path | samples | missed | p50 ms | p99 ms | max ms | logged p50 ms | logged p99 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for row in report["rows"]:
        lines.append(
            f"| {row['scenario']} | {row['path']} | {row['samples']} | {row['missed']} | {row['p50_ms']} | "
            f"{row['p99_ms']} | {row['max_ms']} | {row['logged_p50_ms']} | {row['logged_p99_ms']} |"
        )
    lines += ["", *[f"- {line}" for line in report["verdicts"]], ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from weir_proto.control.v1 import deployments_pb2

    changes: list[Change] = []
    with bench_cluster.cluster(args.postgres) as running:
        controls = {name: running.start_control(name) for name in ("control-a", "control-b")}
        attached = {"data-plane-0": "control-a", "data-plane-1": "control-b"}
        planes = {plane: running.start_data_plane(plane, [controls[replica].address])
                  for plane, replica in attached.items()}  # fmt: skip
        address = controls["control-a"].address
        stable = bench_cluster.push_scale(address, running.root, FLIP, VARIANTS["stable"])
        canary = bench_cluster.push_scale(address, running.root, FLIP, VARIANTS["canary"])
        bench_cluster.cli(address, "traffic", FLIP, "--variant", f"stable={FLIP}:{stable}:50",
                          "--variant", f"canary={FLIP}:{canary}:50", "--key-header", "x-user")  # fmt: skip
        pollers = {plane: Poller(process.address, args.poll_ms / 1000) for plane, process in planes.items()}
        stubs = {}
        for name, control in controls.items():
            _, stub, metadata = bench_cluster.deployments_stub(control.address)
            stubs[name] = (stub, metadata)
        for plane, poller in pollers.items():  # the endpoint serves on both before anything is timed
            bench_cluster.wait_for(lambda poller=poller: poller.current() is not None, 180, f"{plane} to serve {FLIP}")
        stub, metadata = stubs["control-a"]  # the kill switch starts on canary; the first change sets stable
        stub.SetFlag(
            deployments_pb2.SetFlagRequest(endpoint=FLIP, name="kill_switch", value="canary"), metadata=metadata
        )
        for plane, poller in pollers.items():
            if poller.wait_for("canary", 30) is None:
                say(f"warning: {plane} did not see the first kill switch within 30 s")
        replicas = itertools.cycle(controls)
        targets = itertools.cycle(("stable", "canary"))

        say(f"(a) idle: {args.changes} changes")
        for _ in range(args.changes):
            changes.append(
                make_change("idle", next(replicas), next(targets), stubs, pollers, planes, None, args.timeout)
            )
            time.sleep(args.gap_ms / 1000)

        say(f"(b) while {args.big_mb} MB versions of `{BIG}` install")
        versions = [
            bench_cluster.push_scale(address, running.root, BIG, float(10 + index), args.big_mb)
            for index in range(args.big_versions)
        ]
        watch = InstallWatch({plane: process.address for plane, process in planes.items()})
        installs = 0
        try:
            deadline = time.monotonic() + args.max_seconds
            counted = dict.fromkeys(planes, 0)
            for version in itertools.cycle(versions):
                if min(counted.values()) >= args.changes or time.monotonic() > deadline:
                    break
                factor = float(10 + versions.index(version))
                bench_cluster.cli(controls[next(replicas)].address, "deploy", BIG, BIG, str(version))
                installs += 1
                while time.monotonic() < deadline and any(watch.serving[plane] != factor for plane in planes):
                    change = make_change("installing", next(replicas), next(targets), stubs, pollers, planes,
                                         (watch, factor), args.timeout)  # fmt: skip
                    changes.append(change)
                    for plane, during in change.during_install.items():
                        counted[plane] += during
                    time.sleep(args.gap_ms / 1000)
                say(f"  install {installs} (version {version}) done; changes counted during installs: {counted}")
        finally:
            watch.close()
            for poller in pollers.values():
                poller.client.close()
        statuses = running.stop()
    rows = summarise(changes, attached)
    verdicts = []
    by_key = {(row["scenario"], row["path"]): row for row in rows}
    for scenario in ("idle", "installing"):
        row = by_key[(scenario, "all")]
        met = row["p99_ms"] is not None and row["p99_ms"] <= 1000 and row["missed"] == 0
        verdicts.append(f"{scenario}: p99 {row['p99_ms']} ms over {row['samples']} samples, "
                        f"{row['missed']} missed: goal p99 <= 1 s {'MET' if met else 'NOT MET'}")  # fmt: skip
    for scenario in ("idle", "installing"):
        own, other = by_key[(scenario, "own replica")], by_key[(scenario, "other replica")]
        if own["p50_ms"] and other["p50_ms"] and own["p99_ms"] and other["p99_ms"]:
            verdicts.append(
                f"{scenario}: other replica / own replica (baseline): p50 x{other['p50_ms'] / own['p50_ms']:.2f}, "
                f"p99 x{other['p99_ms'] / own['p99_ms']:.2f}"
            )
    for scenario in ("idle", "installing"):
        calls = [change.rpc_seconds for change in changes if change.scenario == scenario]
        verdicts.append(f"{scenario}: the SetFlag call itself: p50 {_ms(percentile(calls, 50))} ms, "
                        f"p99 {_ms(percentile(calls, 99))} ms")  # fmt: skip
    idle, installing = by_key[("idle", "all")], by_key[("installing", "all")]
    if idle["p99_ms"] and installing["p99_ms"]:
        verdicts.append(f"installing / idle (baseline): p50 x{installing['p50_ms'] / idle['p50_ms']:.2f}, "
                        f"p99 x{installing['p99_ms'] / idle['p99_ms']:.2f}")  # fmt: skip
    return {
        "command": harness.command_line(),
        "machine": harness.machine_info(),
        "settings": {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()},
        "attached": attached,
        "installs": installs,
        "exit_statuses": statuses,
        "rows": rows,
        "verdicts": verdicts,
        "changes": [vars(change) for change in changes],
        "_changes": changes,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=50, help="changes per scenario (per data plane in (b))")
    parser.add_argument("--big-mb", type=int, default=200, help="size of each version of `big` (MB)")
    parser.add_argument("--big-versions", type=int, default=3, help="distinct versions of `big` deployed in turn")
    parser.add_argument("--gap-ms", type=float, default=100.0, help="pause between changes")
    parser.add_argument("--poll-ms", type=float, default=2.0, help="pause between a poller's requests")
    parser.add_argument("--timeout", type=float, default=30.0, help="a change not seen within this is missed")
    parser.add_argument("--max-seconds", type=float, default=600.0, help="bound on scenario (b)")
    parser.add_argument("--postgres", default=bench_cluster.POSTGRES_URL, help="server for a fresh database")
    parser.add_argument("--out", type=Path, default=harness.RESULTS)
    args = parser.parse_args(argv)
    if args.big_versions < 2 or args.changes < 1:
        parser.error("--big-versions needs at least 2 (each install must change the version), --changes at least 1")
    try:
        import matplotlib  # noqa: F401
        import numpy  # noqa: F401
        import tritonclient.grpc  # noqa: F401
    except ImportError as missing:
        say(f"missing prerequisite: {missing.name} (install the project's bench extra)")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    report = run(args)
    changes = report.pop("_changes")
    (args.out / "propagation.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(args.out / "propagation.md", report)
    plot(args.out / "propagation.png", changes, report["attached"])
    for line in report["verdicts"]:
        say(line)
    missed = sum(row["missed"] for row in report["rows"] if row["path"] == "all")
    return 0 if missed == 0 and all(status == 0 for status in report["exit_statuses"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
