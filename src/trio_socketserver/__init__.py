"""trio-socketserver: Python's socketserver framework on trio's structured concurrency.

The names and hooks are the stdlib's; servers run under trio nurseries and
every request handler runs in its own task (``async def handle``) or on a
worker thread of trio's (a sync ``handle``). See ``trio_socketserver.compat`` for the
blocking drop-in replacement of the stdlib module.
"""

# No `from __future__ import annotations` here: nothing is annotated, and it would put
# `annotations` among the package's public names (dir(trio_socketserver)).
from ._activation import InheritedSocket as InheritedSocket
from ._activation import inherited_sockets as inherited_sockets
from ._families import TCPServer as TCPServer
from ._families import ThreadingTCPServer as ThreadingTCPServer
from ._families import ThreadingUDPServer as ThreadingUDPServer
from ._families import ThreadingUnixDatagramServer as ThreadingUnixDatagramServer
from ._families import ThreadingUnixStreamServer as ThreadingUnixStreamServer
from ._families import UDPServer as UDPServer
from ._families import UnixDatagramServer as UnixDatagramServer
from ._families import UnixStreamServer as UnixStreamServer
from ._forking import ForkingMixIn as ForkingMixIn
from ._forking import ForkingTCPServer as ForkingTCPServer
from ._forking import ForkingUDPServer as ForkingUDPServer
from ._forking import ForkingUnixDatagramServer as ForkingUnixDatagramServer
from ._forking import ForkingUnixStreamServer as ForkingUnixStreamServer
from ._forking import ForkSafetyError as ForkSafetyError
from ._forking import ForkSafetyWarning as ForkSafetyWarning
from ._handlers import BaseRequestHandler as BaseRequestHandler
from ._handlers import DatagramRequestHandler as DatagramRequestHandler
from ._handlers import StreamRequestHandler as StreamRequestHandler
from ._health import HealthServer as HealthServer
from ._proxy import ProxyHeader as ProxyHeader
from ._proxy import current_proxy_header as current_proxy_header
from ._server import BaseServer as BaseServer
from ._server import ServerStatistics as ServerStatistics
from ._signals import serve_until_signal as serve_until_signal
from ._streams import IncompleteReadError as IncompleteReadError
from ._streams import StreamReader as StreamReader
from ._streams import StreamWriter as StreamWriter
from ._threading import ThreadingMixIn as ThreadingMixIn
from ._workers._api import serve_workers as serve_workers

__all__ = [
    "BaseRequestHandler",
    "BaseServer",
    "DatagramRequestHandler",
    "ForkSafetyError",
    "ForkSafetyWarning",
    "ForkingMixIn",
    "ForkingTCPServer",
    "ForkingUDPServer",
    "ForkingUnixDatagramServer",
    "ForkingUnixStreamServer",
    "HealthServer",
    "IncompleteReadError",
    "InheritedSocket",
    "ProxyHeader",
    "ServerStatistics",
    "StreamReader",
    "StreamRequestHandler",
    "StreamWriter",
    "TCPServer",
    "ThreadingMixIn",
    "ThreadingTCPServer",
    "ThreadingUDPServer",
    "ThreadingUnixDatagramServer",
    "ThreadingUnixStreamServer",
    "UDPServer",
    "UnixDatagramServer",
    "UnixStreamServer",
    "current_proxy_header",
    "inherited_sockets",
    "serve_until_signal",
    "serve_workers",
]
