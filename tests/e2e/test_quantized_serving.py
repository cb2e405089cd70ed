"""A quantized model through `weir serve` with tritonclient: int8 dynamic on the demo export model
answers close to fp32, and the accuracy gate's figures are visible in ModelConfig and /metrics."""

from __future__ import annotations

import shutil
import urllib.request
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from tests.conftest import start_weir

GATE = (
    'parameters { key: "weir_precision" value: { string_value: "int8_dynamic" } }\n'
    # the demo MLP is untrained: its logits sit close together (see tests/server/test_optimization.py)
    'parameters { key: "weir_accuracy_min_top1_agreement" value: { string_value: "0.8" } }\n'
)


def test_an_int8_model_serves_with_its_accuracy_figures_visible(demo_repository_template: Path, tmp_path: Path) -> None:
    repository = tmp_path / "repository"
    repository.mkdir()
    for name, extra in (("mlp_int8", GATE), ("mlp_fp32", "")):
        shutil.copytree(demo_repository_template / "mlp_export", repository / name)
        config = repository / name / "config.pbtxt"
        config.write_text(config.read_text().replace('name: "mlp_export"', f'name: "{name}"') + "\n" + extra)
    server = start_weir(repository)
    try:
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            parameters = client.get_model_config("mlp_int8", as_json=True)["config"]["parameters"]
            assert float(parameters["weir_accuracy_measured_top1_agreement"]["string_value"]) >= 0.8
            # the untrained demo MLP's largest int8 logit error depends on the CPU's kernels (0.047 to 0.057)
            assert float(parameters["weir_accuracy_measured_max_abs_diff"]["string_value"]) < 0.1
            x = np.random.default_rng(8).standard_normal((4, 256)).astype(np.float32)
            answers = {}
            for name in ("mlp_int8", "mlp_fp32"):
                tensor = grpcclient.InferInput("features", [4, 256], "FP32")
                tensor.set_data_from_numpy(x)
                answers[name] = client.infer(name, [tensor]).as_numpy("logits")
            assert np.max(np.abs(answers["mlp_int8"] - answers["mlp_fp32"])) < 0.1
        with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
            metrics = response.read().decode()
        assert 'weir_model_accuracy_top1_agreement{model="mlp_int8",precision="int8_dynamic",version="1"}' in metrics
    finally:
        server.terminate_and_wait()
