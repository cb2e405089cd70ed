"""Build Weir's demo model repository locally (nothing is downloaded).

    python examples/build_demo_repository.py --out build/demo-repository

Models:
  mlp_classifier  TorchScript MLP 256 -> 1024 -> 1024 -> 10, FP32 INPUT__0 [-1, 256] -> FP32 OUTPUT__0 [-1, 10]
                  (Triton naming), dynamic batching
  mlp_export      the same weights saved with torch.export (model.pt2), inputs named by meaning
  text_stats      TorchScript model with a BYTES input: TEXT [-1, 1] -> FP32 STATS [-1, 2], BYTES UPPER [-1, 1]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

FEATURES, HIDDEN, CLASSES, MAX_BATCH = 256, 1024, 10, 64


class MLPClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class TextStats(nn.Module):
    """Per text: (characters, words) and the upper-cased text. Shows BYTES in and out."""

    def forward(self, texts: list[str]) -> tuple[torch.Tensor, list[str]]:
        stats = torch.zeros(len(texts), 2)
        upper: list[str] = []
        for index, text in enumerate(texts):
            stats[index, 0] = float(len(text))
            stats[index, 1] = float(len(text.split()))
            upper.append(text.upper())
        return stats, upper


MLP_CONFIG = """\
name: "mlp_classifier"
platform: "pytorch_libtorch"
max_batch_size: {max_batch}
input [ {{ name: "INPUT__0" data_type: TYPE_FP32 dims: [ {features} ] }} ]
output [ {{ name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ {classes} ] }} ]
# One instance: on a small machine a second one only competes with the event loop for the CPU,
# while requests that arrive during an execution share the next one (dynamic batching). A lone
# request runs at once (the batcher is work-conserving).
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
dynamic_batching {{ max_queue_delay_microseconds: 1000 }}
"""

EXPORT_CONFIG = """\
name: "mlp_export"
backend: "pytorch"
default_model_filename: "model.pt2"
max_batch_size: {max_batch}
input [ {{ name: "features" data_type: TYPE_FP32 dims: [ {features} ] }} ]
output [ {{ name: "logits" data_type: TYPE_FP32 dims: [ {classes} ] }} ]
"""

TEXT_CONFIG = """\
name: "text_stats"
backend: "pytorch"
max_batch_size: 16
input [ { name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] } ]
output [
  { name: "STATS" data_type: TYPE_FP32 dims: [ 2 ] },
  { name: "UPPER" data_type: TYPE_STRING dims: [ 1 ] }
]
"""


def build(out: Path, seed: int = 0) -> None:
    torch.manual_seed(seed)
    mlp = MLPClassifier().eval()
    sizes = {"max_batch": MAX_BATCH, "features": FEATURES, "classes": CLASSES}

    (out / "mlp_classifier" / "1").mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(mlp), str(out / "mlp_classifier" / "1" / "model.pt"))
    (out / "mlp_classifier" / "config.pbtxt").write_text(MLP_CONFIG.format(**sizes))

    (out / "mlp_export" / "1").mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    program = torch.export.export(mlp, (torch.zeros(2, FEATURES),), dynamic_shapes={"features": {0: batch}})
    torch.export.save(program, str(out / "mlp_export" / "1" / "model.pt2"))
    (out / "mlp_export" / "config.pbtxt").write_text(EXPORT_CONFIG.format(**sizes))

    (out / "text_stats" / "1").mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(TextStats()), str(out / "text_stats" / "1" / "model.pt"))
    (out / "text_stats" / "config.pbtxt").write_text(TEXT_CONFIG)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/demo-repository"))
    args = parser.parse_args()
    build(args.out)
    print(f"demo repository written to {args.out}")


if __name__ == "__main__":
    main()
