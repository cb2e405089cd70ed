"""`weir control-gc`: deletes the artifacts no model version references, keeps the rest."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from weir_control.artifacts import ArtifactStore
from weir_control.model_config import signature_from_config
from weir_control.store import open_store
from weir_proto.control.v1 import registry_pb2

CONFIG = (
    'input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ] output [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] } ]'
)


def test_gc_deletes_only_unreferenced_artifacts(tmp_path: Path) -> None:
    artifacts = ArtifactStore(tmp_path / "artifacts")
    used = artifacts.put([b"used"], hashlib.sha256(b"used").hexdigest())
    unused = artifacts.put([b"unused"], hashlib.sha256(b"unused").hexdigest())
    store = open_store(str(tmp_path / "control.db"))
    store.create_model("m", "", {})
    header = registry_pb2.CreateModelVersionRequest.Header(
        model_name="m", config_pbtxt=CONFIG, artifact_filename="model.pt", artifact_sha256=used.sha256
    )
    version = store.begin_version(header, signature_from_config(CONFIG))
    store.complete_version("m", version, used.sha256, used.size)
    store.close()

    result = subprocess.run(
        [sys.executable, "-m", "weir.cli", "control-gc", "--state-dir", str(tmp_path), "--min-age-seconds", "0",
         "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"deleted": [f"blobs/{unused.sha256[:2]}/{unused.sha256}"]}
    assert artifacts.exists(used.sha256) and not artifacts.exists(unused.sha256)
