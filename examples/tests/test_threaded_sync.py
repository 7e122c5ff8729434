# Tests for examples/threaded_sync.py: its stdlib-style sync handler, alone on a thread and
# behind the example's threading server, driven from plain (non-trio) test code.
import socket

import pytest
from threaded_sync import Server, Upper

from trio_socketserver.testing import run_handler, serving_in_thread

pytestmark = pytest.mark.usefixtures("no_leaks")


async def test_upper_shouts_every_line():
    run = await run_handler(Upper, b"one\ntwo\n")
    assert run.output == b"ONE\nTWO\n"


def test_two_clients_at_once_with_plain_sockets():
    with serving_in_thread(Server(("127.0.0.1", 0), Upper)) as server:
        first = socket.create_connection(server.server_address, timeout=5)
        second = socket.create_connection(server.server_address, timeout=5)
        with first, second:
            first.sendall(b"first\n")
            assert first.makefile("rb").readline() == b"FIRST\n"
            # `first` still holds its thread: only a threaded server answers now.
            second.sendall(b"second\n")
            assert second.makefile("rb").readline() == b"SECOND\n"
