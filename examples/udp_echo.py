"""A UDP echo service: every datagram goes back to its sender.

python examples/udp_echo.py          # --port 0 picks a free port
nc -u 127.0.0.1 8000                 # each line you type is one datagram
"""

from __future__ import annotations

import argparse
import signal

import trio

import trio_socketserver


class Echo(trio_socketserver.BaseRequestHandler):
    # For a datagram server one request is one datagram, handled in its own
    # task. self.request is (data, socket): the bytes received and the
    # server's trio socket, which replies without blocking the server.
    async def handle(self) -> None:
        data, sock = self.request
        await sock.sendto(data, self.client_address)


class Server(trio_socketserver.UDPServer):
    # A larger datagram is truncated to this, as with the stdlib: a client
    # cannot make one request hold more memory than this.
    max_packet_size = 2048


async def main(host: str, port: int) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with Server((host, port), Echo) as server, trio.open_nursery() as nursery:
            await nursery.start(server.serve_forever)
            port = server.server_address[1]
            print(f"serving udp echo on udp {host}:{port} (Ctrl-C to stop)", flush=True)
            async for _ in signals:
                break
            server.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="A UDP echo service.")
    parser.add_argument("--host", default="127.0.0.1", help="default: loopback only")
    parser.add_argument("--port", type=int, default=8000, help="default: 8000; 0 picks a free one")
    args = parser.parse_args()
    trio.run(main, args.host, args.port)
