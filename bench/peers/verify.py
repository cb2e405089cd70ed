"""One-request check of each peer: start it, ServerReady/ModelReady, one tritonclient.grpc infer of a
[1, 256] FP32 INPUT__0, compare the [1, 10] OUTPUT__0 with a direct torch call (allclose), stop it.

    .venv/bin/python bench/peers/verify.py [floor mlserver pytriton kserve ray]

Exits 0 if every named peer passed; prints one line per peer and writes nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

INFER = """
import sys, json, numpy as np, tritonclient.grpc as g
url = sys.argv[1]
x = np.random.default_rng(0).standard_normal((1, 256), dtype=np.float32)
c = g.InferenceServerClient(url=url)
i = g.InferInput("INPUT__0", [1, 256], "FP32"); i.set_data_from_numpy(x)
r = c.infer("mlp_classifier", [i], outputs=[g.InferRequestedOutput("OUTPUT__0")], client_timeout=60)
y = r.as_numpy("OUTPUT__0")
print(json.dumps({"shape": list(y.shape), "dtype": str(y.dtype), "values": y.astype(float).ravel().tolist()}))
"""


def listening(handle: common.Handle) -> list[str]:
    """Listening TCP sockets of the server's process group (inside its namespace for a netns peer)."""
    pids = subprocess.run(["pgrep", "-g", str(handle.process.pid)], capture_output=True, text=True).stdout.split()
    output = subprocess.run([*handle.client_prefix(), "ss", "-ltnpH"], capture_output=True, text=True).stdout
    found = []
    for line in output.splitlines():
        if any(f"pid={pid}," in line for pid in pids):
            fields = line.split()
            found.append(fields[3])
    return sorted(set(found))


def is_loopback(address: str) -> bool:
    return address.startswith(("127.", "[::1]:", "[::ffff:127."))


def check(name: str, model_path: Path) -> dict:
    import numpy as np
    import torch

    peer = common.load(name)
    problem = peer.available()
    if problem:
        return {"peer": name, "ok": False, "error": problem}
    began = time.monotonic()
    handle = peer.start(model_path=model_path)
    startup = time.monotonic() - began
    try:
        bound = listening(handle)
        result = subprocess.run(
            [*handle.client_prefix(), sys.executable, "-c", INFER, handle.url],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode != 0:
            return {"peer": name, "ok": False, "error": result.stderr.strip()[-2000:], "log": handle.log_tail()}
        got = json.loads(result.stdout.strip().splitlines()[-1])
    finally:
        status = peer.stop(handle)
    module = torch.jit.load(str(model_path)).eval()
    with torch.inference_mode():
        want = module(torch.from_numpy(common.check_input())).numpy()
    values = np.asarray(got["values"], dtype=np.float32).reshape(got["shape"])
    # a netns peer may bind anything: its namespace has only loopback
    loopback_only = handle.netns_pid is not None or (bool(bound) and all(map(is_loopback, bound)))
    ok = (
        loopback_only
        and got["shape"] == [1, 10]
        and got["dtype"] == "float32"
        and np.allclose(values, want, rtol=1e-5, atol=1e-6)
    )
    return {
        "peer": name,
        "ok": bool(ok),
        "shape": got["shape"],
        "max_abs_diff": float(np.abs(values - want).max()) if values.shape == want.shape else None,
        "startup_s": round(startup, 1),
        "listening": bound,
        "loopback_only": loopback_only,
        "stop_status": status,
    }


def main() -> int:
    names = sys.argv[1:] or list(common.NAMES)
    failed = 0
    with tempfile.TemporaryDirectory(prefix="weir-peers-verify-") as tmp:
        model_path = common.build_model(Path(tmp))
        for name in names:
            try:
                outcome = check(name, model_path)
            except Exception as error:
                outcome = {"peer": name, "ok": False, "error": str(error)[-3000:]}
            failed += not outcome["ok"]
            print(json.dumps(outcome), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
