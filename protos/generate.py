"""Regenerate the committed protobuf code: ``python protos/generate.py [--out DIR]``.

Proto paths equal Python import paths (``protos/weir_proto/...`` -> ``weir_proto....``), so the
generated imports are right without post-processing.

The ``inference`` protos get type stubs (``.pyi``) and a binary descriptor set, but no ``_pb2.py``:
importing such a module would register ``inference.*`` in protobuf's default pool, where tritonclient,
kserve and mlserver register their own copies and collide. ``weir_proto.inference.pool`` loads the
descriptor set into a private pool instead.

Weir's own packages (``weir.common.v1``, ``weir.control.v1``) are unique names: they get the usual
``_pb2.py``, ``_pb2_grpc.py`` and ``.pyi``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
INFERENCE_DIR = "weir_proto/inference"
INFERENCE_DESCRIPTOR_SET = f"{INFERENCE_DIR}/inference_descriptors.binpb"
WEIR_DIRS = ("weir_proto/common/v1", "weir_proto/control/v1")


def _run_protoc(arguments: list[str]) -> None:
    include = str(Path(protoc.__file__).parent / "_proto")
    status = protoc.main(["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}", *arguments])
    if status != 0:
        raise SystemExit(f"protoc failed with status {status} for {arguments}")


def generate(out_dir: Path) -> None:
    inference_protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / INFERENCE_DIR).glob("*.proto"))
    (out_dir / INFERENCE_DIR).mkdir(parents=True, exist_ok=True)
    _run_protoc([f"--pyi_out={out_dir}", *inference_protos])
    _run_protoc([f"--descriptor_set_out={out_dir / INFERENCE_DESCRIPTOR_SET}", *inference_protos])
    weir_protos = sorted(
        str(p.relative_to(PROTO_ROOT)) for directory in WEIR_DIRS for p in (PROTO_ROOT / directory).glob("*.proto")
    )
    for directory in WEIR_DIRS:
        (out_dir / directory).mkdir(parents=True, exist_ok=True)
    _run_protoc([f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", *weir_protos])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_ROOT, help="output root (default: protos/)")
    args = parser.parse_args(argv)
    generate(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
