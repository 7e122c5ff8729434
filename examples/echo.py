"""A line echo server: the smallest useful trio_socketserver program.

    python examples/echo.py              # --port 0 picks a free port
    nc 127.0.0.1 8000                    # type lines; they come back

Ctrl-C or SIGTERM stops it gracefully: no new connections, and the open ones
get the server's ``shutdown_grace`` seconds (5 by default) to finish.
"""

from __future__ import annotations

import argparse
import signal

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


async def main(host: str, port: int) -> None:
    # Take over Ctrl-C and SIGTERM before listening, so a signal can never
    # arrive while nobody is there to turn it into a graceful shutdown.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        # As in the stdlib, the constructor binds and listens: the real port
        # (for --port 0) is known at once.
        async with (
            trio_socketserver.TCPServer((host, port), Echo) as server,
            trio.open_nursery() as nursery,
        ):
            # start() returns once the server is accepting connections.
            await nursery.start(server.serve_forever)
            port = server.server_address[1]
            print(f"serving echo on tcp {host}:{port} (Ctrl-C to stop)", flush=True)
            async for _ in signals:  # wait for the first signal
                break
            # Returns at once; the nursery then waits while serve_forever drains.
            server.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="A line echo server.")
    parser.add_argument("--host", default="127.0.0.1", help="default: loopback only")
    parser.add_argument("--port", type=int, default=8000, help="default: 8000; 0 picks a free one")
    args = parser.parse_args()
    trio.run(main, args.host, args.port)
