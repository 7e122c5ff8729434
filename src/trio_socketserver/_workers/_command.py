# `trio-socketserver --workers N`: the command line's options turned into a supervisor. It
# binds every address once, with the command line's own server classes (so SO_REUSEADDR,
# stale Unix socket files and the "address in use" message are exactly the one-process
# command line's), or takes the sockets systemd passed; and it gives each worker the
# command line it was given, less the options the supervisor acts on. The supervisor itself
# is _supervisor.py; what a worker does with its command line is the ordinary CLI's.
"""The command line's ``--workers``: from options to a running supervisor."""

from __future__ import annotations

import argparse
import socket
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import trio

from .._cli import (
    Config,
    Endpoint,
    cannot_listen,
    endpoints_of,
    server_class,
    worker_arguments,
)
from .._echo import DatagramEchoHandler, EchoHandler
from .._handlers import BaseRequestHandler
from .._server import BaseServer
from .._signals import describe_address
from ._supervisor import Supervisor

STOP_MARGIN = 5.0
"""Seconds a stopping worker gets beyond its own drain and grace before it is SIGKILLed:
its drain is bounded by the worker itself; this only catches one that hangs anyway."""


def run_supervisor(options: argparse.Namespace) -> int:
    """Serve ``options`` (which ask for ``--workers``) with a supervisor; return the status.

    Errors: ``UsageError`` for options that cannot work with workers, and for an address
    that cannot be bound (as the one-process command line says it).
    """
    endpoints = endpoints_of(options)
    with ExitStack() as closing:
        servers = [closing.enter_context(_bound(options, e)) for e in endpoints]
        command = ["cli", *worker_arguments(options)]
        sockets = [server.socket for server in servers]
        if options.reuse_port:
            # Each worker binds its own socket, to the address bound here (port 0 resolved);
            # the socket kept here holds the port but does not listen, so the kernel hands it
            # no connection.
            for server in servers:
                command += ["--bind", _bind_text(server), "--reuse-port"]
            sockets = []
        grace = options.shutdown_grace
        if grace is None:
            grace = BaseServer.shutdown_grace
        supervisor = Supervisor(
            command=command,
            workers=options.workers,
            sockets=sockets,
            names=None,
            what=options.handler or (DatagramEchoHandler if options.udp else EchoHandler).__name__,
            addresses=[_describe(options, server) for server in servers],
            stop_timeout=None if grace is None else grace + STOP_MARGIN,
        )
        return trio.run(supervisor.run)


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


def _bind_text(server: BaseServer) -> str:
    host, port = server.server_address[:2]
    return f"[{host}]:{port}" if server.socket.family == socket.AF_INET6 else f"{host}:{port}"


def _describe(options: argparse.Namespace, server: BaseServer) -> str:
    return describe_address(
        server.socket.family,
        server.server_address,
        datagram=options.udp,
        tls=options.tls_cert is not None,
    )
