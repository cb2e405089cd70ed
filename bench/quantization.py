"""fp32 against int8 dynamic quantization on the CPU, one run: a trained MLP (the demo architecture,
256 -> 1024 -> 1024 -> 10, trained here on a synthetic 10-class problem so top-1 agreement means
something) and a small transformer encoder (2 layers, d_model 256, 32 tokens), both exported with
torch.export and built locally.

    .venv/bin/python bench/quantization.py [--iterations 200] [--duration 8] [--out bench/results]

For each model and precision: latency of one backend call at batch 1 and 32 (in-process, one thread),
throughput through `weir serve` (closed loop, 4 clients sending 32-row requests), and the accuracy
gate's figures on a 1,024-row validation set. Writes quantization.json/.md/.png. GPU figures need a
GPU machine; this run says whether it had one.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402

FEATURES, HIDDEN, CLASSES = 256, 1024, 10
TOKENS, D_MODEL = 32, 256
MAX_BATCH = 64
VALIDATION_ROWS = 1024


def mixture(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A 10-class Gaussian mixture in 256 dimensions with clear margins."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(scale=1.0, size=(CLASSES, FEATURES))
    labels = rng.integers(0, CLASSES, rows)
    return (centres[labels] + rng.normal(scale=1.5, size=(rows, FEATURES))).astype(np.float32), labels


def build_mlp() -> Any:
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(FEATURES, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, CLASSES),
    )  # fmt: skip
    x, y = mixture(8192, seed=1)
    inputs, targets = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(3):
        for start in range(0, len(x), 256):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(
                model(inputs[start : start + 256]), targets[start : start + 256]
            ).backward()
            optimizer.step()
    return model.eval()


def build_encoder() -> Any:
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layer = torch.nn.TransformerEncoderLayer(D_MODEL, 4, 1024, dropout=0.0, batch_first=True)
            self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = torch.nn.Linear(D_MODEL, CLASSES)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.head(self.encoder(tokens).mean(dim=1))

    torch.manual_seed(0)
    return Encoder().eval()


def write_model(root: Path, name: str, module: Any, example: Any, input_dims: list[int], precision: str,
                validation: np.ndarray, gate: str = "refuse") -> None:  # fmt: skip
    import torch

    version = root / name / "1"
    version.mkdir(parents=True)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(version / "model.pt2"))
    np.savez(version / "validation.npz", INPUT=validation)
    dims = ", ".join(str(dim) for dim in input_dims)
    (root / name / "config.pbtxt").write_text(
        f"max_batch_size: {MAX_BATCH}\n"
        f'input [ {{ name: "INPUT" data_type: TYPE_FP32 dims: [ {dims} ] }} ]\n'
        f'output [ {{ name: "OUTPUT" data_type: TYPE_FP32 dims: [ {CLASSES} ] }} ]\n'
        "dynamic_batching { max_queue_delay_microseconds: 500 }\n"
        f'parameters {{ key: "weir_precision" value: {{ string_value: "{precision}" }} }}\n'
        'parameters { key: "weir_validation_inputs" value: { string_value: "validation.npz" } }\n'
        f'parameters {{ key: "weir_accuracy_gate" value: {{ string_value: "{gate}" }} }}\n'
    )


def latencies(root: Path, names: list[str], iterations: int) -> dict[str, dict[str, float]]:
    """Median microseconds per backend call at batch 1 and 32, one intra-op thread, in-process."""
    import asyncio

    import torch
    from prometheus_client import CollectorRegistry

    from weir.metrics import Metrics
    from weir.repository import ModelRepository

    torch.set_num_threads(1)
    results: dict[str, dict[str, float]] = {}

    async def run() -> None:
        with ThreadPoolExecutor(1) as executor:
            repository = ModelRepository(root, executor, Metrics.create(CollectorRegistry()))
            for name in names:
                await repository.load(name)
                loaded = repository.resolve(name, "")
                shape = [TOKENS, D_MODEL] if name.startswith("encoder") else [FEATURES]
                figures: dict[str, float] = {}
                for batch in (1, 32):
                    x = np.random.default_rng(4).standard_normal([batch, *shape]).astype(np.float32)
                    for _ in range(20):
                        loaded.backend.infer({"INPUT": x}, ["OUTPUT"])
                    samples = []
                    for _ in range(iterations):
                        began = time.perf_counter()
                        loaded.backend.infer({"INPUT": x}, ["OUTPUT"])
                        samples.append(time.perf_counter() - began)
                    figures[f"batch{batch}_us"] = float(np.median(samples) * 1e6)
                parameters = loaded.config.parameters
                if "weir_accuracy_measured_top1_agreement" in parameters:
                    figures["top1_agreement"] = float(parameters["weir_accuracy_measured_top1_agreement"].string_value)
                    figures["max_abs_diff"] = float(parameters["weir_accuracy_measured_max_abs_diff"].string_value)
                results[name] = figures

    asyncio.run(run())
    return results


def throughput(root: Path, names: list[str], duration: float, scratch: Path) -> dict[str, float]:
    """Requests/s of 32-row requests through `weir serve`, 4 closed-loop clients, server on CPU 0."""
    server = harness.start_weir(root, "--torch-intra-op-threads", "1", models=tuple(names))
    rows_per_second = {}
    try:
        for name in names:
            out = scratch / f"bench-{name}"
            command = [
                *harness.weir_command(), "bench", "--url", server.url, "--model", name, "--concurrency", "4",
                "--batch-rows", "32", "--duration", str(duration), "--warmup", "2", "--out", str(out),
            ]  # fmt: skip
            subprocess.run(command, check=True, capture_output=True, timeout=duration * 4 + 120)
            level = json.loads((out / "results.json").read_text())["levels"][0]
            rows_per_second[name] = level["throughput_rps"] * 32
    finally:
        server.stop()
    return rows_per_second


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--out", type=Path, default=harness.RESULTS)
    args = parser.parse_args(argv)
    import torch

    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        root = scratch / "repository"
        validation, labels = mixture(VALIDATION_ROWS, seed=2)
        mlp, encoder = build_mlp(), build_encoder()
        with torch.inference_mode():
            trained_accuracy = float((mlp(torch.from_numpy(validation)).argmax(1).numpy() == labels).mean())
        tokens = np.random.default_rng(3).standard_normal((VALIDATION_ROWS, TOKENS, D_MODEL)).astype(np.float32)
        for precision in ("fp32", "int8_dynamic"):
            suffix = "fp32" if precision == "fp32" else "int8"
            write_model(root, f"mlp_{suffix}", mlp, torch.zeros(2, FEATURES), [FEATURES], precision, validation)
            # the encoder is untrained (its class margins are tiny): its gate warns instead of refusing, and the
            # figures are reported as measured
            write_model(root, f"encoder_{suffix}", encoder, torch.zeros(2, TOKENS, D_MODEL), [TOKENS, D_MODEL],
                        precision, tokens, gate="warn")  # fmt: skip
        names = ["mlp_fp32", "mlp_int8", "encoder_fp32", "encoder_int8"]
        calls = latencies(root, names, args.iterations)
        served = throughput(root, names, args.duration, scratch)
    report = {
        "command": harness.command_line(),
        "machine": harness.machine_info(),
        "gpu": torch.cuda.is_available(),
        "mlp_trained_accuracy": trained_accuracy,
        "latency": calls,
        "throughput_rows_per_second": served,
    }
    ratios = {
        model: {
            "batch1": calls[f"{model}_fp32"]["batch1_us"] / calls[f"{model}_int8"]["batch1_us"],
            "batch32": calls[f"{model}_fp32"]["batch32_us"] / calls[f"{model}_int8"]["batch32_us"],
            "served": served[f"{model}_int8"] / served[f"{model}_fp32"],
        }
        for model in ("mlp", "encoder")
    }
    report["int8_speedup"] = ratios
    mlp_gate = calls["mlp_int8"]
    report["goal_met"] = ratios["mlp"]["served"] >= 1.5 and mlp_gate.get("top1_agreement", 0) >= 0.99
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quantization.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(calls, served, args.out / "quantization.png")
    lines = [
        "# fp32 vs int8 dynamic quantization on the CPU, one run",
        "",
        "```",
        report["command"],
        "```",
        "",
        f"- Machine: {report['machine']['cpu_count']} CPUs, {report['machine']['cpu_model']}; GPU: "
        f"{'yes' if report['gpu'] else 'none (no GPU figures in this run)'}.",
        f"- MLP trained here on a synthetic 10-class mixture: fp32 validation accuracy {trained_accuracy:.3f}. The "
        "encoder is untrained (random weights: its logits sit close together, so its top-1 agreement is a lower "
        "bound of what a trained encoder shows); its gate is set to warn.",
        "- Latency: one in-process backend call, one intra-op thread, median of "
        f"{args.iterations}. Served: `weir serve --torch-intra-op-threads 1`, `weir bench` 4 closed-loop clients "
        f"sending 32-row requests for {args.duration:g} s per model.",
        "",
        "| model | precision | batch 1 us | batch 32 us | served rows/s | top-1 agreement | max abs diff |",
        "|---|---|--:|--:|--:|--:|--:|",
    ]
    for name in names:
        figures = calls[name]
        agreement = f"{figures['top1_agreement']:.4f}" if "top1_agreement" in figures else "-"
        difference = f"{figures['max_abs_diff']:.4g}" if "max_abs_diff" in figures else "-"
        model, precision = name.split("_")
        lines.append(
            f"| {model} | {precision} | {figures['batch1_us']:,.0f} | {figures['batch32_us']:,.0f} | "
            f"{served[name]:,.0f} | {agreement} | {difference} |"
        )
    lines += [
        "",
        "int8/fp32 speed (fp32 time over int8 time; served: int8 rows/s over fp32 rows/s):",
        "",
        "| model | batch 1 | batch 32 | served |",
        "|---|--:|--:|--:|",
        *[
            f"| {model} | {ratio['batch1']:.2f}x | {ratio['batch32']:.2f}x | **{ratio['served']:.2f}x** |"
            for model, ratio in ratios.items()
        ],
        "",
        f"Goal (MLP: int8 >= 1.5x fp32 throughput at batch 32, top-1 agreement >= 99%): "
        f"**{'met' if report['goal_met'] else 'not met'}**.",
        "",
    ]
    (args.out / "quantization.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


def plot(calls: dict[str, dict[str, float]], served: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    models = ["mlp", "encoder"]
    for offset, precision in enumerate(("fp32", "int8")):
        positions = [index + offset * 0.38 for index in range(len(models))]
        axes[0].bar(positions, [calls[f"{m}_{precision}"]["batch32_us"] for m in models], 0.36, label=precision)
        axes[1].bar(positions, [served[f"{m}_{precision}"] for m in models], 0.36, label=precision)
    for axis, title in zip(
        axes, ("batch-32 call, us (lower is better)", "served rows/s (higher is better)"), strict=True
    ):
        axis.set_xticks([index + 0.19 for index in range(len(models))], models)
        axis.set_title(title)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
