# serve_workers(): what `--workers N` does, for a program that builds its servers in code.
# The program binds its sockets and names a server factory; the supervisor (_supervisor.py)
# starts workers that import the factory afresh and serve a server per socket (_factory.py).
"""The Python API of several worker processes: :func:`serve_workers`."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Sequence

import trio

from .._activation import check_servable
from .._server import BaseServer
from .._signals import describe_address


async def serve_workers(
    factory: Callable[[socket.socket], BaseServer],
    sockets: Sequence[socket.socket],
    workers: int,
    *,
    stop_timeout: float | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> int:
    """Serve ``sockets`` with ``workers`` worker processes until SIGINT or SIGTERM; return
    the exit status to end with.

    What ``trio-socketserver --workers N`` does, for a program that builds its servers in
    code. The program binds its listening sockets once; every worker is a fresh Python
    interpreter that imports ``factory`` and calls ``factory(sock)`` for each socket, in
    the order given, to build the server that serves it (``TCPServer.from_socket(sock,
    Handler)``, for instance), then serves them as :func:`serve_until_signal` does::

        def make_server(sock):
            return trio_socketserver.TCPServer.from_socket(sock, Handler)

        if __name__ == "__main__":
            sock = socket.create_server(("127.0.0.1", 8000))
            sys.exit(trio.run(trio_socketserver.serve_workers, make_server, [sock], 4))

    ``factory`` must be importable by name from a fresh interpreter: a function or class
    at the top level of a module (the program's own file is fine: it is imported there
    under another name, so its ``if __name__ == "__main__":`` block does not run again).

    The workers are kept running: one that dies is replaced and logged with its pid and
    cause; repeated fast deaths back off and end in a crash loop (exit status 1), as the
    how-to guide on workers documents. SIGHUP reloads: new workers import the factory's
    module afresh, and only once every one of them is ready do the old ones drain; if
    one cannot start, the old ones keep serving. The first SIGINT or SIGTERM drains every
    worker and returns 0; a second stops them at once and returns 128 + its number. A
    worker whose factory raises exits with status 2; while the first workers start, that
    stops the supervisor, which then returns 2.

    Workers log to stderr at the level of this process's root logger, in the command
    line's format, unless the factory's module configures logging as it is imported.

    Reports started (``await nursery.start(serve_workers, ...)``) once every worker is
    ready.

    ``stop_timeout``: seconds a stopping worker may take before it is killed (None: as long
    as it takes; each worker bounds its drain by its servers' ``shutdown_grace``).

    Cancellation: a hard stop: every worker is killed (SIGKILL) before it returns.

    Thread safety: only from the main thread (it catches signals).

    Resource handling: the sockets stay open and the caller's; no worker outlives the call,
    nor the process (a worker is killed when this process dies, however it dies).

    Errors: ``ValueError`` without a socket, for a socket that cannot be served (not
    listening, an unknown kind) or ``workers`` below 1; ``TypeError`` for a factory that
    workers cannot import by name.
    """
    # Imported here: a program that never starts workers does not load the supervisor and
    # the command line's modules it shares (a sizeable part of `import trio_socketserver`).
    from ._factory import name_factory
    from ._supervisor import Supervisor

    where, qualname = name_factory(factory)
    if not sockets:
        raise ValueError("serve_workers() needs at least one listening socket")
    for index, sock in enumerate(sockets):
        check_servable(sock, f"serve_workers(): sockets[{index}]")
    supervisor = Supervisor(
        command=[
            "factory",
            where,
            qualname,
            logging.getLevelName(logging.getLogger().getEffectiveLevel()),
        ],
        workers=workers,
        sockets=sockets,
        names=None,
        what=qualname,
        addresses=[
            describe_address(
                sock.family, sock.getsockname(), datagram=sock.type == socket.SOCK_DGRAM, tls=False
            )
            for sock in sockets
        ],
        stop_timeout=stop_timeout,
    )
    return await supervisor.run(task_status)
