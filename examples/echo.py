"""A line echo server: the smallest useful trio_socketserver program.

    python examples/echo.py              # --port 0 picks a free port
    nc 127.0.0.1 8000                    # type lines; they come back

Ctrl-C or SIGTERM stops it gracefully: no new connections, and the open ones
get the server's ``shutdown_grace`` seconds (5 by default) to finish; a second
Ctrl-C stops it at once.
"""

from __future__ import annotations

import argparse
import logging
import sys

import trio

import trio_socketserver


class Echo(trio_socketserver.StreamRequestHandler):
    # `async def handle` runs each connection as its own trio task: a thousand
    # idle clients cost a thousand small tasks, not a thousand threads.
    async def handle(self) -> None:
        # rfile and wfile are async: waiting for a slow client blocks only
        # this task, never the server.
        async for line in self.rfile:
            await self.wfile.write(line)


class Server(trio_socketserver.TCPServer):
    # Restarting right after a stop must not fail with "address already in
    # use": the connections of the last run linger in TIME-WAIT for a minute.
    # (The library keeps the stdlib's default, False; http.server sets it too.)
    allow_reuse_address = True


async def main(host: str, port: int) -> int:
    # As in the stdlib, the constructor binds and listens: the real port (for
    # --port 0) is known at once. `async with` closes the server at the end.
    async with Server((host, port), Echo) as server:
        # Serves until Ctrl-C or SIGTERM, then shuts down gracefully and returns
        # (logging where it serves and what the stop cost).
        return await trio_socketserver.serve_until_signal(server)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="A line echo server.")
    parser.add_argument("--host", default="127.0.0.1", help="default: loopback only")
    parser.add_argument("--port", type=int, default=8000, help="default: 8000; 0 picks a free one")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    sys.exit(trio.run(main, args.host, args.port))
