"""Multi-process serving: ``weir serve --workers N``.

Python serves one request at a time per process (the GIL), so on a machine with spare cores N
processes serve more than one. They share the gRPC port through SO_REUSEPORT (the kernel spreads
connections across them). Following grpc's multiprocessing example, the workers are forked before
any gRPC object exists: gRPC's core does not survive a fork.

The supervisor (the parent) forwards SIGTERM/SIGINT to every worker, waits for their drain, and
exits 0 only if every worker did. A worker that dies on its own takes the others down too (exit 1):
a half-serving replica is worse than a restarted one, and restarting is the orchestrator's job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable

from weir.settings import ServerSettings

log = logging.getLogger(__name__)


def reserve_port(address: str, port: int) -> tuple[socket.socket, int]:
    """Pick the shared port (a free one for port 0) and hold it with SO_REUSEPORT until the workers
    have bound it, so nothing else takes it in between. The holder never listens: the kernel only
    hands connections to listening sockets."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    holder = socket.socket(family, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind((address, port))
    return holder, holder.getsockname()[1]


def worker_settings(settings: ServerSettings, index: int, grpc_port: int) -> ServerSettings:
    """Worker ``index`` serves the shared gRPC port; its metrics get their own port (each process
    has its own counters): metrics_port + index, or a free one for 0."""
    metrics_port = settings.metrics_port
    if metrics_port > 0:
        metrics_port += index
    return dataclasses.replace(settings, grpc_port=grpc_port, metrics_port=metrics_port, workers=1)


def serve_with_workers(settings: ServerSettings, serve_one: Callable[[ServerSettings], int]) -> int:
    """Fork ``settings.workers`` processes that each run ``serve_one`` on the shared port (it must
    bind with SO_REUSEPORT: ``WeirServer(..., reuse_port=True)``); supervise them."""
    holder, grpc_port = reserve_port(settings.listen_address, settings.grpc_port)
    children: dict[int, int] = {}
    for index in range(settings.workers):
        pid = os.fork()
        if pid == 0:  # the worker
            holder.close()
            code = 1
            try:
                code = serve_one(worker_settings(settings, index, grpc_port))
            except BaseException:
                log.exception("worker failed", extra={"worker": index})
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = index
    log.info("workers started", extra={"workers": settings.workers, "grpc_port": grpc_port, "pids": sorted(children)})
    stopping = False

    def forward(signal_number: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            _signal_quietly(pid, signal_number)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    holder.close()
    exit_code = 0
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        index = children.pop(pid, -1)
        code = os.waitstatus_to_exitcode(status)
        if code != 0 or not stopping:
            log.error("worker exited", extra={"worker": index, "pid": pid, "exit_code": code, "stopping": stopping})
            exit_code = 1
            if not stopping:  # one worker died on its own: stop the rest
                stopping = True
                for other in children:
                    _signal_quietly(other, signal.SIGTERM)
    return exit_code


def _signal_quietly(pid: int, signal_number: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.kill(pid, signal_number)
