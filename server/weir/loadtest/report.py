"""results.json, results.md and the two plots of a `weir bench` run.

The Markdown and the plots are derived from the same dictionary that results.json holds, so the three
never disagree. matplotlib is imported here only, with the Agg backend (no display needed).
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from weir.loadtest.prometheus import STAGES

PACKAGES = ("weir", "grpcio", "protobuf", "numpy", "tritonclient", "matplotlib")
CDF_POINTS = 2000  # quantiles drawn per level: enough for a smooth curve, small PNG work for 1e6 requests


def machine_info() -> dict[str, Any]:
    packages: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": packages,
    }
    if hasattr(os, "sched_getaffinity"):
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    return info


def cpu_model() -> str:
    """The CPU's model name, for reports (benchmark numbers mean little without it)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_all(out: Path, results: Mapping[str, Any], latencies_ns: Sequence[np.ndarray]) -> list[Path]:
    """Write every output file; returns their paths. Plots are skipped (with a note in results.md) when
    matplotlib is not installed."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json"]
    written[0].write_text(json.dumps(results, indent=2) + "\n")
    plots = write_plots(out, results, latencies_ns)
    written += plots
    markdown = out / "results.md"
    markdown.write_text(markdown_report(results, [path.name for path in plots]))
    written.insert(1, markdown)
    return written


# --- Markdown -------------------------------------------------------------------------------------


def _ms(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _errors_cell(level: Mapping[str, Any]) -> str:
    if not level["failed"]:
        return "0"
    parts = [f"{code} {count}" for code, count in level["errors"].items()]
    if level["dropped"]:
        parts.append(f"dropped {level['dropped']}")
    return f"{level['failed']:,} ({level['error_rate'] * 100:.2f} %: {', '.join(parts)})"


def _slo_cell(level: Mapping[str, Any]) -> str:
    if not level["slo"]:
        return "-"
    return "PASS" if level["slo_passed"] else "FAIL"


def markdown_report(results: Mapping[str, Any], plot_names: Sequence[str]) -> str:
    settings, target, machine = results["settings"], results["target"], results["machine"]
    server, model, request = target["server"], target["model"], target["request"]
    packages = ", ".join(f"{name} {version}" for name, version in machine["packages"].items() if version)
    inputs = ", ".join(
        f"`{name}` {spec['datatype']} {request['shapes'][name]}"
        for name, spec in ((item["name"], item) for item in model["inputs"])
    )
    loop = "closed loop" if settings["mode"] == "closed" else f"open loop, {settings['mode']} arrivals"
    title = f"# weir bench: `{model['name']}` on {server['name'] or 'server'} {server['version']}".rstrip()
    lines = [
        title + (f" ({results['label']})" if results["label"] else ""),
        "",
        "```",
        results["command"],
        "```",
        "",
        f"- Target: `{target['url']}` ({server['name']} {server['version']}); model `{model['name']}`"
        f" ({model['platform'] or 'platform n/a'}), max_batch_size"
        f" {target['max_batch_size'] if target['max_batch_size'] is not None else 'n/a (no ModelConfig)'}",
        f"- Request: {inputs}; {request['payload']} payload ({request['bytes']:,} bytes serialized),"
        f" {settings['input_data']} data, every output",
        f"- Load: {loop}; {settings['duration_s']:g} s measured after {settings['warmup_s']:g} s warm-up per level;"
        f" {settings['processes']} worker process(es); deadline {settings['timeout_ms']:g} ms per request"
        + (f"; at most {settings['max_in_flight']} in flight" if settings["mode"] != "closed" else ""),
        f"- Machine: {machine['cpu_count']} CPUs ({machine.get('cpus_usable', '?')} usable), {machine['cpu_model']};"
        f" {machine['platform']}; Python {machine['python']}; {packages}",
        f"- Started {results['started_at']}, took {results['total_seconds']:.0f} s;"
        f" the client and the server share this machine's CPUs",
        "",
        "| level | requests | throughput req/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | errors | SLO |",
        "|---|--:|--:|--:|--:|--:|--:|--:|---|---|",
    ]
    for level in results["levels"]:
        latency = level["latency_ms"]
        lines.append(
            f"| {level['level']} | {level['requests']:,} | {level['throughput_rps']:,.1f} | {_ms(latency['p50'])}"
            f" | {_ms(latency['p90'])} | {_ms(latency['p99'])} | {_ms(latency['p999'])} | {_ms(latency['max'])}"
            f" | {_errors_cell(level)} | {_slo_cell(level)} |"
        )
    lines += [
        "",
        "Latency is per request as the client saw it"
        + (
            ", from the request's scheduled send time (open loop: a late send is charged to the request)."
            if settings["mode"] != "closed"
            else ", from send to response."
        )
        + " Throughput is successful requests per second of the measured window (until the last of them ended).",
    ]
    lines += _slo_section(results)
    lines += _budget_section(results)
    if plot_names:
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plot_names]
    else:
        lines += ["", "Plots skipped: matplotlib is not installed (`pip install matplotlib`)."]
    return "\n".join(lines) + "\n"


def _slo_section(results: Mapping[str, Any]) -> list[str]:
    if not results["slos"]:
        return []
    verdict = "every level passes" if results["slo_passed"] else "at least one level FAILS (exit status 1)"
    lines = ["", f"## SLOs: {verdict}", "", "| level | SLO | observed | result |", "|---|---|--:|---|"]
    for level in results["levels"]:
        for outcome in level["slo"]:
            observed = "n/a" if outcome["observed"] is None else f"{outcome['observed']:,.4g}"
            lines.append(
                f"| {level['level']} | `{outcome['slo']}` | {observed} | {'PASS' if outcome['passed'] else 'FAIL'} |"
            )
    lines += ["", "Observed values: latencies in ms, throughput in req/s, error rates as fractions, counts."]
    return lines


def _budget_section(results: Mapping[str, Any]) -> list[str]:
    if not results["target"]["metrics_url"]:
        return []
    lines = ["", "## Server latency budget", ""]
    levels = [level for level in results["levels"] if level["stage_budget"] is not None]
    if not levels:
        return [*lines, "The server's metrics have no `weir_inference_*` latency histograms: budget skipped."]
    header = " | ".join(f"{stage} ms (share)" for stage in STAGES)
    lines += [
        f"| level | client mean ms | server end-to-end ms | {header} | other ms | outside server ms |",
        "|---|--:|--:|" + "--:|" * len(STAGES) + "--:|--:|",
    ]
    for level in levels:
        budget = level["stage_budget"]
        end_to_end = budget["end_to_end"]["mean_ms"]
        cells = []
        for stage in STAGES:
            entry = budget["stages"][stage]
            cells.append("n/a" if entry is None else f"{entry['mean_ms']:.3f} ({(entry['share'] or 0) * 100:.0f} %)")
        client_mean = level["latency_ms"]["mean"]
        outside = None if client_mean is None else client_mean - end_to_end
        lines.append(
            f"| {level['level']} | {_ms(client_mean)} | {end_to_end:.3f} | {' | '.join(cells)}"
            f" | {budget['unaccounted_ms']:.3f} | {_ms(outside)} |"
        )
    lines += [
        "",
        "From the server's Prometheus histograms (`weir_inference_stage_duration_seconds`,"
        " `weir_inference_request_duration_seconds`), scraped when each level's measured window began and after"
        " its last response: the mean per request of that window. Share is of the server's end-to-end mean;"
        ' "other" is end-to-end minus the four stages (servicer, routing); "outside server" is the client\'s mean'
        " minus the server's: network, gRPC on both sides and the client itself.",
    ]
    return lines


# --- Plots ----------------------------------------------------------------------------------------


def write_plots(out: Path, results: Mapping[str, Any], latencies_ns: Sequence[np.ndarray]) -> list[Path]:
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    def plain_log_ticks(axis: Any, low: float, high: float) -> None:
        """Ticks as 0.5, 2, 30 rather than 5x10^-1: every minor tick labelled over a short range, the
        1-2-5 steps over a wide one."""
        plain = FuncFormatter(lambda value, _: f"{value:g}")
        if high > 0 and low > 0 and high / low < 20:
            axis.set_minor_formatter(plain)
        else:
            axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            axis.set_minor_formatter(NullFormatter())
        axis.set_major_formatter(plain)

    levels = results["levels"]
    title = f"{results['target']['model']['name']} - {results['label'] or results['settings']['mode']}"

    figure, axes = plt.subplots(figsize=(8, 5))
    for level, values in zip(levels, latencies_ns, strict=True):
        if values.size == 0:
            continue
        quantiles = np.linspace(0.0, 1.0, min(CDF_POINTS, values.size))
        axes.plot(np.quantile(values / 1e6, quantiles), quantiles, label=level["level"])
    measured = [values for values in latencies_ns if values.size]
    axes.set_xscale("log")
    if measured:
        plain_log_ticks(
            axes.xaxis, min(float(v.min()) for v in measured) / 1e6, max(float(v.max()) for v in measured) / 1e6
        )
    axes.set_xlabel("latency (ms, log scale)")
    axes.set_ylabel("fraction of requests")
    axes.set_title(f"Latency CDF per level: {title}")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    cdf = out / "latency_cdf.png"
    figure.tight_layout()
    figure.savefig(cdf, dpi=110)
    plt.close(figure)

    figure, axes = plt.subplots(figsize=(8, 5))
    points = [(level["throughput_rps"], level["latency_ms"]["p99"], level["level"]) for level in levels]
    points = [point for point in points if point[1] is not None]
    if points:
        axes.plot([point[0] for point in points], [point[1] for point in points], marker="o")
        for throughput, p99, name in points:
            axes.annotate(name, (throughput, p99), textcoords="offset points", xytext=(6, 6))
    axes.set_yscale("log")
    if points:
        plain_log_ticks(axes.yaxis, min(point[1] for point in points), max(point[1] for point in points))
    axes.set_xlabel("throughput (successful requests/s)")
    axes.set_ylabel("p99 latency (ms, log scale)")
    axes.set_title(f"Throughput vs p99: {title}")
    axes.grid(True, which="both", alpha=0.3)
    curve = out / "throughput_p99.png"
    figure.tight_layout()
    figure.savefig(curve, dpi=110)
    plt.close(figure)
    return [cdf, curve]
