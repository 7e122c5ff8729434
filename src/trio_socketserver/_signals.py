# Serving a stand-alone program's servers until SIGINT/SIGTERM stops them: the first signal
# shuts them down gracefully, a second one stops them at once. The command line and the
# examples run their servers through it; programs that handle signals themselves keep the
# nursery-based form (serve_forever() + shutdown()). It announces each server once it accepts
# and reports what the stop cost, through the project's logger; it creates and closes nothing.
from __future__ import annotations

import os
import signal
import socket
from typing import Any

import trio

from ._server import LOGGER, BaseServer

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


async def serve_until_signal(
    *servers: BaseServer, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> int:
    """Serve ``servers`` until SIGINT (Ctrl-C) or SIGTERM; return the exit status to end with.

    The one-liner for a stand-alone program::

        async def main():
            async with trio_socketserver.TCPServer(("127.0.0.1", 8000), Handler) as server:
                await trio_socketserver.serve_until_signal(server)

        trio.run(main)

    The first signal calls :meth:`~BaseServer.shutdown` on every server: they stop
    accepting, in-flight requests get each server's ``shutdown_grace``. A second signal
    stops them at once (a hard stop: handlers cancelled, connections closed). Either way it
    returns normally, with ``0`` after a graceful stop (also when the servers were shut down
    by other means) and ``128 + N`` after a second signal ``N`` (130 for SIGINT, 143 for
    SIGTERM: the shell's convention for "ended by signal N"), so
    ``sys.exit(trio.run(main))`` tells a supervisor how the program ended. No
    ``KeyboardInterrupt`` is raised for these signals while it runs.

    Logging (``logging.getLogger("trio_socketserver")``): one INFO line per server once it
    accepts (``serving Handler on tcp 127.0.0.1:8000 (Ctrl-C to stop)``), one when a signal
    arrives, and a stop report per server (requests finished, failed, cut short).

    Reports started (for ``await nursery.start(serve_until_signal, server)``) once every
    server accepts and the signals are caught.

    Cancellation: cancelling the caller is a hard stop of every server.

    Thread safety: only from the main thread (Python delivers signals there); elsewhere
    ``RuntimeError``, from :func:`trio.open_signal_receiver`.

    Resource handling: the servers stay open; close them (``async with server``).

    Errors: ``ValueError`` without a server; whatever ``serve_forever()`` raises.
    """
    if not servers:
        raise ValueError("serve_until_signal() needs at least one server to serve")
    hard_stop = trio.CancelScope()
    forced_by: list[int] = []

    async def watch_signals(signals: Any) -> None:
        first = True
        async for signum in signals:
            if first:
                first = False
                LOGGER.info(
                    "%s: shutting down; in-flight requests get %s (send it again to stop at once)",
                    signal.Signals(signum).name,
                    _grace(servers),
                )
                for server in servers:
                    server.shutdown()
            else:
                LOGGER.warning("%s again: stopping at once", signal.Signals(signum).name)
                forced_by.append(signum)
                hard_stop.cancel()
                return

    # Caught before serving starts, so no signal can slip between "accepting" and "listening
    # for signals" (a shutdown() before serve_forever() makes it return at once).
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        async with trio.open_nursery() as watching:
            watching.start_soon(watch_signals, signals)
            with hard_stop:
                async with trio.open_nursery() as serving:
                    for server in servers:
                        await serving.start(server.serve_forever)
                    for server in servers:
                        LOGGER.info(
                            "serving %s on %s (Ctrl-C to stop)",
                            getattr(server.RequestHandlerClass, "__name__", "requests"),
                            describe_server(server),
                        )
                    task_status.started()
            watching.cancel_scope.cancel()
    for server in servers:
        _report(server)
    return forced_exit_status(forced_by[0]) if forced_by else 0


def forced_exit_status(signum: int) -> int:
    """Exit status after a signal stopped the program at once.

    128 + the signal's number, the shell's convention for "ended by signal N"
    (130 for SIGINT, 143 for SIGTERM), so supervisors and scripts can tell a
    cut-short stop from a clean one.
    """
    return 128 + signum


def _grace(servers: tuple[BaseServer, ...]) -> str:
    graces = {server.shutdown_grace for server in servers}
    if None in graces:
        return "as long as they take"
    return f"{max(g for g in graces if g is not None)} s"


def _report(server: BaseServer) -> None:
    """Log what the stop cost: requests that finished, failed (the handler raised) or were
    cut short by the stop."""
    stats = server.statistics()
    LOGGER.info(
        "stopped serving on %s: requests finished: %d, failed: %d, cut short: %d",
        describe_server(server),
        stats.finished_requests,
        stats.failed_requests,
        stats.cancelled_requests,
    )


def describe_server(server: BaseServer) -> str:
    """Where ``server`` listens, as :func:`describe_address` shows it."""
    return describe_address(
        server.socket.family,
        server.server_address,
        datagram=server.socket.type == socket.SOCK_DGRAM,
        tls=getattr(server, "ssl_context", None) is not None,
    )


def describe_address(family: int, address: Any, *, datagram: bool, tls: bool) -> str:
    """How an address is shown: ``tcp 127.0.0.1:8000``, ``udp [::1]:53``, ``unix /run/x.sock``."""
    if family == socket.AF_UNIX:
        kind = "unix-dgram" if datagram else "unix+tls" if tls else "unix"
        path = os.fsdecode(address)
        # A Linux abstract name starts with NUL: show it escaped, as repr does.
        return f"{kind} {path!r}" if path.startswith("\0") else f"{kind} {path}"
    kind = "udp" if datagram else "tcp+tls" if tls else "tcp"
    host, port = address[0], address[1]
    if family == socket.AF_INET6:
        return f"{kind} [{host}]:{port}"
    return f"{kind} {host}:{port}"
