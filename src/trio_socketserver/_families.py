# The four server families: TCP, UDP, Unix stream, Unix datagram. Each says how
# its socket is made, bound and closed, what one request is, and what a handler
# sees as `self.request` (a trio stream or trio socket for async handlers, the
# stdlib's blocking socket for sync ones). The serve loop is BaseServer's.
from __future__ import annotations

import errno
import os
import socket
import ssl
import stat
from typing import Any, TypeVar

import trio

from ._activation import check_servable
from ._engine import reject_async_hooks
from ._server import LOGGER, BaseServer, engine_of
from ._threading import ThreadingMixIn

# Hooks the constructor calls: they must be plain functions (a constructor cannot await).
CONSTRUCTOR_HOOKS = ("server_bind", "server_activate")


ServerT = TypeVar("ServerT", bound="TCPServer")


class TCPServer(BaseServer):
    """A stream server on an IPv4 (or, with ``address_family = AF_INET6``, IPv6) address.

    As in the stdlib, the constructor creates the socket and, with
    ``bind_and_activate``, binds and listens, so ``server_address`` holds the
    real address (the chosen port for port 0) and ``fileno()`` is valid as soon
    as it returns. ``ssl_context`` (server side) makes every connection TLS:
    async handlers get a ``trio.SSLStream``, sync ones an ``ssl.SSLSocket``; a
    failed handshake costs that connection only. ``https_compatible`` is passed
    to ``trio.SSLStream`` (default False, as trio's: set it for HTTPS, whose
    clients may close without TLS's close_notify).

    Errors: ``OSError`` with ``errno.EADDRINUSE`` naming the address when it is
    taken; the socket is closed on any failure in the constructor.

    :meth:`from_socket` builds one around a listening socket made elsewhere (socket
    activation, a supervisor).
    """

    address_family: int = socket.AF_INET
    socket_type: int = socket.SOCK_STREAM
    # The stdlib's 5 makes a burst of clients wait for SYN retransmits (1 s and
    # more) as soon as the server is busy. This server stops accepting when it
    # is full and relies on the backlog to hold waiting clients, so it asks for
    # a large one; the kernel caps it at net.core.somaxconn.
    request_queue_size: int = 1024
    allow_reuse_address: bool = False
    allow_reuse_port: bool = False
    https_compatible: bool = False

    def __init__(
        self,
        server_address: Any,
        RequestHandlerClass: Any,
        bind_and_activate: bool = True,
        *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(server_address, RequestHandlerClass)
        self.ssl_context = ssl_context
        reject_async_hooks(self, CONSTRUCTOR_HOOKS, "in the constructor")
        self.socket = socket.socket(self.address_family, self.socket_type)
        if bind_and_activate:
            try:
                self.server_bind()
                self.server_activate()
            except BaseException:
                self.server_close()
                raise

    @classmethod
    def from_socket(
        cls: type[ServerT], sock: socket.socket, RequestHandlerClass: Any, **kwargs: Any
    ) -> ServerT:
        """A server around ``sock``, a socket bound (and, for streams, listening) elsewhere.

        For sockets the server did not create: passed by a service manager
        (:func:`inherited_sockets`), a supervisor, or a test. The constructor runs with
        ``bind_and_activate=False`` (``kwargs`` go to it, e.g. ``ssl_context``), then
        ``sock`` becomes ``server.socket``, ``server.address_family`` is its family and
        ``server_address`` its address. :meth:`server_bind` runs as usual, so a
        subclass's own additions to it still happen (``http.server`` records
        ``server_name`` there), but the socket is not bound again, its options are left as
        they are and a Unix socket file is not taken over (``socket_mode`` is not applied;
        ``server_close()`` does not remove it). :meth:`server_activate` is not called: the
        socket listens already, with the backlog its creator chose. Serving makes it
        non-blocking and leaves it so: other processes may serve the same socket, and its
        blocking mode is theirs too.

        Works on every family and its threading, forking and compat variants
        (``compat.TCPServer.from_socket``, ``http.server.HTTPServer.from_socket`` under
        ``compat.install()``).

        Resource handling: the server owns ``sock`` from then on; ``server_close()`` closes
        it. If this raises, ``sock`` is left open.

        Errors: ``ValueError`` if ``sock`` is closed, not listening (a stream socket), of
        the other type (a datagram socket for a stream server: use the datagram family's
        ``from_socket``) or of a family the class does not serve (a Unix socket for
        :class:`TCPServer`: use :class:`UnixStreamServer`).
        """
        who = f"{cls.__name__}.from_socket(sock): sock"
        if sock.fileno() == -1:
            raise ValueError(f"{who} is closed; pass an open, bound socket")
        kind = check_servable(sock, who)
        serves_unix = issubclass(cls, _UnixPath)
        if sock.type != cls.socket_type or (sock.family == socket.AF_UNIX) != serves_unix:
            raise ValueError(f"{who} is a {kind} socket; use {_KIND_CLASSES[kind]}.from_socket()")
        server = cls(sock.getsockname(), RequestHandlerClass, bind_and_activate=False, **kwargs)
        own, server.socket = server.socket, sock
        own.close()
        server.address_family = sock.family
        engine = engine_of(server)
        engine.shared_socket = True
        engine.adopting_socket = True
        try:
            server.server_bind()
        except BaseException:
            server.socket = own  # closed: the server is closed; sock stays the caller's
            raise
        finally:
            engine.adopting_socket = False
        return server

    def server_bind(self) -> None:
        """Bind the socket to ``server_address`` and store the address actually bound."""
        if engine_of(self).adopting_socket:
            self.server_address = self.socket.getsockname()
            return
        if self.allow_reuse_address and hasattr(socket, "SO_REUSEADDR"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.allow_reuse_port and hasattr(socket, "SO_REUSEPORT"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            self.socket.bind(self.server_address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise OSError(errno.EADDRINUSE, _address_in_use(self)) from exc
            raise
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        """Listen, with a backlog of ``request_queue_size``."""
        self.socket.listen(self.request_queue_size)

    def get_request(self) -> tuple[Any, Any]:
        return self.socket.accept()

    def shutdown_request(self, request: Any) -> Any:
        """Half-close the connection so the client sees EOF, then close it.

        Returns what :meth:`close_request` returns, so the engine awaits an async override.
        """
        try:
            request.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the peer is already gone: there is nobody to tell
        return self.close_request(request)

    def close_request(self, request: Any) -> None:
        request.close()

    def fileno(self) -> int:
        return self.socket.fileno()

    def server_close(self) -> None:
        """Stop serving if it is, close the socket, then what BaseServer.server_close does."""
        engine_of(self).stop_serving()
        try:
            trio.lowlevel.notify_closing(self.socket)
        except RuntimeError:
            pass  # not inside trio: nothing can be waiting on it
        self.socket.close()
        super().server_close()


class UDPServer(TCPServer):
    """A datagram server: each datagram is one request.

    ``self.request`` is ``(data, socket)``: for an async handler the server's
    trio socket (``await sock.sendto(reply, self.client_address)``), for a sync
    handler the stdlib socket. Datagrams larger than ``max_packet_size`` are
    truncated to it, as with the stdlib.
    """

    socket_type = socket.SOCK_DGRAM
    max_packet_size: int = 8192

    def __init__(
        self,
        server_address: Any,
        RequestHandlerClass: Any,
        bind_and_activate: bool = True,
    ) -> None:
        super().__init__(server_address, RequestHandlerClass, bind_and_activate)

    def server_activate(self) -> None:
        """Nothing to do: a datagram socket does not listen."""

    def get_request(self) -> tuple[Any, Any]:
        data, client_address = self.socket.recvfrom(self.max_packet_size)
        return (data, self.socket), client_address

    def shutdown_request(self, request: Any) -> Any:
        return self.close_request(request)

    def close_request(self, request: Any) -> None:
        """Nothing to close: the socket is the server's."""


class _UnixPath:
    """Filesystem rules shared by the Unix servers.

    A path that exists and is not a socket is refused (never replaced, never
    followed as a symlink); the socket file this server created is removed by
    ``server_close()``, and nothing else is. ``socket_mode`` (e.g. ``0o600``)
    sets the file's permissions right after binding; ``None`` leaves them to
    the process umask, as the stdlib does.

    A socket file nobody listens on (a connect is refused: the server that
    made it crashed or was killed) is *stale*. By default binding refuses it
    with an error that says so and how to remove it; with
    ``remove_stale_socket = True`` it is removed (logged as a warning) and
    the server binds. A socket file someone listens on is never removed.
    """

    address_family: int = socket.AF_UNIX
    server_address: Any
    socket: socket.socket
    socket_mode: int | None = None
    remove_stale_socket: bool = False
    __created: tuple[str, int, int] | None = None

    def server_bind(self) -> None:
        if engine_of(self).adopting_socket:  # type: ignore[arg-type]
            # A socket file made by whoever passed the socket: theirs to keep or remove.
            super().server_bind()  # type: ignore[misc]
            return
        self.__check_path()
        super().server_bind()  # type: ignore[misc]  # the server class after this mixin
        self.__record_path()

    def server_close(self) -> None:
        super().server_close()  # type: ignore[misc]
        self.__remove_path()

    def __check_path(self) -> None:
        path = self.server_address
        if not isinstance(path, str | bytes | os.PathLike) or _is_abstract(path):
            return
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(
                errno.EEXIST,
                f"path exists and is not a socket: {os.fsdecode(path)!r}; "
                "remove it or choose another path",
            )
        if _someone_listens(path, self.socket.type):
            return  # binding fails with EADDRINUSE, see _address_in_use()
        if not self.remove_stale_socket:
            # EADDRINUSE, what bind() would raise: code that checks the errno sees the stdlib's.
            raise OSError(
                errno.EADDRINUSE,
                f"stale socket file: {os.fsdecode(path)!r}; nobody listens on it (a server that "
                f"crashed left it behind): remove it (rm {os.fsdecode(path)}) and start again",
            )
        os.unlink(path)
        LOGGER.warning("removed the stale socket file %s: nobody listened on it", os.fsdecode(path))

    def __record_path(self) -> None:
        path = self.server_address
        if not isinstance(path, str | bytes) or _is_abstract(path) or not path:
            return
        if self.socket_mode is not None:
            os.chmod(path, self.socket_mode)
        st = os.lstat(path)
        self.__created = (os.fsdecode(path), st.st_dev, st.st_ino)

    def __remove_path(self) -> None:
        if self.__created is None:
            return
        path, dev, ino = self.__created
        self.__created = None
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        # Remove only the very socket file we created, not one that replaced it.
        if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == (dev, ino):
            os.unlink(path)


def _address_in_use(server: TCPServer) -> str:
    """The message of the ``EADDRINUSE`` error: what is taken and what to do."""
    if server.address_family == socket.AF_UNIX:
        return (
            f"address already in use: {os.fsdecode(server.server_address)!r}; another server "
            "listens on this socket: stop it or choose another path"
        )
    return (
        f"address already in use: {server.server_address!r}; stop the server listening "
        "there or choose another address (port 0 picks a free one)"
    )


def _someone_listens(path: str | bytes | os.PathLike[Any], socket_type: int) -> bool:
    """Whether a server has the Unix socket at ``path`` open: only a refused connect says no.

    Non-blocking, so a live server with a full backlog answers "busy" (yes) at once; a
    socket we may not connect to, or one of another type, counts as someone's.
    """
    with socket.socket(socket.AF_UNIX, socket_type) as probe:
        probe.setblocking(False)
        try:
            probe.connect(os.fspath(path))
        except ConnectionRefusedError:
            return False
        except OSError:
            return True
    return True


def _is_abstract(path: str | bytes | os.PathLike[Any]) -> bool:
    raw = os.fsencode(path)
    return raw[:1] == b"\0"


# The family that serves each kind of socket, for from_socket()'s advice.
_KIND_CLASSES = {
    "TCP": "TCPServer",
    "UDP": "UDPServer",
    "Unix stream": "UnixStreamServer",
    "Unix datagram": "UnixDatagramServer",
}


class UnixStreamServer(_UnixPath, TCPServer):
    """A stream server on a Unix socket path (or a Linux abstract name starting with NUL)."""


class UnixDatagramServer(_UnixPath, UDPServer):
    """A datagram server on a Unix socket path."""


class ThreadingTCPServer(ThreadingMixIn, TCPServer):
    pass


class ThreadingUDPServer(ThreadingMixIn, UDPServer):
    pass


class ThreadingUnixStreamServer(ThreadingMixIn, UnixStreamServer):
    pass


class ThreadingUnixDatagramServer(ThreadingMixIn, UnixDatagramServer):
    pass
