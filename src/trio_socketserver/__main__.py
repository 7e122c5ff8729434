# The command line: `trio-socketserver` and `python -m trio_socketserver`.
# This module does the I/O: it sets up logging, takes the sockets a service manager
# passed (_activation.py), creates the servers and the health endpoint (_health.py)
# and serves them in one trio run until a signal stops them (_signals.py). What the
# options mean, which server class serves an endpoint and the exit statuses live in
# _cli.py.
#
# Everything it has to say goes through logging to stderr, with a timestamp
# (the "serving ... on ..." line too), except a startup error: that is one
# `PROG: error: ...` line, as argparse prints them.
from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

import trio

from ._activation import inherited_sockets
from ._cli import (
    EXIT_FAILURE,
    EXIT_USAGE,
    MODULE_PROG,
    PROG,
    Config,
    Endpoint,
    UsageError,
    cannot_listen,
    load_config,
    parse_options,
    server_class,
)
from ._health import HealthServer, serve_with_health
from ._server import LOGGER, BaseServer, is_async_handler
from ._signals import describe_address, forced_exit_status, serve_until_signal
from ._workers import _reporting

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# With --workers, the supervisor's and the workers' lines share one stderr: each says whose.
LOG_FORMAT_WITH_PID = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
# The engine logs one line per connection here (peer, duration, bytes, outcome).
ACCESS_LOGGER = "trio_socketserver.access"


def main(argv: Sequence[str] | None = None, *, prog: str = PROG) -> int:
    """Run the command line; return the exit status (see ``--help``).

    ``prog`` is how the program is named in its usage and error lines.
    """
    try:
        options = parse_options(argv, prog)
    except UsageError as exc:
        _error(prog, str(exc))
        return EXIT_USAGE
    several = options.workers is not None or _reporting.supervised()
    configure_logging(options.log_level, access_log=options.access_log, with_pid=several)
    if options.workers is not None:
        return _supervise(options, prog)
    try:
        # Taken (and the variables removed) before the handler's module is imported.
        inherited = inherited_sockets(os.environ)
    except ValueError as exc:
        _error(prog, str(exc))
        return EXIT_USAGE
    try:
        config = load_config(options, inherited)
    except UsageError as exc:
        if exc.__cause__ is not None:
            LOGGER.debug("the error below, with its traceback:", exc_info=exc.__cause__)
        _error(prog, str(exc))
        return EXIT_USAGE
    if config.threading and is_async_handler(config.handler):
        LOGGER.warning(
            "--threading has no effect: %s.handle() is async, so every request is a task",
            config.handler.__name__,
        )
    try:
        return trio.run(serve, config, prog)
    except KeyboardInterrupt:
        # Ctrl-C before the signal handlers were installed (or after they were
        # removed): nothing was serving, so there is nothing to drain.
        return forced_exit_status(signal.SIGINT)
    # The last resort of a command line: whatever escaped is logged with its
    # traceback and becomes the documented failure status.
    except Exception:
        LOGGER.critical("the server failed", exc_info=True)
        return EXIT_FAILURE


def _supervise(options: argparse.Namespace, prog: str) -> int:
    """``--workers``: run a supervisor (the workers run this same command line)."""
    # Imported here: a one-process command line has no use for the supervisor.
    from ._workers._command import run_supervisor

    try:
        return run_supervisor(options)
    except UsageError as exc:
        _error(prog, str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        return forced_exit_status(signal.SIGINT)
    # As main()'s: the last resort, logged with its traceback.
    except Exception:
        LOGGER.critical("the supervisor failed", exc_info=True)
        return EXIT_FAILURE


def configure_logging(level: str, *, access_log: bool, with_pid: bool = False) -> None:
    """Log to stderr from ``level`` on; the access log only when asked for (or at DEBUG).

    ``with_pid``: each line names the process (``trio_socketserver[1234]: ...``), for a
    supervisor and its workers.
    """
    logging.basicConfig(
        level=level, format=LOG_FORMAT_WITH_PID if with_pid else LOG_FORMAT, stream=sys.stderr
    )
    root_level = logging.getLogger().level
    if access_log:
        access_level = min(logging.INFO, root_level)
    elif root_level <= logging.DEBUG:
        access_level = root_level  # DEBUG shows everything
    else:
        # One line per connection is too much for a default log: it is opt-in.
        access_level = max(logging.WARNING, root_level)
    logging.getLogger(ACCESS_LOGGER).setLevel(access_level)


async def serve(config: Config, prog: str = PROG) -> int:
    """Create a server per endpoint and serve them until a signal stops them; return the status.

    The health endpoint (``--health-bind``) answers from before the servers accept
    until they have stopped, so ``/ready`` is 503 while they start and drain.

    Resource handling: every server created here is closed here, also when
    creating a later one fails; so is every socket the service manager passed.

    Errors: an address that cannot be bound (in use, no permission, unknown
    host, a path that is not a socket) is one line on stderr and
    ``EXIT_USAGE``; errors while serving propagate to :func:`main`.
    """
    servers: list[BaseServer] = []
    health: HealthServer | None = None
    tls: dict[str, Any] = {}
    if config.ssl_context is not None:
        tls["ssl_context"] = config.ssl_context
    try:
        for endpoint in config.endpoints:
            cls = server_class(config, endpoint)
            if endpoint.inherited is not None:
                servers.append(cls.from_socket(endpoint.inherited.socket, config.handler, **tls))
                LOGGER.info(
                    "socket %r from the service manager: %s",
                    endpoint.inherited.name,
                    _describe(endpoint, config),
                )
                continue
            try:
                servers.append(cls(endpoint.address, config.handler, **tls))
            except OSError as exc:
                _error(prog, str(cannot_listen(endpoint, exc, udp=config.udp, tls=bool(tls))))
                return EXIT_USAGE
        if config.health is not None:
            try:
                health = HealthServer(config.health.address, servers)
            except OSError as exc:
                _error(prog, str(cannot_listen(config.health, exc, option="--health-bind")))
                return EXIT_USAGE
        return await serve_with_health(health, functools.partial(serve_until_signal, *servers))
    finally:
        if health is not None:
            health.server_close()
        for server in servers:
            server.server_close()
        for endpoint in config.endpoints:
            if endpoint.inherited is not None:
                endpoint.inherited.socket.close()  # one no server was built around


def _describe(endpoint: Endpoint, config: Config) -> str:
    return describe_address(
        endpoint.family,
        endpoint.address,
        datagram=config.udp,
        tls=config.ssl_context is not None,
    )


def _error(prog: str, message: str) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main(prog=MODULE_PROG))
