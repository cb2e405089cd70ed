"""What a lease handover loses in drift monitoring (issue 16): records sampled by a data plane that never
count in a judged window because the control-plane replica holding them died.

Two `weir control` replicas (a, b) on a fresh PostgreSQL database; a data plane attached to each (one
address each, so the killed replica's data plane stops sending: what is measured is the control plane's
loss, not a data plane's failover); a model sampled at rate 1.0, so every answered request is a record.
Each run: ``--rate`` requests/s through each data plane for ``--before`` s, then the lease holder (a)
is killed with SIGKILL (its data plane's load stops just before), and b's data plane keeps sending for
``--after`` s. Once every window is judged: records counted in the judged windows, against requests
answered; the difference is the loss. The loss is set beside the exposure: the requests answered
through the killed replica in the windows it had not handed in or judged when it died (those whose end
+ grace + merge delay was after the kill). Windows judged twice (same start) are counted too (goal 0).

    .venv/bin/python bench/drift_handover.py [--runs 3] [--rate 40] [--window 5] [--before 12] [--after 12]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
from pathlib import Path
from typing import Any

import cluster as bench_cluster
import harness

ENDPOINT = "drifted"
GRACE_SECONDS = 2.0  # weir_control.monitoring.monitor.WINDOW_GRACE_SECONDS
MERGE_DELAY_SECONDS = 2.0  # weir_control.monitoring.partials.MERGE_DELAY_SECONDS
CONFIG = """
max_batch_size: 8
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 3 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 3 ] } ]
parameters { key: "weir_monitoring_sample_rate" value: { string_value: "1.0" } }
"""


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Load:
    """``rate`` requests/s to one data plane until stopped; the wall time of each answered request."""

    def __init__(self, url: str, rate: float, name: str) -> None:
        self.url, self.rate, self.name = url, rate, name
        self.answered: list[float] = []
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"load-{name}", daemon=True)

    def start(self) -> Load:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        import numpy as np
        import tritonclient.grpc as grpcclient

        tensor = grpcclient.InferInput("INPUT__0", [1, 3], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 3), np.float32))
        with grpcclient.InferenceServerClient(self.url) as client:
            index = 0
            began = time.monotonic()
            while not self._stop.is_set():
                index += 1
                try:
                    client.infer(ENDPOINT, [tensor], request_id=f"{self.name}-{index}", client_timeout=10)
                    self.answered.append(time.time())
                except Exception:
                    self.failed += 1
                pause = began + index / self.rate - time.monotonic()
                if pause > 0:
                    self._stop.wait(pause)


def drift_report(address: str) -> Any:
    import grpc

    from weir_proto.auth import client_metadata
    from weir_proto.control.v1 import monitoring_pb2, monitoring_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        return monitoring_pb2_grpc.MonitoringStub(channel).GetDriftReport(
            monitoring_pb2.GetDriftReportRequest(endpoint=ENDPOINT),
            metadata=client_metadata(bench_cluster.ADMIN_TOKEN),
            timeout=10,
        )


def set_policy(address: str, window: float) -> None:
    import grpc

    from weir_proto.auth import client_metadata
    from weir_proto.control.v1 import monitoring_pb2, monitoring_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        monitoring_pb2_grpc.MonitoringStub(channel).SetMonitoringPolicy(
            monitoring_pb2.MonitoringPolicy(endpoint=ENDPOINT, window_seconds=window, min_records=1),
            metadata=client_metadata(bench_cluster.ADMIN_TOKEN),
            timeout=30,
        )


def one_run(index: int, args: argparse.Namespace) -> dict[str, Any]:
    with bench_cluster.cluster(args.postgres) as running:
        holder = running.start_control("a", "--lease-seconds", str(args.lease_seconds))  # first: it holds the lease
        survivor = running.start_control("b", "--lease-seconds", str(args.lease_seconds))
        planes = [
            running.start_data_plane("plane-a", [holder.address]),
            running.start_data_plane("plane-b", [survivor.address]),
        ]
        config = running.root / "config.pbtxt"
        config.write_text(CONFIG)
        artifact = bench_cluster.save_scale_model(running.root / "artifacts" / "model.pt", 2.0)
        version = bench_cluster.cli(holder.address, "models", "push", ENDPOINT, str(artifact), "--config", str(config))
        bench_cluster.cli(holder.address, "deploy", ENDPOINT, ENDPOINT, str(version["version"]))
        set_policy(holder.address, args.window)
        import tritonclient.grpc as grpcclient

        for plane in planes:
            url = f"{harness.LOOPBACK}:{plane.port}"

            def ready(url: str = url) -> bool:
                with grpcclient.InferenceServerClient(url) as client:
                    return bool(client.is_model_ready(ENDPOINT))

            bench_cluster.wait_for(ready, 120, f"{plane.name} serving {ENDPOINT}")
        time.sleep(2.5)  # the survivor re-reads the policy (every 2 s)
        # start on a window boundary: the first window holds only this run's records
        first = math.ceil(time.time() / args.window) * args.window
        time.sleep(max(0.0, first - time.time()) + 0.05)
        loads = [Load(f"{harness.LOOPBACK}:{plane.port}", args.rate, plane.name).start() for plane in planes]
        time.sleep(args.before)
        loads[0].stop()  # every request through the holder answered before it dies
        killed_at = time.time()
        holder.kill()
        say(f"run {index + 1}: killed the lease holder after {args.before:g} s")
        time.sleep(args.after)
        loads[1].stop()
        ended = time.time()
        last_end = math.ceil(ended / args.window) * args.window

        def judged() -> bool:
            return any(w.end.ToNanoseconds() / 1e9 >= last_end - 1e-6 for w in drift_report(survivor.address).windows)

        bench_cluster.wait_for(judged, 60, "the last window judged")
        windows = [w for w in drift_report(survivor.address).windows if w.start.ToNanoseconds() / 1e9 >= first - 1e-6]
        counted = sum(w.records for w in windows)
        starts = [w.start.ToNanoseconds() for w in windows]
        answered = sum(len(load.answered) for load in loads)
        # the holder's windows still open when it died: ends + grace + merge delay after the kill
        exposed = sum(
            1
            for at in loads[0].answered
            if math.floor(at / args.window) * args.window + args.window + GRACE_SECONDS + MERGE_DELAY_SECONDS
            > killed_at
        )
        took_over = [stamp for stamp, _ in survivor.records("lease acquired")]
        return {
            "answered": answered,
            "answered_through_killed": len(loads[0].answered),
            "counted": counted,
            "lost": answered - counted,
            "exposed_through_killed": exposed,
            "failed_requests": sum(load.failed for load in loads),
            "windows": len(windows),
            "windows_judged_twice": len(starts) - len(set(starts)),
            "lease_taken_over": bool(took_over),
        }


def write_markdown(path: Path, report: dict[str, Any]) -> None:
    lines = [
        "# Drift monitoring: what a lease handover loses",
        "",
        f"`{report['command']}`",
        "",
        f"Machine: {report['machine']['cpu_model']} ({report['machine']['cpu_count']} CPUs); "
        f"window {report['window_s']:g} s, "
        f"{report['rate']:g} requests/s through each data plane, holder killed after {report['before_s']:g} s.",
        "",
        "| run | answered | through killed | counted | lost | exposed (killed's open windows) | windows "
        "| judged twice |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for index, run in enumerate(report["runs"], 1):
        lines.append(
            f"| {index} | {run['answered']} | {run['answered_through_killed']} | {run['counted']} | {run['lost']} "
            f"| {run['exposed_through_killed']} | {run['windows']} | {run['windows_judged_twice']} |"
        )
    lines += [
        "",
        "lost = answered - counted in the judged windows. exposed = requests through the killed replica in the",
        "windows it had not judged or handed in whole when it died: what it lost before every replica handed in",
        "its open windows every second (measured then: lost = exposed, 283 of 283).",
    ]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rate", type=float, default=40.0, help="requests/s through each data plane")
    parser.add_argument("--window", type=float, default=5.0, help="the drift window, seconds")
    parser.add_argument("--before", type=float, default=12.0, help="seconds of load before the kill")
    parser.add_argument("--after", type=float, default=12.0, help="seconds of load after the kill")
    parser.add_argument("--lease-seconds", type=float, default=2.0)
    parser.add_argument("--postgres", default=bench_cluster.POSTGRES_URL)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    runs = [one_run(index, args) for index in range(args.runs)]
    report = {
        "command": harness.command_line(),
        "machine": harness.machine_info(),
        "window_s": args.window,
        "rate": args.rate,
        "before_s": args.before,
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "drift_handover.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(args.out / "drift_handover.md", report)
    print(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
