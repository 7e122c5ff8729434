# The stdlib's Forking* names for compat: compat's blocking server classes combined with the
# engine's worker-process pool (trio_socketserver._forking). Imported on first use of one of
# these names (compat.__getattr__), so threading servers never load the pool.
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import _forking
from . import TCPServer, UDPServer, UnixDatagramServer, UnixStreamServer


class ForkingMixIn(_forking.ForkingMixIn):
    """The stdlib's ``ForkingMixIn``, on the engine's pool of reused worker processes.

    ``max_children`` (40) bounds the workers, hence the requests at once; a server with all
    of them busy stops accepting. ``active_children`` is the set of worker pids. A worker
    keeps its state from one request to the next and sees the process as it was when the
    pool started (the constructor, normally): see ``docs/forking.md``.

    ``timeout`` is 300, as the stdlib's: how long :meth:`handle_request` waits.
    """

    timeout: float | None = 300

    def collect_children(self, *, blocking: bool = False) -> None:
        """Nothing to do: the pool reaps its worker processes itself.

        Kept for code that calls the stdlib's method; ``server_close()`` reaps every worker
        (``block_on_close`` chooses whether they may finish or are killed).
        """

    # The engine's, spelled out on the mixin because stdlib code calls them through it:
    # ForkingMixIn.process_request(self, ...).

    def process_request(self, request: Any, client_address: Any) -> None:
        """Hand the request to a worker process; returns at once."""
        super().process_request(request, client_address)

    def handle_timeout(self) -> None:
        """Called when :meth:`handle_request` saw no request within ``timeout``."""
        super().handle_timeout()

    def service_actions(self) -> None:
        """Called by :meth:`serve_forever` after each request and every poll interval."""
        super().service_actions()


if TYPE_CHECKING:
    _Server = TCPServer  # what _StdlibConstructor is mixed into, for the type checker only
else:
    _Server = object


class _StdlibConstructor(_Server):
    """The stdlib's constructor signature for the Forking*Server classes.

    The pool's mixin takes ``*args, **kwargs`` (a mixin must, to combine with any server's
    constructor); this restores what ``inspect.signature()`` and editors show.
    """

    def __init__(
        self, server_address: Any, RequestHandlerClass: Any, bind_and_activate: bool = True
    ) -> None:
        super().__init__(server_address, RequestHandlerClass, bind_and_activate)


class ForkingTCPServer(_StdlibConstructor, ForkingMixIn, TCPServer):
    pass


class ForkingUDPServer(_StdlibConstructor, ForkingMixIn, UDPServer):
    pass


class ForkingUnixStreamServer(_StdlibConstructor, ForkingMixIn, UnixStreamServer):
    pass


class ForkingUnixDatagramServer(_StdlibConstructor, ForkingMixIn, UnixDatagramServer):
    pass
