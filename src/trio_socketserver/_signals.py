# Serving a stand-alone program's servers until SIGINT/SIGTERM stops them: the first signal
# shuts them down gracefully, a second one stops them at once. The command line and the
# examples run their servers through it; programs that handle signals themselves keep the
# nursery-based form (serve_forever() + shutdown()). It announces each server once it accepts
# and reports what the stop cost, through the project's logger and to the service manager
# (sd_notify, _notify.py); it creates and closes nothing.
from __future__ import annotations

import os
import signal
import socket
from typing import Any

import trio

from ._notify import feed_watchdog, notify, watchdog_interval
from ._server import LOGGER, BaseServer, ServerStatistics
from ._workers import _reporting
from ._workers._wire import ServerFigures

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
    arrives, and a stop report per server: requests finished, failed, cut short and refused,
    and how long the stop took from the start of its drain (``stopped serving on tcp
    127.0.0.1:8000 in 1.20 s: requests finished: 10, failed: 0, cut short: 1, refused: 2``;
    no duration after a hard stop that no drain preceded).

    Service manager (systemd's sd_notify protocol, when ``NOTIFY_SOCKET`` is set; nothing
    otherwise): ``READY=1`` with a ``STATUS=`` line (``serving Handler on tcp
    127.0.0.1:8000``) once every server accepts; ``STOPPING=1`` with a ``STATUS=`` line
    (``shutting down (SIGTERM)``) as soon as a drain begins, while ``drain_delay`` still
    accepts: on the first signal, or a ``shutdown()`` of any of the servers from
    elsewhere; ``WATCHDOG=1`` every ``WATCHDOG_USEC / 2`` microseconds while it runs, when
    ``WATCHDOG_USEC`` asks for it (and ``WATCHDOG_PID``, if set, is this process). A manager
    that cannot be reached is logged; serving goes on.

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
    stopped_by: list[str] = []  # the signal that began the stop, if one did
    # When each server's drain began and its serve_forever() returned: the stop report's
    # "in 1.20 s".
    drain_began: dict[int, float] = {}
    stopped_at: dict[int, float] = {}
    stopping_announced = False

    async def watch_signals(signals: Any) -> None:
        first = True
        async for signum in signals:
            name = signal.Signals(signum).name
            if first:
                first = False
                stopped_by.append(name)
                LOGGER.info(
                    "%s: shutting down; in-flight requests get %s (send it again to stop at once)",
                    name,
                    _grace(servers),
                )
                for server in servers:
                    server.shutdown()
            else:
                LOGGER.warning("%s again: stopping at once", name)
                forced_by.append(signum)
                hard_stop.cancel()
                return

    async def announce_stopping() -> None:
        nonlocal stopping_announced
        if not stopping_announced:
            stopping_announced = True
            cause = f" ({stopped_by[0]})" if stopped_by else ""
            await notify("STOPPING=1", f"STATUS=shutting down{cause}")

    async def serve(index: int, *, task_status: trio.TaskStatus[None]) -> None:
        server = servers[index]
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve_forever)
                task_status.started()
                # A run that has ended already (a shutdown() before it started) drained then.
                if server.statistics().serving:
                    await server.wait_for_shutdown()
                drain_began[index] = trio.current_time()
                await announce_stopping()
        finally:
            stopped_at[index] = trio.current_time()

    # Caught before serving starts, so no signal can slip between "accepting" and "listening
    # for signals" (a shutdown() before serve_forever() makes it return at once).
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        async with trio.open_nursery() as watching:
            watching.start_soon(watch_signals, signals)
            interval = watchdog_interval(os.environ, os.getpid())
            if interval is not None:
                watching.start_soon(feed_watchdog, interval)
            with hard_stop:
                async with trio.open_nursery() as serving:
                    for index in range(len(servers)):
                        await serving.start(serve, index)
                    serving_what = [
                        f"serving {_handler_name(server)} on {describe_server(server)}"
                        for server in servers
                    ]
                    for line in serving_what:
                        LOGGER.info("%s (Ctrl-C to stop)", line)
                    if _reporting.supervised():
                        await watching.start(
                            _reporting.report_statistics, lambda: _figures(servers)
                        )
                    if not stopping_announced:  # else a stop began during startup
                        await notify("READY=1", "STATUS=" + "; ".join(serving_what))
                    task_status.started()
            watching.cancel_scope.cancel()
    if _reporting.supervised():
        await _reporting.send_statistics(_figures(servers))  # the stop report's figures
    for index, server in enumerate(servers):
        began = drain_began.get(index)
        elapsed = None if began is None else stopped_at[index] - began
        report_stop(describe_server(server), server.statistics(), elapsed)
    return forced_exit_status(forced_by[0]) if forced_by else 0


def _figures(servers: tuple[BaseServer, ...]) -> list[ServerFigures]:
    return [ServerFigures(describe_server(server), server.statistics()) for server in servers]


def _handler_name(server: BaseServer) -> str:
    return getattr(server.RequestHandlerClass, "__name__", "requests")


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


def report_stop(
    where: str, stats: ServerStatistics, elapsed: float | None, *, note: str = ""
) -> None:
    """Log what the stop of the server on ``where`` cost: requests that finished, failed
    (the handler raised), were cut short by the stop or refused, and the seconds from the
    start of its drain to the end of its serve_forever() (``elapsed``; None after a hard
    stop with no drain); ``note`` is appended (the supervisor of several workers says over
    how many it summed)."""
    took = "" if elapsed is None else f" in {elapsed:.2f} s"
    LOGGER.info(
        "stopped serving on %s%s: requests finished: %d, failed: %d, cut short: %d, refused: %d%s",
        where,
        took,
        stats.finished_requests,
        stats.failed_requests,
        stats.cancelled_requests,
        stats.refused_requests,
        note,
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
