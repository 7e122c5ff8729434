"""Testing tools for servers and handlers built on trio_socketserver.

- :func:`serving` (inside trio) and :func:`serving_in_thread` (blocking code, unittest):
  serve a real server for a test, stop it, and fail with :exc:`LeakError` if a task,
  thread, child process or file descriptor outlived it.
- :func:`run_handler`, :func:`open_handler`, :func:`run_datagram_handler`: run one handler
  with no server and no listening socket, and get its output and its error back.
- :class:`StreamClient`, :func:`open_client`: a line/stream client for tests.
- :func:`proxy_header`: the PROXY protocol header a balancer would send, for testing a
  server with ``proxy_protocol`` set.

Importing it needs no pytest. The pytest fixtures (``no_leaks``, ``serve``,
``serve_in_thread``) come from the plugin that installing the package registers under the
name ``trio_socketserver``; it only defines fixtures, so it changes nothing for tests that do
not ask for them (``pytest -p no:trio_socketserver`` turns it off all the same).
"""

from __future__ import annotations

from ._client import StreamClient as StreamClient
from ._client import open_client as open_client
from ._harness import DatagramRun as DatagramRun
from ._harness import HandlerClient as HandlerClient
from ._harness import HandlerRun as HandlerRun
from ._harness import open_handler as open_handler
from ._harness import run_datagram_handler as run_datagram_handler
from ._harness import run_handler as run_handler
from ._leaks import LeakError as LeakError
from ._proxy_header import proxy_header as proxy_header
from ._serving import serving as serving
from ._serving import serving_in_thread as serving_in_thread

__all__ = [
    "DatagramRun",
    "HandlerClient",
    "HandlerRun",
    "LeakError",
    "StreamClient",
    "open_client",
    "open_handler",
    "proxy_header",
    "run_datagram_handler",
    "run_handler",
    "serving",
    "serving_in_thread",
]
