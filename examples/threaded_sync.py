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
import signal

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


async def main(host: str, port: int) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with Server((host, port), Upper) as server, trio.open_nursery() as nursery:
            await nursery.start(server.serve_forever)
            port = server.server_address[1]
            print(f"serving upper on tcp {host}:{port} (Ctrl-C to stop)", flush=True)
            async for _ in signals:
                break
            server.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="A sync handler on threads.")
    parser.add_argument("--host", default="127.0.0.1", help="default: loopback only")
    parser.add_argument("--port", type=int, default=8000, help="default: 8000; 0 picks a free one")
    args = parser.parse_args()
    trio.run(main, args.host, args.port)
