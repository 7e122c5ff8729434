"""handle_request() in a loop, the stdlib against compat, measured in the same run.

`python bench/handle_request.py [--requests N] [--rounds R]`: a client thread connects N
times on 127.0.0.1, sends a line and reads the echo, while the main thread calls
`server.handle_request()` N times (the loop `logging.config.listen()` runs). Prints the
median microseconds per request of each, per server class, and compat's ratio to the stdlib.
"""

from __future__ import annotations

import argparse
import socket
import socketserver
import statistics
import threading
import time
from typing import Any

from trio_socketserver import compat

CLIENT_TIMEOUT = 10.0


class Echo(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.wfile.write(self.rfile.readline())


def microseconds_per_request(module: Any, class_name: str, requests: int) -> float:
    server = getattr(module, class_name)(("127.0.0.1", 0), Echo)

    def clients() -> None:
        for _ in range(requests):
            with socket.create_connection(server.server_address, timeout=CLIENT_TIMEOUT) as c:
                c.sendall(b"x\n")
                c.recv(16)

    thread = threading.Thread(target=clients)
    thread.start()
    try:
        start = time.perf_counter()
        for _ in range(requests):
            server.handle_request()
        return (time.perf_counter() - start) / requests * 1e6
    finally:
        thread.join(CLIENT_TIMEOUT)
        server.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    options = parser.parse_args()
    for class_name in ("TCPServer", "ThreadingTCPServer"):
        rounds = [
            (
                microseconds_per_request(socketserver, class_name, options.requests),
                microseconds_per_request(compat, class_name, options.requests),
            )
            for _ in range(options.rounds)
        ]
        stdlib = statistics.median(r[0] for r in rounds)
        ours = statistics.median(r[1] for r in rounds)
        print(
            f"{class_name}: stdlib {stdlib:.0f} us/request, compat {ours:.0f} us/request, "
            f"compat/stdlib {ours / stdlib:.2f}"
        )


if __name__ == "__main__":
    main()
