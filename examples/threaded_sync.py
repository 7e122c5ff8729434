"""A stdlib-style synchronous handler, served on threads.

    python examples/threaded_sync.py     # --port 0 picks a free port
    nc 127.0.0.1 8000

The handler is written exactly as for the stdlib's socketserver: a plain
``def handle`` with blocking file objects. ThreadingTCPServer runs each
connection on its own (reused) thread, while accepting and shutting down stay
on trio.
"""

from __future__ import annotations

import argparse
import logging
import sys

import trio

import trio_socketserver


class Upper(trio_socketserver.StreamRequestHandler):
    # A sync handle(): self.rfile and self.wfile are the stdlib's blocking
    # files, and any blocking call (a database driver, time.sleep, a
    # subprocess) is fine here, because only this client's thread waits.
    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line.upper())


class Server(trio_socketserver.ThreadingTCPServer):
    # At most this many clients at once: when every thread is busy the server
    # stops accepting, and new clients wait in the kernel's listen backlog
    # instead of costing a thread each. (The stdlib has no such bound.)
    max_threads = 32
    # Threads cannot be cancelled. After the shutdown grace the server shuts
    # their sockets down, which ends blocked reads; daemon threads mean one
    # stuck elsewhere does not keep the process alive.
    daemon_threads = True
    # A restart binds at once, though the last run's connections linger in TIME-WAIT.
    allow_reuse_address = True


async def main(host: str, port: int) -> int:
    async with Server((host, port), Upper) as server:
        return await trio_socketserver.serve_until_signal(server)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="A sync handler on threads.")
    parser.add_argument("--host", default="127.0.0.1", help="default: loopback only")
    parser.add_argument("--port", type=int, default=8000, help="default: 8000; 0 picks a free one")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    sys.exit(trio.run(main, args.host, args.port))
