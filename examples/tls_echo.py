"""A line echo server over TLS.

    python examples/tls_echo.py --cert cert.pem --key key.pem
    python examples/tls_echo.py          # a throwaway certificate: needs trustme
    openssl s_client -quiet -connect 127.0.0.1:8000 -CAfile CA_FILE

Without --cert it makes a throwaway certificate authority and server
certificate with trustme (``pip install trustme``; a testing tool, never for
production) and prints the CA file a client must trust.
"""

from __future__ import annotations

import argparse
import logging
import ssl
import sys
import tempfile
from pathlib import Path

import trio

import trio_socketserver


class Echo(trio_socketserver.StreamRequestHandler):
    # The handler does not know about TLS: self.request is a trio.SSLStream
    # instead of a SocketStream, and rfile/wfile read and write plaintext. The
    # handshake happens on the first read; a client that fails it costs only
    # its own connection (logged), never the server.
    async def handle(self) -> None:
        async for line in self.rfile:
            await self.wfile.write(line)


class Server(trio_socketserver.TCPServer):
    # A restart binds at once, though the last run's connections linger in TIME-WAIT.
    allow_reuse_address = True


def tls_context(args: argparse.Namespace, scratch: Path) -> ssl.SSLContext:
    # Purpose.CLIENT_AUTH: the context of a server, which authenticates itself
    # to clients (and does not ask them for certificates).
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    if args.cert is not None:
        context.load_cert_chain(args.cert, args.key)
        return context
    try:
        import trustme
    except ImportError:
        sys.exit("tls_echo.py: give --cert and --key, or pip install trustme for a throwaway one")
    ca = trustme.CA()
    ca.issue_cert(args.host, "localhost").configure_cert(context)
    ca_file = scratch / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    print(f"throwaway certificate for {args.host}; clients must trust {ca_file}", flush=True)
    return context


async def main(host: str, port: int, context: ssl.SSLContext) -> int:
    async with Server((host, port), Echo, ssl_context=context) as server:
        return await trio_socketserver.serve_until_signal(server)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="A line echo server over TLS.")
    parser.add_argument("--host", default="127.0.0.1", help="default: loopback only")
    parser.add_argument("--port", type=int, default=8000, help="default: 8000; 0 picks a free one")
    parser.add_argument("--cert", help="PEM certificate (chain) of the server")
    parser.add_argument("--key", help="its PEM private key, if not in the --cert file")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # The throwaway CA file lives as long as the server does.
    with tempfile.TemporaryDirectory(prefix="tls_echo-") as scratch:
        status = trio.run(main, args.host, args.port, tls_context(args, Path(scratch)))
    sys.exit(status)
