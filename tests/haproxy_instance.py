# What the HAProxy tests run behind the balancer (tests/test_haproxy.py): a handler that says
# which client address the server sees, for the command line's --handler, and a compat
# http.server instance, as a program.
from __future__ import annotations

import trio_socketserver


class AddressEcho(trio_socketserver.StreamRequestHandler):
    """Answers each line with the client's address as the server sees it, then the line."""

    async def handle(self) -> None:
        async for line in self.rfile:
            await self.wfile.write(f"{self.client_address[0]} ".encode() + line)
