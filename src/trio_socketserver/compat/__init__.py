# trio_socketserver.compat: the stdlib `socketserver` module as a drop-in on the trio engine.
# Every server class here is an engine class plus the stdlib's blocking entry points:
# serve_forever() and handle_request() run the engine with trio.run() in the calling thread, so
# they work from the main thread or any other, and shutdown()/server_close() reach that run from
# anywhere. Nothing here serves requests itself; what it adds is only what stdlib callers can
# observe (blocking calls, the socket's timeout, get_request() errors, how handler threads end).
# install()/uninstall() live in _install.py, the Forking* names in _forking.py (imported on first
# use), `python -m trio_socketserver.compat.http` in http.py.
"""A drop-in replacement for the stdlib ``socketserver`` module, running on trio.

Replace ``import socketserver`` with ``from trio_socketserver import compat as socketserver``,
or call :func:`install` before anything imports ``socketserver`` to run ``http.server``,
``xmlrpc.server``, ``wsgiref.simple_server`` and ``logging.config.listen`` on the trio engine
unmodified. The names, signatures, hooks and attributes are the stdlib's; the deliberate
differences are listed in ``docs/compat.md``.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from .. import _families, _server, _threading
from .._handlers import BaseRequestHandler as BaseRequestHandler
from .._handlers import DatagramRequestHandler as DatagramRequestHandler
from .._handlers import StreamRequestHandler as StreamRequestHandler
from .._server import engine_of
from ._install import install as install
from ._install import installed as installed
from ._install import uninstall as uninstall

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

# The stdlib module's __all__ (3.13's, the superset of 3.10 to 3.13), so that
# `from trio_socketserver.compat import *` binds what `from socketserver import *` binds.
__all__ = [
    "BaseRequestHandler",
    "BaseServer",
    "DatagramRequestHandler",
    "ForkingMixIn",
    "ForkingTCPServer",
    "ForkingUDPServer",
    "ForkingUnixDatagramServer",
    "ForkingUnixStreamServer",
    "StreamRequestHandler",
    "TCPServer",
    "ThreadingMixIn",
    "ThreadingTCPServer",
    "ThreadingUDPServer",
    "ThreadingUnixDatagramServer",
    "ThreadingUnixStreamServer",
    "UDPServer",
    "UnixDatagramServer",
    "UnixStreamServer",
]

# Names that need the worker-process pool; resolved by __getattr__ on first use, so that a
# threading server never loads it. The fork-safety error and warning are not the stdlib's
# (not in __all__), but code that catches them finds them here too.
_FORKING_NAMES = frozenset(
    [name for name in __all__ if name.startswith("Forking")]
    + ["ForkSafetyError", "ForkSafetyWarning"]
)

ServerT = TypeVar("ServerT", bound="BaseServer")


class BaseServer(_server.BaseServer):
    """The stdlib's ``BaseServer``, with blocking methods callable from any thread.

    :meth:`serve_forever` and :meth:`handle_request` run the trio engine in the calling thread
    (``trio.run``); :meth:`shutdown` and :meth:`server_close` may be called from any thread,
    a handler included. Hooks are plain methods called as the stdlib calls them:
    ``verify_request``, ``process_request``, ``service_actions``, ``handle_timeout`` and
    ``get_request`` on the thread running the server, ``finish_request``, ``handle_error``
    and ``shutdown_request`` of a sync handler on its handler thread.
    """

    def __init__(self, server_address: Any, RequestHandlerClass: Any) -> None:
        super().__init__(server_address, RequestHandlerClass)
        _with_stdlib_manners(self)

    def serve_forever(self, poll_interval: float | None = 0.5) -> None:  # type: ignore[override]
        """Handle requests until :meth:`shutdown`; blocks the calling thread.

        ``poll_interval`` only paces :meth:`service_actions`: a shutdown takes effect at once.

        Thread safety: call it from any thread, one ``serve_forever()`` at a time per server.

        Cancellation: ``KeyboardInterrupt`` (Ctrl-C, when it runs in the main thread) is a
        hard stop: in-flight requests are cut, their sockets shut down, and the exception
        propagates, as the stdlib's does.

        Errors: a handler's exception goes to ``handle_error`` and the server keeps serving;
        ``SystemExit``/``KeyboardInterrupt`` from a handler of a synchronous server end it and
        propagate, as in the stdlib. ``RuntimeError`` if it is already running or the server
        is closed.
        """
        self.__run_engine(super().serve_forever, poll_interval)

    def handle_request(self) -> None:  # type: ignore[override]
        """Wait for one request, handle it to completion, return; blocks the calling thread.

        Waits at most ``timeout`` seconds, or the server socket's own timeout if that is
        shorter (the stdlib's rule), then calls :meth:`handle_timeout`. With a threading
        mixin it returns once the request is done, not once its thread started.

        A sync handler's request runs in the calling thread, as the stdlib's plain server
        runs it, without starting a trio run for one request (programs such as
        ``logging.config.listen()`` call this in a loop); an async handler, a worker pool or
        an overridden ``process_request()`` go through the engine.
        """
        timeout = self.timeout
        socket_timeout = self.socket.gettimeout()
        if socket_timeout is not None:
            timeout = socket_timeout if timeout is None else min(timeout, socket_timeout)
        if self.__runs_requests_inline():
            engine_of(self).handle_request_blocking(timeout)
        else:
            self.__run_engine(self.__handle_one_request, timeout)

    def __runs_requests_inline(self) -> bool:
        cls = type(self)
        return (
            cls.process_request in _ENGINE_PROCESS_REQUESTS
            and not _server.is_async_handler(self.RequestHandlerClass)
            and not any(inspect.iscoroutinefunction(getattr(cls, n)) for n in _AWAITED_HOOKS)
        )

    async def __handle_one_request(self, wait: float | None) -> None:
        engine_of(self).check_can_serve()
        if wait is not None:
            with trio.move_on_after(wait) as waited:
                await trio.lowlevel.wait_readable(self.socket)
            if waited.cancelled_caught:
                await _server.call_hook(self.handle_timeout)
                return
        await super().handle_request()

    def __run_engine(self, async_fn: Callable[..., Awaitable[object]], *args: Any) -> None:
        """Run the engine in this thread, with the stdlib's exceptions."""
        try:
            trio.run(async_fn, *args)
        except BaseExceptionGroup as group:
            # The engine's nurseries wrap what a handler or hook raised; the stdlib's caller
            # expects the exception itself (SystemExit from a handler, an OSError, ...).
            error = _sole_exception(group)
            if error is group:
                raise
        else:
            return
        raise error

    def __enter__(self: ServerT) -> ServerT:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server_close()


def _with_stdlib_manners(server: _server.BaseServer) -> None:
    # An overriding get_request() is called only once the socket is readable, an OSError from
    # it costs that request only, and the ssl_context attribute is the user's (werkzeug's dev
    # server wraps its listening socket and stores its context there): see Engine.
    engine_of(server).stdlib_manners = True


def _sole_exception(error: BaseException) -> BaseException:
    """The one exception inside (nested) single-member exception groups, else ``error``."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


class TCPServer(BaseServer, _families.TCPServer):
    """The stdlib's ``TCPServer``: binds and listens in the constructor.

    ``request_queue_size`` is 1024, not the stdlib's 5: the server stops accepting while it
    is busy (one request at a time here, ``max_threads`` with :class:`ThreadingMixIn`), so
    waiting clients queue in the kernel backlog; with 5 a burst of clients waits for SYN
    retransmits, a second or more each. Set it back on a subclass if you rely on it.

    The constructor takes the stdlib's arguments only. TLS is done the stdlib's way (wrap
    ``server.socket``, or the connection in ``get_request()``): the engine's ``ssl_context``
    is not used here, since stdlib subclasses use that attribute name for their own context
    (werkzeug's dev server wraps its listening socket and stores it there).
    """

    def __init__(
        self, server_address: Any, RequestHandlerClass: Any, bind_and_activate: bool = True
    ) -> None:
        # Past compat's BaseServer.__init__, whose signature is the stdlib's (no bind flag).
        _families.TCPServer.__init__(self, server_address, RequestHandlerClass, bind_and_activate)
        _with_stdlib_manners(self)


class UDPServer(TCPServer, _families.UDPServer):
    """The stdlib's ``UDPServer``: each datagram is a request."""


class UnixStreamServer(TCPServer, _families.UnixStreamServer):
    """The stdlib's ``UnixStreamServer``; removes the socket file it created on close."""


class UnixDatagramServer(UDPServer, _families.UnixDatagramServer):
    """The stdlib's ``UnixDatagramServer``; removes the socket file it created on close."""


if TYPE_CHECKING:
    _Mixed = BaseServer  # what the mixins are mixed into, for the type checker only
else:
    _Mixed = object


class ThreadingMixIn(_threading.ThreadingMixIn, _Mixed):
    """The stdlib's ``ThreadingMixIn``: each request of a sync handler on its own thread.

    Threads are trio's worker threads (``trio.to_thread``), so ``trio.from_thread`` works in
    handlers; ``max_threads`` (default ``None``, unbounded as in the stdlib) bounds them, and a
    server with that many busy stops accepting. ``daemon_threads``: shutdown does not wait for
    handler threads still running after ``shutdown_grace``. ``block_on_close``:
    ``server_close()`` waits for them, for at most ``shutdown_grace`` seconds.

    Each request runs through :meth:`process_request_thread` on its thread, so overrides of
    it see every request. What escapes it (``SystemExit``, an exception from
    ``handle_error``) goes to ``threading.excepthook`` and ends that request only, as it ends
    only its thread in the stdlib.
    """

    # process_request() and server_close() are the engine's; they are spelled out on the mixin
    # because stdlib code calls them through it: ThreadingMixIn.process_request(self, ...).

    def process_request(self, request: Any, client_address: Any) -> None:
        """Start the request on a handler thread; returns at once."""
        super().process_request(request, client_address)

    def server_close(self) -> None:
        """Close the server; see :meth:`BaseServer.server_close` for which threads it joins."""
        super().server_close()


class ThreadingTCPServer(ThreadingMixIn, TCPServer):
    pass


class ThreadingUDPServer(ThreadingMixIn, UDPServer):
    pass


class ThreadingUnixStreamServer(ThreadingMixIn, UnixStreamServer):
    pass


class ThreadingUnixDatagramServer(ThreadingMixIn, UnixDatagramServer):
    pass


# The process_request() of a plain server and of ThreadingMixIn: the engine's, which a
# request handled in the calling thread can do without (see BaseServer.handle_request).
_ENGINE_PROCESS_REQUESTS = frozenset(
    {_server.BaseServer.process_request, ThreadingMixIn.process_request}
)
# Hooks the engine would await; an async override of one needs the trio run.
_AWAITED_HOOKS = ("get_request", "verify_request", "handle_timeout")


def __getattr__(name: str) -> Any:
    if name in _FORKING_NAMES:
        from . import _forking

        value = getattr(_forking, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
