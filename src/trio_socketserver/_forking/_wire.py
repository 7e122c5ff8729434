# What the pool's three kinds of process exchange, and nothing else: the messages on their
# Unix sockets (pickled tuples and one-byte answers), the file descriptors passed with them,
# and the page of memory they share (the drain flag and each worker's request count). Every
# process of the pool uses this file, so it never imports trio: the server process's
# non-blocking send and receive are in _pool.py, on top of these.
"""The pool's wire format, fd passing and shared page.

Server process -> fork server (``SOCK_SEQPACKET``, one message each way per exchange):

- ``("spawn", slot)`` with the worker's socket as fd -> ``(pid,)`` or ``(None, why)``
- ``("terminate", pid)`` -> ``()``: SIGTERM now, SIGKILL after ``WORKER_KILL_TIMEOUT``
- ``("reap", pid)`` -> ``(wait status or None,)``: waits for it to exit
- ``("stop", kill)``, or EOF: stop every worker, reap them, exit (no answer)

Server process -> worker: one request per message, ``(client_address, datagram bytes or
None, PROXY protocol header or None)`` pickled, with the connection as fd (or, for a
datagram server, its socket, passed once per worker); before a request larger than the
worker reads with, ``(size,)`` (a resize).
Worker -> server process: ``DONE`` once the request is over, ``SHUTDOWN`` when a
handler called ``server.shutdown()``.
"""

from __future__ import annotations

import mmap
import pickle
import select
import socket
import struct
import sys
from typing import Any

import attrs

# From SIGTERM to SIGKILL for a worker being stopped, and how long the fork server waits for a
# worker that is exiting before it kills it. A worker with default signal handling dies in
# microseconds; this bounds one that ignores SIGTERM.
WORKER_KILL_TIMEOUT = 1.0
# Room for one control message or answer (commands and pids are a few dozen bytes).
MESSAGE_OVERHEAD = 4096

# Worker -> server process, one byte each.
DONE = b"d"
SHUTDOWN = b"s"

# One 8-byte word: the drain flag, then a request counter per worker slot.
_WORD = struct.Struct("Q")


def encode(*fields: Any) -> bytes:
    """A control message, answer or request: a pickled tuple."""
    return pickle.dumps(fields)


def decode(message: bytes) -> tuple[Any, ...]:
    fields: tuple[Any, ...] = pickle.loads(message)
    return fields


@attrs.frozen
class Parcel:
    """A request as it travels to a worker."""

    message: bytes
    """The encoded (client address, datagram bytes or None for a connection, the PROXY
    protocol header or None)."""
    sock: socket.socket
    """The connection, or the datagram server's socket (passed once per worker)."""
    datagram: bool

    @classmethod
    def wrap(cls, request: Any, client_address: Any, proxy_header: Any = None) -> Parcel:
        """Errors: ``TypeError`` (or a pickling error) for what cannot travel."""
        if isinstance(request, socket.socket):
            return cls(encode(client_address, None, proxy_header), request, False)
        if (
            isinstance(request, tuple)
            and len(request) == 2
            and isinstance(request[0], bytes)
            and isinstance(request[1], socket.socket)
        ):
            return cls(encode(client_address, request[0], None), request[1], True)
        raise TypeError(
            f"a worker process can only take a socket or a (bytes, socket) datagram request, "
            f"not {type(request).__name__}; override get_request() to return one of these"
        )


def receive_message(sock: socket.socket, size: int, max_fds: int) -> tuple[bytes, list[int]]:
    """Block until the next message arrives; return it with its fds. ``b""`` at EOF (the
    peer closed or died).

    ``size`` must hold the message: the sender knows what its peer reads with and announces
    a larger one first (see :func:`encode_resize`). Errors: ``RuntimeError`` if the message
    was truncated anyway, a broken promise rather than bad input.
    """
    try:
        message, fds, flags, _ = socket.recv_fds(sock, size, max_fds)
    except ConnectionResetError:
        return b"", []
    if flags & socket.MSG_TRUNC:
        raise RuntimeError(f"a pool message was larger than the {size} bytes announced")
    return message, fds


def encode_resize(size: int) -> bytes:
    """Tells a worker that the next request is ``size`` bytes, more than it reads with.

    A one-field tuple, where a request has two. It travels just before that request, so a
    worker never has to agree on a size in advance: a datagram server whose
    ``max_packet_size`` grew while it serves still hands whole datagrams to its workers.
    """
    return encode(size)


def poll_readable(fd: int, timeout: float) -> bool:
    """Block until ``fd`` is readable (True) or ``timeout`` seconds passed (False).

    A ``timeout`` of 0 or less just looks. poll(), not select(): the fd may be above
    select()'s FD_SETSIZE.
    """
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0.0, timeout) * 1000))


def flush_stdio() -> None:
    """Write out what Python buffered for stdout/stderr (before a fork, before ``_exit``)."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            try:
                stream.flush()
            except (OSError, ValueError):
                pass  # closed or broken: nothing left to save


class SharedPage:
    """Memory shared by the server process, the fork server and every worker of one pool.

    An anonymous ``MAP_SHARED`` mapping made before the fork server is forked, so every
    process of the pool sees the same words and no file descriptor is involved. Word 0 is
    the drain flag (``shutdown()`` was called: ``server.shutdown_requested`` in workers);
    word ``1 + slot`` counts the requests the worker in that slot has taken off its socket,
    which tells the server, should that worker die, whether it had begun its last request.
    Each word has one writer at a time, and 8-byte aligned stores are atomic on Linux.
    """

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._map = mmap.mmap(-1, _WORD.size * (1 + slots))

    @property
    def draining(self) -> bool:
        return bool(_WORD.unpack_from(self._map, 0)[0])

    def set_draining(self) -> None:
        _WORD.pack_into(self._map, 0, 1)

    def taken(self, slot: int) -> int:
        count: int = _WORD.unpack_from(self._map, _WORD.size * (1 + slot))[0]
        return count

    def set_taken(self, slot: int, count: int) -> None:
        _WORD.pack_into(self._map, _WORD.size * (1 + slot), count)

    @property
    def closed(self) -> bool:
        return self._map.closed

    def close(self) -> None:
        self._map.close()
