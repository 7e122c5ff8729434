# A worker process: takes requests off its socket one at a time, runs the stdlib's request
# sequence on each (finish_request, handle_error, shutdown_request: the engine's, handed over
# in WorkerSpec), answers "done", and waits for the next. Also what `server.shutdown()`,
# `shutdown_requested` and `server_close()` mean inside a handler here. Never imports trio:
# a worker is a clone of the server process, but nothing of trio runs in it.
"""A worker's request loop, and the server as its handlers see it."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import attrs

from ._wire import DONE, SHUTDOWN, SharedPage, decode, flush_stdio, receive_message


@attrs.frozen
class WorkerSpec:
    """What the fork server and its workers are given when the pool starts."""

    server: Any
    """The server, as handlers see it (``self.server``)."""
    handle: Callable[[list[Any], Any, Any], object]
    """Runs one request: ``handle([request], client_address, proxy_header)``, the stdlib's
    sequence, with the request's PROXY protocol header (or None) as the handler's."""
    pass_fds: frozenset[int]
    """Inherited descriptors to keep open besides files and devices (``pass_fds``)."""
    message_size: int
    """What a worker reads a request with, until told of a larger one (see _wire)."""


@attrs.define(eq=False)
class WorkerSide:
    """What a worker process knows about the server it works for."""

    server: Any
    sock: socket.socket
    page: SharedPage

    @property
    def draining(self) -> bool:
        """Whether ``shutdown()`` was called (in any process of the pool)."""
        return self.page.draining

    def request_shutdown(self) -> None:
        """Have the server process shut down; returns at once."""
        self.page.set_draining()
        self.sock.send(SHUTDOWN)


# Set in a worker process only: lets server.shutdown() in a handler reach the server process.
_current: WorkerSide | None = None


def current_worker(server: object) -> WorkerSide | None:
    """The worker side of ``server`` if this process is one of its workers, else None."""
    side = _current
    return side if side is not None and side.server is server else None


def serve_requests(spec: WorkerSpec, sock: socket.socket, page: SharedPage, slot: int) -> int:
    """A worker's loop: one request at a time until the server closes the socket.

    The count of requests read off the socket goes to the page's word for ``slot``, for the
    server to tell, should this process die, whether it had begun the last one.
    """
    global _current
    _current = WorkerSide(spec.server, sock, page)
    server_socket: socket.socket | None = None
    size = spec.message_size
    count = 0
    while True:
        message, fds = receive_message(sock, size, 1)
        if not message:
            return 0  # the pool is stopping, or the server process died
        fields = decode(message)
        if len(fields) == 1:
            (size,) = fields  # a larger request comes next
            continue
        count += 1
        page.set_taken(slot, count)
        client_address, data, proxy_header = fields
        if data is None:
            request: Any = socket.socket(fileno=fds[0])
        else:
            if fds:
                server_socket = spec.server.socket = socket.socket(fileno=fds[0])
            request = (data, server_socket)
        spec.handle([request], client_address, proxy_header)
        flush_stdio()
        try:
            sock.send(DONE)
        except (BrokenPipeError, ConnectionResetError):
            return 0  # the server process died during the request
