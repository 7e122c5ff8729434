"""A UDP echo service: every datagram goes back to its sender.

python examples/udp_echo.py          # --port 0 picks a free port
nc -u 127.0.0.1 8000                 # each line you type is one datagram
"""

from __future__ import annotations

import argparse
import logging
import sys

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
    # allow_reuse_address stays False here: datagrams have no TIME-WAIT to wait
    # out, and on Linux SO_REUSEADDR would let a second instance bind this very
    # port silently instead of failing with "address already in use".


async def main(host: str, port: int) -> int:
    async with Server((host, port), Echo) as server:
        return await trio_socketserver.serve_until_signal(server)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="A UDP echo service.")
    parser.add_argument("--host", default="127.0.0.1", help="default: loopback only")
    parser.add_argument("--port", type=int, default=8000, help="default: 8000; 0 picks a free one")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    sys.exit(trio.run(main, args.host, args.port))
