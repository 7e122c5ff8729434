# Socket activation: serving on listening sockets that the service manager (systemd, or a
# supervisor speaking its protocol) created and passed to this process, instead of binding.
# The protocol is three environment variables (LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES) and
# descriptors from 3 on, so no library is needed. parse_listen_fds() reads the variables
# (no I/O); inherited_sockets() does what libsystemd's sd_listen_fds_with_names() does and
# turns each descriptor into a socket object. Building a server around one is
# TCPServer.from_socket() (_families.py).
from __future__ import annotations

import os
import socket
from collections.abc import Mapping, MutableMapping

import attrs

# The first descriptor the service manager passes (after stdin, stdout and stderr).
LISTEN_FDS_START = 3
ACTIVATION_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
# What systemd names a descriptor that its unit gave no FileDescriptorName=.
UNNAMED = "unknown"

_KINDS = {
    (socket.AF_INET, socket.SOCK_STREAM): "TCP",
    (socket.AF_INET6, socket.SOCK_STREAM): "TCP",
    (socket.AF_INET, socket.SOCK_DGRAM): "UDP",
    (socket.AF_INET6, socket.SOCK_DGRAM): "UDP",
    (socket.AF_UNIX, socket.SOCK_STREAM): "Unix stream",
    (socket.AF_UNIX, socket.SOCK_DGRAM): "Unix datagram",
}


@attrs.frozen
class InheritedSocket:
    """A listening socket passed by the service manager, from :func:`inherited_sockets`."""

    socket: socket.socket
    """The socket, ready for ``TCPServer.from_socket()`` and the other families' (its family
    and type are the socket's own: ``socket.family``, ``socket.type``)."""
    name: str
    """Its name from ``LISTEN_FDNAMES`` (systemd's ``FileDescriptorName=``, by default the
    socket unit's name), or ``"unknown"``."""


def parse_listen_fds(environ: Mapping[str, str], pid: int) -> list[tuple[int, str]]:
    """The descriptors and names the activation variables pass to process ``pid``.

    Empty when ``LISTEN_PID`` is unset or names another process (the variables were
    inherited from a parent that was itself activated: the descriptors are not ours).

    Errors: ``ValueError`` saying which variable is malformed, as libsystemd refuses them:
    ``LISTEN_PID`` or ``LISTEN_FDS`` not a number, or ``LISTEN_FDNAMES`` naming more or
    fewer descriptors than ``LISTEN_FDS`` passes.
    """
    listen_pid = environ.get("LISTEN_PID")
    if listen_pid is None:
        return []
    if not listen_pid.isdigit():
        raise ValueError(f"LISTEN_PID={listen_pid!r}: expected a process id")
    if int(listen_pid) != pid:
        return []
    count = environ.get("LISTEN_FDS", "")
    if not count.isdigit():
        raise ValueError(f"LISTEN_FDS={count!r}: expected a number of descriptors")
    fds = range(LISTEN_FDS_START, LISTEN_FDS_START + int(count))
    names_value = environ.get("LISTEN_FDNAMES")
    names = [UNNAMED] * len(fds) if names_value is None else names_value.split(":")
    if len(names) != len(fds):
        raise ValueError(
            f"LISTEN_FDNAMES={names_value!r}: {len(names)} name(s) for the "
            f"LISTEN_FDS={count} descriptor(s)"
        )
    return list(zip(fds, names, strict=True))


def inherited_sockets(
    environ: MutableMapping[str, str] | None = None, pid: int | None = None
) -> list[InheritedSocket]:
    """The listening sockets the service manager passed to this process (socket activation).

    What libsystemd's ``sd_listen_fds_with_names(1)`` does: read ``LISTEN_PID``,
    ``LISTEN_FDS`` and ``LISTEN_FDNAMES`` (from ``environ``, default ``os.environ``) and
    remove them, so that processes this one starts do not take the sockets for theirs; mark
    the descriptors close-on-exec. Empty when the variables are not for this process
    (``pid``, default ``os.getpid()``). Each descriptor must be a TCP (IPv4 or IPv6), UDP,
    Unix stream or Unix datagram socket, and a stream socket must be listening. Build a
    server around each with the family's ``from_socket()``::

        for inherited in trio_socketserver.inherited_sockets():
            servers.append(trio_socketserver.TCPServer.from_socket(inherited.socket, Handler))

    Resource handling: the sockets are the caller's to close (a server built around one
    closes it in ``server_close()``). On an error no descriptor is closed: they stay open,
    as they were passed.

    Errors: ``ValueError`` naming the variable or the descriptor that is wrong (see
    :func:`parse_listen_fds`; a descriptor that is not an open socket, is of another family
    or type, or a stream socket that is not listening). The variables are removed either way.
    """
    environ = os.environ if environ is None else environ
    try:
        passed = parse_listen_fds(environ, os.getpid() if pid is None else pid)
    finally:
        for variable in ACTIVATION_VARIABLES:
            environ.pop(variable, None)
    sockets: list[InheritedSocket] = []
    try:
        for fd, name in passed:
            sockets.append(InheritedSocket(_adopt(fd, name), name))
    except BaseException:
        for inherited in sockets:
            inherited.socket.detach()
        raise
    return sockets


def _adopt(fd: int, name: str) -> socket.socket:
    """A socket object for the passed descriptor ``fd``, once it is one we can serve."""
    who = f"LISTEN_FDS: descriptor {fd} ({name!r})"
    try:
        # The family, type and protocol come from the descriptor itself (SO_DOMAIN, SO_TYPE).
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ValueError(f"{who} is not an open socket: {exc.strerror}") from None
    try:
        check_servable(sock, who)
    except ValueError:
        sock.detach()  # the descriptor stays open: the caller gets an error, not a socket
        raise
    os.set_inheritable(fd, False)
    return sock


def socket_kind(sock: socket.socket) -> str | None:
    """``"TCP"``, ``"UDP"``, ``"Unix stream"`` or ``"Unix datagram"``; None for other sockets."""
    return _KINDS.get((sock.family, sock.type))


def check_servable(sock: socket.socket, who: str) -> str:
    """``sock``'s kind (see :func:`socket_kind`) if a server can serve it as it is, else
    ``ValueError`` with a message starting with ``who``.

    TCP (IPv4, IPv6), UDP, Unix stream or Unix datagram; a stream socket must be listening.
    """
    kind = socket_kind(sock)
    if kind is None:
        raise ValueError(
            f"{who} is a socket of family {sock.family!r} and type {sock.type!r}; only TCP, "
            "UDP, Unix stream and Unix datagram sockets can be served"
        )
    if sock.type == socket.SOCK_STREAM and not sock.getsockopt(
        socket.SOL_SOCKET, socket.SO_ACCEPTCONN
    ):
        raise ValueError(f"{who} is a {kind} socket that is not listening; call listen() first")
    return kind
