# sd_notify: telling the service manager that started this process (systemd, or anything
# speaking its protocol) how the process is doing: READY=1, STATUS=..., STOPPING=1,
# WATCHDOG=1. The protocol is one datagram of newline-separated assignments sent to the
# AF_UNIX socket that NOTIFY_SOCKET names, so no library is needed. Without NOTIFY_SOCKET
# every call does nothing. serve_until_signal() (_signals.py) is what sends the messages;
# this module only knows how, so a supervisor of worker processes can reuse it.
from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import trio

from ._server import LOGGER

# How long one notification may wait for room in the manager's socket buffer. systemd reads
# its socket at once (and its buffer holds megabytes): a send that cannot go through this
# fast means the manager is stuck, and waiting longer would only stall serving.
NOTIFY_TIMEOUT = 1.0


def notification_address(environ: Mapping[str, str]) -> str | bytes | None:
    """The address ``NOTIFY_SOCKET`` names, as :meth:`socket.socket.sendto` takes it.

    An absolute path, or ``@name`` for a Linux abstract socket (NUL + name, as systemd
    spells it). None when the variable is unset or empty, or names another kind of address
    (``vsock:...``, which only a virtual machine's manager uses); the latter is logged as a
    warning, since the manager then waits for a READY=1 that never comes.
    """
    value = environ.get("NOTIFY_SOCKET", "")
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return value
    LOGGER.warning(
        "NOTIFY_SOCKET=%r is not a Unix socket path or @abstract name; the service manager "
        "gets no notifications from this process",
        value,
    )
    return None


async def notify(*assignments: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Send ``assignments`` (``"READY=1"``, ``"STATUS=serving"``) as one notification.

    Returns whether it was sent; False without ``NOTIFY_SOCKET``. A fresh socket per call,
    as libsystemd's ``sd_notify()`` does: notifications are rare, and no descriptor is held
    between them.

    Errors: none raised. A manager that cannot be reached (gone, or its socket full for
    ``NOTIFY_TIMEOUT`` seconds) is logged as a warning and False is returned: serving goes
    on whatever the manager's state.

    Cancellation: a checkpoint; a cancelled call sends nothing.
    """
    address = notification_address(environ)
    if address is None:
        await trio.lowlevel.checkpoint()
        return False
    message = "\n".join(assignments).encode()
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        with trio.move_on_after(NOTIFY_TIMEOUT):
            try:
                await sock.sendto(message, address)
            except OSError as exc:
                LOGGER.warning("cannot notify the service manager (NOTIFY_SOCKET): %s", exc)
                return False
            return True
    LOGGER.warning(
        "cannot notify the service manager (NOTIFY_SOCKET): its socket accepted nothing for %.1f s",
        NOTIFY_TIMEOUT,
    )
    return False


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between two ``WATCHDOG=1`` pings, or None when no watchdog asks for them.

    Half of ``WATCHDOG_USEC`` (systemd's advice: a ping late by a scheduling hiccup must not
    get the service killed), when it is set and ``WATCHDOG_PID``, if set, is ``pid``: a
    variable inherited from a parent that was itself watched is not this process's.
    """
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    watched = environ.get("WATCHDOG_PID", "")
    if watched and watched != str(pid):
        return None
    return int(usec) / 2 / 1_000_000


async def feed_watchdog(interval: float, environ: Mapping[str, str] = os.environ) -> None:
    """Send ``WATCHDOG=1`` now and every ``interval`` seconds, until cancelled.

    It runs as a task of the trio run it reports on, so the pings stop when the event loop
    stops running tasks, which is what the manager's watchdog is there to notice. It gives
    up (returns) once a ping could not be sent: the failure is logged, once.
    """
    while True:
        if not await notify("WATCHDOG=1", environ=environ):
            return
        await trio.sleep(interval)
