# The stdlib's Forking* names for compat: compat's blocking server classes combined with the
# engine's worker-process pool (trio_socketserver._forking). Imported on first use of one of
# these names (compat.__getattr__), so threading servers never load the pool.
from __future__ import annotations

from .. import _forking
from .._forking import ForkSafetyError as ForkSafetyError
from .._forking import ForkSafetyWarning as ForkSafetyWarning
from . import TCPServer, UDPServer, UnixDatagramServer, UnixStreamServer


class ForkingMixIn(_forking.ForkingMixIn):
    """The stdlib's ``ForkingMixIn``, on the engine's pool of reused worker processes.

    ``max_children`` (40) bounds the workers, hence the requests at once; a server with all
    of them busy stops accepting. ``active_children`` is the set of worker pids (``None``
    before the first), ``collect_children()`` forgets the ones that exited (with
    ``blocking=True``, stops them all), and ``timeout`` is 300, as the stdlib's: how long
    :meth:`handle_request` waits. Workers are clones of the process as it is when
    ``serve_forever()`` / ``handle_request()`` starts, and a worker keeps its state from one
    request to the next; ``max_requests_per_child`` recycles them and ``fork_safety`` says
    what to do about busy threads: see ``docs/forking.md``.
    """

    # Stdlib code calls the stdlib mixin's methods through the mixin, as in
    # ForkingMixIn.handle_timeout(self). The native mixin has the others (process_request,
    # service_actions, collect_children, server_close); handle_timeout is the engine's, which
    # the native mixin (based on object at run time) does not reach, so it is spelled out.

    def handle_timeout(self) -> None:
        """Called when :meth:`handle_request` saw no request within ``timeout``."""
        super().handle_timeout()


class ForkingTCPServer(ForkingMixIn, TCPServer):
    pass


class ForkingUDPServer(ForkingMixIn, UDPServer):
    pass


class ForkingUnixStreamServer(ForkingMixIn, UnixStreamServer):
    pass


class ForkingUnixDatagramServer(ForkingMixIn, UnixDatagramServer):
    pass
