# The command line's built-in handlers: what `trio-socketserver` serves when no
# --handler is given. Small on purpose; they double as a smoke test a user can
# poke with `nc`. Nothing else in the package depends on them.
from __future__ import annotations

from ._handlers import BaseRequestHandler, StreamRequestHandler

# The longest piece of a line held in memory at once. A longer line is echoed
# in pieces of this size, so a peer that never sends b"\n" costs at most this
# much, not an unbounded buffer.
MAX_LINE = 65536


class EchoHandler(StreamRequestHandler):
    """Send every line back as it arrives, until the client closes the connection."""

    # A person typing into `nc` pauses for minutes; a peer that vanished
    # without a FIN would hold its connection forever. Five minutes of silence
    # ends the connection (logged at INFO as a timeout).
    timeout = 300.0

    async def handle(self) -> None:
        while line := await self.rfile.readline(MAX_LINE):
            await self.wfile.write(line)


class DatagramEchoHandler(BaseRequestHandler):
    """Send every datagram back to its sender (what ``--udp`` serves by default)."""

    async def handle(self) -> None:
        data, sock = self.request
        await sock.sendto(data, self.client_address)
