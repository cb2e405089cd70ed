"""How every `weir` control-plane command reports a failure: JSON with --json, else one line on stderr;
exit status 1."""

from __future__ import annotations

import argparse
import json
import sys

from weir_proto.errors import WeirError


def report_error(args: argparse.Namespace, error: WeirError) -> int:
    if getattr(args, "json", False):
        print(json.dumps({"error": {"code": error.kind.name, "message": error.message}}))
    else:
        print(f"weir {args.command}: {error.kind.name}: {error.message}", file=sys.stderr)
    return 1
