"""The ``weir`` command line.

``weir serve`` flags are generated from ``ServerSettings``: every flag has a ``WEIR_*`` environment
variable and the default documented on the dataclass field (flag > environment > default).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import select
import signal
import sys
import threading
import time
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from weir import __version__
from weir.errors import WeirError
from weir.loadtest.options import add_bench_arguments
from weir.logs import configure_logging
from weir.settings import ControlMode, ServerSettings, environment_variable, settings_fields
from weir.up import add_up_arguments
from weir_control.cli import CLIENT_COMMANDS
from weir_proto.listen import listen_failure

log = logging.getLogger("weir.cli")


_TYPE_WORDS: dict[Any, str] = {
    int: "an integer",
    float: "a number",
    str: "a string",
    bool: "true or false",
    Path: "a path",
    ControlMode: "one of " + ", ".join(mode.value for mode in ControlMode),
}


def _flag(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _converter(field_type: Any) -> Any:
    if field_type is Path:
        return Path
    if field_type is ControlMode:
        return ControlMode
    if field_type in (int, float, str):
        return field_type
    if field_type is bool:
        return _boolean
    raise TypeError(f"no CLI converter for {field_type}")


def _boolean(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(ServerSettings)
    for settings_field in settings_fields():
        field_type = hints[settings_field.name]
        env_name = environment_variable(settings_field.name)
        doc = settings_field.metadata.get("doc", "")
        default: Any = settings_field.default
        if typing.get_origin(field_type) is tuple:
            shown = ",".join(default) if default else "none"
            parser.add_argument(
                _flag(settings_field.name), action="append", dest=settings_field.name, metavar="NAME",
                help=f"{doc} [env {env_name}, comma-separated; default: {shown}]",
            )  # fmt: skip
            continue
        shown = default.value if isinstance(default, ControlMode) else default
        choices = [mode.value for mode in ControlMode] if field_type is ControlMode else None
        parser.add_argument(
            _flag(settings_field.name), dest=settings_field.name, default=None, choices=choices,
            help=f"{doc} [env {env_name}; default: {shown}]",
        )  # fmt: skip


def settings_from(namespace: argparse.Namespace, environ: typing.Mapping[str, str]) -> ServerSettings:
    """Flag > WEIR_* environment variable > the dataclass default. Errors name the flag."""
    hints = typing.get_type_hints(ServerSettings)
    values: dict[str, Any] = {}
    for settings_field in settings_fields():
        name = settings_field.name
        raw = getattr(namespace, name, None)
        source = _flag(name)
        if raw is None and environment_variable(name) in environ:
            raw = environ[environment_variable(name)]
            source = environment_variable(name)
            if typing.get_origin(hints[name]) is tuple:
                raw = [raw]
        if raw is None:
            continue
        field_type = hints[name]
        try:
            if typing.get_origin(field_type) is tuple:
                values[name] = tuple(item.strip() for entry in raw for item in entry.split(",") if item.strip())
            else:
                values[name] = _converter(field_type)(raw)
        except ValueError as error:
            expected = _TYPE_WORDS.get(field_type, str(field_type))
            raise SystemExit(f"weir: {source}: expected {expected}, got {raw!r} ({error})") from None
    try:
        return ServerSettings(**values)
    except ValueError as error:
        message = str(error)
        for item in settings_fields():  # name the flag and variable the user actually types
            prefix = f"setting {item.name}:"
            if message.startswith(prefix):
                message = f"{_flag(item.name)} / {environment_variable(item.name)}:{message[len(prefix) :]}"
        raise SystemExit(f"weir: {message}") from None


def build_parser() -> argparse.ArgumentParser:
    flags = "\n".join(
        f"  {_flag(item.name):28} {environment_variable(item.name):30} {item.metadata.get('doc', '')}"
        for item in settings_fields()
    )
    parser = argparse.ArgumentParser(
        prog="weir",
        description="Weir: an Open Inference (KServe V2) gRPC server for PyTorch models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"weir serve flags (each also an environment variable; see `weir serve --help` for defaults):\n{flags}",
    )
    parser.add_argument("--version", action="version", version=f"weir {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="serve a model repository over gRPC",
        description="Serve a Triton-style model repository over the Open Inference gRPC protocol. "
        "SIGTERM or SIGINT stops accepting, drains in-flight requests within the grace period and exits 0.",
    )
    _add_settings_arguments(serve)
    bench = commands.add_parser(
        "bench",
        help="load-test a V2 gRPC inference server on loopback (Weir, Triton, MLServer...)",
        description="Send inference load to a model on an Open Inference (KServe V2) gRPC server on loopback, "
        "closed loop or open loop, level by level; report latency percentiles, throughput, errors and (for Weir) "
        "the server's stage budget; check SLOs. Exit status: 0 every SLO held, 1 an SLO failed, 2 usage error or "
        "server unreachable.",
    )
    add_bench_arguments(bench)
    # The composition root is the one place the data plane's package may reach the control plane's.
    from weir_control.cli import add_commands
    from weir_control.features.cli import add_commands as add_feature_commands
    from weir_control.monitoring.cli import add_commands as add_drift_commands
    from weir_control.training.cli import add_commands as add_training_commands

    add_commands(commands)
    add_feature_commands(commands)
    add_training_commands(commands)
    add_drift_commands(commands)
    up = commands.add_parser(
        "up",
        help="run a control plane and one data plane together on embedded defaults (SQLite, local artifacts)",
        description="Start `weir control` and `weir serve --control-plane` together in one process, state under "
        ".weir/ (or --state-dir): the control plane's SQLite store (or --database-url), its artifacts, the feature "
        "online store (or --online-store) and a generated admin token in STATE_DIR/admin.token, which the other "
        "`weir` commands read. Then push a model (`weir models push`) and deploy it (`weir deploy`).",
    )
    add_up_arguments(up)
    return parser


async def _serve(settings: ServerSettings, reuse_port: bool) -> int:
    from weir.server import WeirServer

    try:
        server = WeirServer(settings, reuse_port=reuse_port)
    except ValueError as error:  # settings that cannot serve together: say so, no traceback
        raise SystemExit(f"weir: {error}") from None
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stop_requested.set)
    try:
        try:
            await server.start()
        except WeirError as error:  # a port in use, say: one line, no traceback
            raise SystemExit(f"weir: error: {error.message}") from None
        await stop_requested.wait()
        log.info(
            "stop requested: draining in-flight requests", extra={"grace_seconds": settings.shutdown_grace_seconds}
        )
    finally:
        await server.stop()
    return 0


def _event_loop_factory() -> Any:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


EXIT_READER_GONE = 128 + signal.SIGPIPE  # what a shell shows for a command its pipe's reader ended


def main(argv: Sequence[str] | None = None) -> int:
    """Every command; one whose output is piped into a reader that stops early (`weir ... | head`)
    exits quietly, as a Unix tool ended by SIGPIPE would, instead of a "Broken pipe" traceback or line.
    (Python ignores SIGPIPE, so a write to such a pipe raises BrokenPipeError wherever it happens.)"""
    try:
        code = _run(argv)
        sys.stdout.flush()  # output still buffered meets a gone reader here, not in the interpreter's exit
        return code
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise  # a broken pipe of some other connection: not this case
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's last flush at exit must not fail again
        os.close(devnull)
        return EXIT_READER_GONE


def _stdout_reader_gone() -> bool:
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError):  # no stdout, or not a file descriptor
        return False


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        from weir.loadtest.command import run  # lazy: numpy, grpc, tritonclient, matplotlib

        return run(args)
    if args.command == "up":
        from weir.up import run_up

        return run_up(args)
    if args.command == "features":
        from weir_control.features.cli import run as run_features

        return run_features(args)
    if args.command == "drift":
        from weir_control.monitoring.cli import run as run_drift

        return run_drift(args)
    if args.command in ("train", "sweep"):
        from weir_control.training.cli import run as run_training

        return run_training(args)
    if args.command in ("control", "control-gc", *CLIENT_COMMANDS):
        from weir_control.cli import run as run_control_command

        if args.command == "control":
            configure_logging(args.log_level, args.log_format)
        return run_control_command(args)
    if args.command == "serve":
        settings = settings_from(args, os.environ)
        configure_logging(settings.log_level, settings.log_format)
        if settings.workers > 1:
            from weir.workers import serve_with_workers

            try:
                return serve_with_workers(settings, lambda worker: _serve_in_process(worker, reuse_port=True))
            except OSError as error:  # the shared port, reserved before the workers start
                if error.errno != errno.EADDRINUSE:
                    raise
                failure = listen_failure(
                    settings.listen_address, settings.grpc_port, "the data plane's gRPC port, --grpc-port", error
                )
                raise SystemExit(f"weir: error: {failure.message}") from None
        return _serve_in_process(settings, reuse_port=False)
    return 2


def _serve_in_process(settings: ServerSettings, reuse_port: bool) -> int:
    if settings.torch_intra_op_threads:
        import torch

        torch.set_num_threads(settings.torch_intra_op_threads)
    with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
        code = runner.run(_serve(settings, reuse_port))
    return _exit_despite_running_computations(code)


COMPUTE_THREADS_JOIN_SECONDS = 1.0  # idle compute threads end at once; a busy one is not waited for


def _exit_despite_running_computations(code: int) -> int:
    """The server has stopped; a compute thread may still be inside a model's forward (a 14 s
    computation, say), which nothing can interrupt, and which Python's exit would wait for. Exit
    now instead: the shutdown grace period is the bound the operator set."""
    from weir.server import COMPUTE_THREAD_PREFIX

    deadline = time.monotonic() + COMPUTE_THREADS_JOIN_SECONDS
    busy = [thread for thread in threading.enumerate() if thread.name.startswith(COMPUTE_THREAD_PREFIX)]
    for thread in busy:
        thread.join(max(0.0, deadline - time.monotonic()))
    still_running = [thread.name for thread in busy if thread.is_alive()]
    if not still_running:
        return code
    log.warning("exiting with computations still running", extra={"threads": still_running})
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
