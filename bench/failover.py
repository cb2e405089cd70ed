"""Failover of the control plane's lease holder (issue 16): kill -9 it in the middle of a canary,
under steady inference load, and measure how long until the other replica takes the lease, applies
the next rollout step and launches a queued training job, how long until the data plane that was
attached to it is attached to the other, and how many inference requests fail meanwhile (goal 0).

Two `weir control` replicas (A, B) on a fresh PostgreSQL database and one state directory; two data
planes, each given both replicas (`--control-plane A,B` and `B,A`); ``--load-threads`` closed-loop
clients per data plane for the whole run. Each run: a canary of the other version of `flip` (steps
``--steps``, one analysis every ``--interval`` s); after ``--kill-after-steps`` steps the holder is
killed with SIGKILL and a training job is submitted through the survivor at once; the killed replica
is restarted once the canary ended. Times come from the processes' JSON log lines ("lease acquired",
"rollout step applied", "training job launched", the data plane's "attached to the control
plane"), stamped when this script read them, minus the time SIGKILL was sent.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import cluster as bench_cluster
import harness

FLIP = "flip"
JOB_SCRIPT = "import time\ntime.sleep(1)\n"


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Load:
    """Closed-loop inference clients against every data plane; counts answers and failures."""

    def __init__(self, urls: list[str], threads_per_plane: int) -> None:
        self.stopped = threading.Event()
        self.answered = 0
        self.failures: list[tuple[float, str]] = []  # (monotonic time, error)
        self.threads = [
            threading.Thread(target=self._loop, args=(url,), daemon=True)
            for url in urls
            for _ in range(threads_per_plane)
        ]
        for thread in self.threads:
            thread.start()

    def _loop(self, url: str) -> None:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(url)
        try:
            while not self.stopped.is_set():
                try:
                    bench_cluster.answer(client, FLIP, timeout=10)
                    self.answered += 1
                except Exception as error:
                    self.failures.append((time.monotonic(), f"{url}: {error}"[:300]))
        finally:
            client.close()

    def stop(self) -> None:
        self.stopped.set()
        for thread in self.threads:
            thread.join(timeout=30)


def holder(controls: dict[str, bench_cluster.Process]) -> str | None:
    """The replica that logged "lease acquired" last (among those still running)."""
    latest = [
        (stamp, name)
        for name, control in controls.items()
        if control.process.poll() is None
        for stamp, _ in control.records("lease acquired")
    ]
    return max(latest)[1] if latest else None


def first_after(process: bench_cluster.Process, message: str, after: float, **fields: Any) -> float | None:
    for stamp, record in process.records(message):
        if stamp > after and all(record.get(key) == value for key, value in fields.items()):
            return stamp - after
    return None


def wait_value(read: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = read()
        if value is not None:
            return value
        time.sleep(0.05)
    return None


def serving_version(address: str) -> int:
    """The version of `flip` with the most traffic now."""
    from weir_proto.control.v1 import deployments_pb2

    channel, stub, metadata = bench_cluster.deployments_stub(address)
    with channel:
        deployment = stub.GetDeployment(deployments_pb2.GetDeploymentRequest(endpoint=FLIP), metadata=metadata)
    return int(max(deployment.variants, key=lambda variant: variant.weight).version)


def one_run(
    index: int, running: bench_cluster.Cluster, versions: list[int], code: Path, args: argparse.Namespace
) -> dict[str, Any]:
    controls, planes = running.controls, running.data_planes
    killed = wait_value(lambda: holder(controls), 60)
    if killed is None:
        raise RuntimeError("no replica logged 'lease acquired' within 60 s")
    survivor = next(name for name in controls if name != killed)
    killed_address = controls[killed].address
    canary = next(version for version in versions if version != serving_version(controls[survivor].address))
    started = time.monotonic()
    bench_cluster.cli(controls[survivor].address, "rollout", "start", FLIP, f"{FLIP}:{canary}", "--steps", args.steps,
                      "--interval", str(args.interval), "--min-requests", "1",
                      # loose latency gates: on a shared 2-CPU machine a noisy p99 would roll the canary
                      # back early, and this bench measures the handover, not the analysis
                      "--max-p99-ratio", "10", "--max-p99-slack-ms", "500")  # fmt: skip

    def steps_by_holder() -> int | None:
        count = len([stamp for stamp, _ in controls[killed].records("rollout step applied") if stamp > started])
        return count if count >= args.kill_after_steps else None

    if wait_value(steps_by_holder, 60) is None:
        analyses = [json.dumps(record) for _, record in controls[killed].records("canary analysis")[-3:]]
        raise RuntimeError(f"{killed} applied fewer than {args.kill_after_steps} rollout steps within 60 s; "
                           "its last analyses:\n" + "\n".join(analyses))  # fmt: skip
    attached_to_killed = [
        name for name, plane in planes.items()
        if (records := plane.records("attached to the control plane"))
        and records[-1][1].get("control_plane") == killed_address
    ]  # fmt: skip
    failures_before = len(running_load.failures) if (running_load := args.load) else 0
    kill_time = controls[killed].kill()
    job = f"failover-{index}"
    bench_cluster.cli(controls[survivor].address, "train", "submit", job, "--script", "train.py", "--code", str(code))
    say(f"run {index + 1}: killed {killed} (the lease holder) after {args.kill_after_steps} steps; {job} submitted")

    survivor_process = controls[survivor]
    lease = wait_value(lambda: first_after(survivor_process, "lease acquired", kill_time), args.wait)
    step = wait_value(lambda: first_after(survivor_process, "rollout step applied", kill_time), args.wait)
    launch = wait_value(lambda: first_after(survivor_process, "training job launched", kill_time, job=job), args.wait)
    reattach = {
        name: wait_value(lambda plane=planes[name]: first_after(plane, "attached to the control plane", kill_time), 60)
        for name in attached_to_killed
    }

    def ended() -> str | None:
        state = bench_cluster.cli(survivor_process.address, "rollout", "status", FLIP)["state"]
        return state if state not in ("RUNNING", "PAUSED") else None

    final = wait_value(ended, args.wait * 2)
    if final is None:  # stalled: say so and clear the way for the next run
        status = bench_cluster.cli(survivor_process.address, "rollout", "status", FLIP)
        analyses = [record.get("reason", "") for _, record in survivor_process.records("canary analysis")[-2:]]
        final = f"still {status['state']} after {args.wait * 2:g} s (last analyses: {analyses})"
        bench_cluster.cli(survivor_process.address, "rollout", "rollback", FLIP)
    applied = [  # a step applied twice would log its summary ("... 10% ...") twice
        record.get("summary")
        for control in controls.values()
        for stamp, record in control.records("rollout step applied")
        if stamp > started
    ]
    # back on its port (the data planes' --control-plane names it), as a replica without the lease
    running.start_control(killed, *args.control_flags, port=int(killed_address.rsplit(":", 1)[1]))
    return {
        "killed": killed,
        "survivor": survivor,
        "lease_acquired_s": lease,
        "next_rollout_step_s": step,
        "job_launched_s": launch,
        "data_plane_reattached_s": reattach,
        "rollout_final_state": final,
        "steps_applied": len(applied),
        "steps_applied_twice": len(applied) - len(set(applied)),
        "failed_requests_in_run": len(args.load.failures) - failures_before if args.load else None,
    }


def write_markdown(path: Path, report: dict[str, Any]) -> None:
    lines = [
        "# Failover of the lease holder (bench/failover.py)", "",
        f"Command: `{report['command']}`", "",
        f"Machine: {report['machine']['cpu_count']} CPUs ({report['machine']['cpu_model']}); replicas, data planes, "
        "PostgreSQL and the load share them.", "",
        "| run | killed | lease taken s | next rollout step s | job launched s | data plane reattached s | "
        "rollout ended | steps applied (twice) | failed requests |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for index, run in enumerate(report["runs"], 1):
        reattached = ", ".join(f"{name} {_s(value)}" for name, value in run["data_plane_reattached_s"].items()) or "-"
        lines.append(
            f"| {index} | {run['killed']} | {_s(run['lease_acquired_s'])} | {_s(run['next_rollout_step_s'])} | "
            f"{_s(run['job_launched_s'])} | {reattached} | {run['rollout_final_state']} | "
            f"{run['steps_applied']} ({run['steps_applied_twice']}) | {run['failed_requests_in_run']} |"
        )
    lines += ["", f"Inference: {report['answered']} answered, {report['failed']} failed over the whole run.", ""]
    lines += [f"Attaches per data plane over the whole run (each after the first is a move): {report['attaches']}", ""]
    lines += [f"- {failure}" for failure in report["failure_samples"]]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _s(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "never"


def plot(path: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["lease taken", "next rollout step", "job launched", "data plane reattached"]
    figure, axis = plt.subplots(figsize=(8, 4))
    for index, run in enumerate(report["runs"]):
        reattached = [value for value in run["data_plane_reattached_s"].values() if value is not None]
        values = [run["lease_acquired_s"], run["next_rollout_step_s"], run["job_launched_s"],
                  max(reattached) if reattached else None]  # fmt: skip
        axis.scatter(
            [value if value is not None else float("nan") for value in values], labels, label=f"run {index + 1}"
        )
    axis.axvline(10, color="grey", linestyle="--", label="goal: 10 s")
    axis.set_xlabel("seconds after kill -9 of the lease holder")
    axis.set_title(
        f"Failover ({report['failed']} failed of {report['answered'] + report['failed']} inference requests)"
    )
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="kills, each of the current lease holder")
    parser.add_argument("--steps", default="5,10,15,20,25,30,35,40,45,50,60,70,80,90,100", help="canary weights")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between canary analyses")
    parser.add_argument("--kill-after-steps", type=int, default=2, help="steps the holder applies before the kill")
    parser.add_argument("--lease-seconds", type=float, help="passed to `weir control` (default: its own)")
    parser.add_argument("--load-threads", type=int, default=2, help="closed-loop clients per data plane")
    parser.add_argument("--wait", type=float, default=60.0, help="how long to wait for each event after a kill")
    parser.add_argument("--postgres", default=bench_cluster.POSTGRES_URL, help="server for a fresh database")
    parser.add_argument("--out", type=Path, default=harness.RESULTS)
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
        import tritonclient.grpc  # noqa: F401
    except ImportError as missing:
        say(f"missing prerequisite: {missing.name} (install the project's bench extra)")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    args.load = None
    args.control_flags = ("--lease-seconds", str(args.lease_seconds)) if args.lease_seconds else ()
    runs = []
    with bench_cluster.cluster(args.postgres) as running:
        controls = [running.start_control(name, *args.control_flags) for name in ("control-a", "control-b")]
        addresses = [control.address for control in controls]
        planes = [
            running.start_data_plane("data-plane-0", addresses),
            running.start_data_plane("data-plane-1", addresses[::-1]),
        ]
        versions = [bench_cluster.push_scale(addresses[0], running.root, FLIP, factor) for factor in (2.0, 3.0)]
        bench_cluster.cli(addresses[0], "deploy", FLIP, FLIP, str(versions[0]))
        code = running.root / "job-code"
        code.mkdir()
        (code / "train.py").write_text(JOB_SCRIPT)
        import tritonclient.grpc as grpcclient

        for plane in planes:
            client = grpcclient.InferenceServerClient(plane.address)
            bench_cluster.wait_for(lambda client=client: bool(bench_cluster.answer(client, FLIP)), 180, plane.name)
            client.close()
        args.load = load = Load([plane.address for plane in planes], args.load_threads)
        try:
            for index in range(args.runs):
                runs.append(one_run(index, running, versions, code, args))
                say(f"  {json.dumps(runs[-1])}")
            time.sleep(2)  # the data planes settle on the last rollout's state under load
        finally:
            load.stop()
        planes_by_name = dict(running.data_planes)
        statuses = running.stop()
    report = {
        "command": harness.command_line(),
        "machine": harness.machine_info(),
        "settings": {key: value for key, value in vars(args).items() if key not in ("out", "load", "control_flags")},
        "attaches": {
            name: len(plane.records("attached to the control plane")) for name, plane in planes_by_name.items()
        },
        "runs": runs,
        "answered": load.answered,
        "failed": len(load.failures),
        "failure_samples": [error for _, error in load.failures[:10]],
        "exit_statuses": statuses,
    }
    (args.out / "failover.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(args.out / "failover.md", report)
    plot(args.out / "failover.png", report)
    say(f"inference: {load.answered} answered, {len(load.failures)} failed")
    complete = all(run["next_rollout_step_s"] is not None and run["job_launched_s"] is not None for run in runs)
    return 0 if complete and not load.failures and all(run["steps_applied_twice"] == 0 for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
