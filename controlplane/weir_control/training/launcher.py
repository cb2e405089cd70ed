"""The first process of a job attempt: ``python -m weir_control.training.launcher EXIT_FILE -- COMMAND...``.

The executor starts it as the leader of a new session, so it and everything below it (torchrun and its
workers) form one process group that cancel ends as a whole. It runs COMMAND and writes COMMAND's exit
status to EXIT_FILE atomically, so a control plane that restarted meanwhile (and so is not its
parent and cannot wait for it) still learns how the attempt ended.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m weir_control.training.launcher EXIT_FILE -- COMMAND...", file=sys.stderr)
        return 2
    exit_file = Path(argv[0])
    child = subprocess.Popen(argv[2:])

    def forward(signum: int, _frame: object) -> None:
        child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = child.wait()
    staged = exit_file.with_suffix(".tmp")
    staged.write_text(json.dumps({"exit_code": code, "at": time.time()}))
    os.replace(staged, exit_file)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
