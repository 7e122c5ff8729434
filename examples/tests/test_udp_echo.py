# Tests for examples/udp_echo.py: one datagram in, the same datagram back to its sender.
import pytest
from udp_echo import Echo

from trio_socketserver.testing import run_datagram_handler

pytestmark = pytest.mark.usefixtures("no_leaks")


async def test_every_datagram_goes_back_to_its_sender():
    run = await run_datagram_handler(Echo, b"one datagram", client_address=("127.0.0.1", 4000))
    assert run.sent == [(b"one datagram", ("127.0.0.1", 4000))]
    assert run.error is None
