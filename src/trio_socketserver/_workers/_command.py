# `trio-socketserver --workers N`: the command line's options turned into a supervisor. It
# binds every address once, with the command line's own server classes (so SO_REUSEADDR,
# stale Unix socket files and the "address in use" message are exactly the one-process
# command line's), or takes the sockets systemd passed; it gives each worker the command
# line it was given, less the options the supervisor acts on, and serves the health
# endpoint (for all the workers) itself. The supervisor itself
# is _supervisor.py; what a worker does with its command line is the ordinary CLI's.
"""The command line's ``--workers``: from options to a running supervisor."""

from __future__ import annotations

import argparse
import math
import os
import socket
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import trio

from .._activation import inherited_sockets
from .._cli import (
    Config,
    Endpoint,
    UsageError,
    activated_endpoints,
    cannot_listen,
    endpoints_of,
    server_class,
    worker_arguments,
)
from .._echo import DatagramEchoHandler, EchoHandler
from .._handlers import BaseRequestHandler
from .._health import serve_with_health
from .._server import LOGGER, BaseServer
from .._signals import describe_address
from ._metrics import WorkersHealthServer
from ._supervisor import Supervisor

STOP_MARGIN = 5.0
"""Seconds a stopping worker gets beyond its ``--drain-delay`` and ``--shutdown-grace``
before it is SIGKILLed: the worker bounds its own stop; this only catches one that hangs
anyway (a handler thread stuck outside socket I/O, say)."""


def run_supervisor(options: argparse.Namespace) -> int:
    """Serve ``options`` (which ask for ``--workers``) with a supervisor; return the status.

    Errors: ``UsageError`` for options that cannot work with workers, for sockets passed by
    a service manager that the options do not fit, and for an address that cannot be bound
    (as the one-process command line says them).
    """
    try:
        # Taken (and the variables removed) before any worker starts: the workers get
        # the sockets from the supervisor, with variables of their own.
        inherited = inherited_sockets(os.environ)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    with ExitStack() as closing:
        for entry in inherited:
            closing.callback(entry.socket.close)
        command = ["cli", *worker_arguments(options)]
        names: list[str] | None = None
        if inherited:
            activated_endpoints(options, inherited)  # the same checks as without workers
            sockets = [entry.socket for entry in inherited]
            names = [entry.name for entry in inherited]
        else:
            servers = [closing.enter_context(_bound(options, e)) for e in endpoints_of(options)]
            sockets = [server.socket for server in servers]
        if options.reuse_port:
            # Each worker binds its own socket, to the address bound here (port 0 resolved);
            # the socket kept here holds the port but does not listen, so the kernel hands
            # it no connection.
            for sock in sockets:
                command += ["--bind", _bind_text(sock)]
            command.append("--reuse-port")
            _mention_migration()
        supervisor = Supervisor(
            command=command,
            workers=options.workers,
            sockets=[] if options.reuse_port else sockets,
            names=names,
            what=options.handler or (DatagramEchoHandler if options.udp else EchoHandler).__name__,
            addresses=[_describe(options, sock) for sock in sockets],
            stop_timeout=stop_timeout(options),
        )
        health = None
        if options.health_bind is not None:
            try:
                health = WorkersHealthServer(options.health_bind.address, supervisor)
            except OSError as exc:
                raise cannot_listen(options.health_bind, exc, option="--health-bind") from None
            closing.callback(health.server_close)
        return trio.run(serve_with_health, health, supervisor.run)


def stop_timeout(options: argparse.Namespace) -> float | None:
    """How long a stopping worker may take before it is killed: its own bounds and
    ``STOP_MARGIN``; None (as long as it takes) with an unbounded ``--shutdown-grace``."""
    grace = options.shutdown_grace
    if grace is None:
        grace = BaseServer.shutdown_grace
    if grace is None or math.isinf(grace):
        return None
    return float(options.drain_delay + grace + STOP_MARGIN)


# Linux 5.14+: when a listening socket closes, the connections queued on it move to another
# socket of its SO_REUSEPORT group instead of being reset.
MIGRATE_SETTING = "/proc/sys/net/ipv4/tcp_migrate_req"


def _mention_migration() -> None:
    try:
        with open(MIGRATE_SETTING) as setting:
            enabled = setting.read().strip() != "0"
    except OSError:
        return  # not Linux, or a kernel without it: the docs say what that costs
    if not enabled:
        LOGGER.info(
            "--reuse-port: a connection the kernel queued on a stopping worker's socket is "
            "reset when that socket closes (at a reload or a stop); sysctl "
            "net.ipv4.tcp_migrate_req=1 hands it to another worker instead"
        )


@contextmanager
def _bound(options: argparse.Namespace, endpoint: Endpoint) -> Iterator[BaseServer]:
    """A server that never serves: it binds ``endpoint`` as the command line would, and
    removes its Unix socket file when closed."""
    config = Config(
        endpoints=(), handler=BaseRequestHandler, udp=options.udp, reuse_port=options.reuse_port
    )
    cls: Any = server_class(config, endpoint)
    try:
        # With --reuse-port: bound, not listening.
        server = cls(endpoint.address, BaseRequestHandler, bind_and_activate=not options.reuse_port)
        if options.reuse_port:
            try:
                server.server_bind()
            except BaseException:
                server.server_close()
                raise
    except OSError as exc:
        raise cannot_listen(
            endpoint, exc, udp=options.udp, tls=options.tls_cert is not None
        ) from None
    try:
        yield server
    finally:
        server.server_close()


def _bind_text(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"


def _describe(options: argparse.Namespace, sock: socket.socket) -> str:
    return describe_address(
        sock.family, sock.getsockname(), datagram=options.udp, tls=options.tls_cert is not None
    )
