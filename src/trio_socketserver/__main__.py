# The command line: `trio-socketserver` and `python -m trio_socketserver`.
# This module does the I/O: it logs, creates the servers, serves them in one
# trio run and turns signals into shutdown. What the options mean, which
# server class serves an endpoint and the exit statuses live in _cli.py.
#
# It writes to stdout and stderr directly, not through logging: the address
# line is the program's output that people and scripts read, and a startup
# error is one `trio-socketserver: error: ...` line, as argparse prints them.
from __future__ import annotations

import logging
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

import attrs
import trio

from ._cli import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    PROG,
    Config,
    UsageError,
    describe,
    forced_exit_status,
    load_config,
    server_class,
    serving_line,
)
from ._server import BaseServer, is_async_handler

LOGGER = logging.getLogger("trio_socketserver")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (see ``--help``)."""
    try:
        config = load_config(argv)
    except UsageError as exc:
        _error(str(exc))
        return EXIT_USAGE
    logging.basicConfig(level=config.log_level, format=LOG_FORMAT, stream=sys.stderr)
    if config.threading and is_async_handler(config.handler):
        LOGGER.warning(
            "--threading has no effect: %s.handle() is async, so every request is a task",
            config.handler.__name__,
        )
    try:
        return trio.run(serve, config)
    except KeyboardInterrupt:
        # Ctrl-C before the signal handlers were installed (or after they were
        # removed): nothing was serving, so there is nothing to drain.
        return forced_exit_status(signal.SIGINT)
    # The last resort of a command line: whatever escaped is logged with its
    # traceback and becomes the documented failure status.
    except Exception:
        LOGGER.critical("the server failed", exc_info=True)
        return EXIT_FAILURE


@attrs.define
class _Stop:
    """What the signals asked for; read once serving has ended."""

    hard_stop: trio.CancelScope = attrs.Factory(trio.CancelScope)
    forced_by: int | None = None


async def serve(config: Config) -> int:
    """Create a server per endpoint, serve them until a signal stops them; return the status.

    Cancellation: a second signal cancels the servers (a hard stop: handlers
    cancelled, connections closed at once).

    Resource handling: every server created here is closed here, also when
    creating a later one fails.

    Errors: an address that cannot be bound (in use, no permission, unknown
    host, a path that is not a socket) is one line on stderr and
    ``EXIT_USAGE``; errors while serving propagate to :func:`main`.
    """
    servers: list[BaseServer] = []
    stop = _Stop()
    # Installed before the first socket exists, so no signal can slip between
    # "listening" and "listening for signals".
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        try:
            tls: dict[str, Any] = {}
            if config.ssl_context is not None:
                tls["ssl_context"] = config.ssl_context
            for endpoint in config.endpoints:
                try:
                    servers.append(
                        server_class(config, endpoint)(endpoint.address, config.handler, **tls)
                    )
                except OSError as exc:
                    where = describe(config, endpoint.family, endpoint.address)
                    _error(f"cannot listen on {where}: {exc.strerror or exc}")
                    return EXIT_USAGE
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch_signals, signals, servers, stop)
                with stop.hard_stop:
                    async with trio.open_nursery() as serving:
                        for server in servers:
                            await serving.start(server.serve_forever, None)
                        for server in servers:
                            line = serving_line(config, server.socket.family, server.server_address)
                            print(line, flush=True)
                nursery.cancel_scope.cancel()
        finally:
            for server in servers:
                server.server_close()
    _report(servers, config)
    return EXIT_OK if stop.forced_by is None else forced_exit_status(stop.forced_by)


async def _watch_signals(
    signals: AsyncIterator[int], servers: list[BaseServer], stop: _Stop
) -> None:
    """First signal: graceful shutdown of every server. Second: cancel them all."""
    first = True
    async for signum in signals:
        if first:
            first = False
            LOGGER.info(
                "%s: shutting down; in-flight requests get %s s (send it again to stop at once)",
                signal.Signals(signum).name,
                servers[0].shutdown_grace,  # the command line gives every server the same
            )
            for server in servers:
                server.shutdown()
        else:
            LOGGER.warning("%s again: stopping at once", signal.Signals(signum).name)
            stop.forced_by = signum
            stop.hard_stop.cancel()
            return


def _report(servers: list[BaseServer], config: Config) -> None:
    """Log what the stop cost: requests that finished and those cut short."""
    for server in servers:
        stats = server.statistics()
        LOGGER.info(
            "stopped serving on %s: requests finished: %d, cut short: %d",
            describe(config, server.socket.family, server.server_address),
            stats.finished_requests,
            stats.cancelled_requests,
        )


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
