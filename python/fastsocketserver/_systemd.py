"""systemd integration (an extension): socket activation, inherited sockets, sd_notify.

Socket activation, with ``sd_listen_fds(3)``'s semantics: the service manager passes
listening sockets as descriptors 3, 4, ... and says so in the environment:
``LISTEN_FDS`` (how many), ``LISTEN_PID`` (the process they are for: they are ours
only when it is our pid, so a child that inherited the environment does not take
them) and optionally ``LISTEN_FDNAMES`` (colon-separated names, from
``FileDescriptorName=``). ``listen_fds()`` reads them once, marks the descriptors
close-on-exec and unsets the variables (so that programs we start do not see them).

``server_from_fd(ServerClass, fd, Handler)`` makes a server of any class that serves
an already listening socket instead of binding one (``--fd N`` on the command line,
or a socket from ``listen_fds()``): the constructor runs with
``bind_and_activate=False``, its own socket is replaced by the inherited one, and
``server_activate()`` runs only if the socket is not listening yet.

``notify(state)`` is ``sd_notify(3)``: one datagram to ``NOTIFY_SOCKET`` (a path, or an
abstract name written with a leading ``@``); nothing when the variable is unset.
"""

from __future__ import annotations

import os
import socket
import stat
import time
from typing import Any, Callable

__all__ = ["LISTEN_FDS_START", "listen_fds", "notify", "server_from_fd"]

#: The first descriptor systemd passes.
LISTEN_FDS_START = 3


def listen_fds(unset_environment: bool = True) -> list[tuple[int, str]]:
    """The descriptors passed by socket activation, as ``(fd, name)`` pairs.

    Empty unless ``LISTEN_PID`` is this process's pid. Names come from
    ``LISTEN_FDNAMES`` ("unknown" where it gives none, as systemd does). The variables
    are unset afterwards unless ``unset_environment`` is false.
    """
    try:
        if int(os.environ.get("LISTEN_PID", "")) != os.getpid():
            return []
        count = int(os.environ.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    names = os.environ.get("LISTEN_FDNAMES", "")
    if unset_environment:
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
    if count <= 0:
        return []
    given = names.split(":") if names else []
    fds = []
    for i in range(count):
        fd = LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        fds.append((fd, given[i] if i < len(given) and given[i] else "unknown"))
    return fds


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to the service manager; True if sent.

    Does nothing (False) without ``NOTIFY_SOCKET``; a failure to send is not an error
    for the service (False), as with ``sd_notify(3)``.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address[0] == "@":
        address = "\0" + address[1:]
    elif address[0] != "/":
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError:
        return False
    return True


def server_from_fd(
    server_class: Callable[..., Any],
    fd: int,
    RequestHandlerClass: Callable[..., Any],
    **attributes: Any,
) -> Any:
    """A ``server_class`` instance serving the listening socket ``fd`` (which it owns
    from now on) instead of binding its own; ``attributes`` are set on the instance
    before the socket is activated."""
    if not isinstance(fd, int) or isinstance(fd, bool):
        raise TypeError(f"fd must be an int, not {type(fd).__name__}")
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise OSError(exc.errno, f"descriptor {fd}: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise ValueError(f"descriptor {fd} is not a socket")
    sock = socket.socket(fileno=fd)
    expected = getattr(server_class, "socket_type", None)
    if expected is not None and sock.type != expected:
        sock.detach()
        raise ValueError(
            f"descriptor {fd} is a {socket.SocketKind(sock.type).name} socket; "
            f"{getattr(server_class, '__name__', server_class)} serves {socket.SocketKind(expected).name}"
        )
    try:
        address = sock.getsockname()
        cls = server_class
        family = getattr(cls, "address_family", None)
        if family is not None and family != sock.family and isinstance(cls, type):
            # An inherited AF_INET6 socket for a class written for AF_INET, say.
            cls = type(cls.__name__, (cls,), {"address_family": sock.family})
        server = cls(address, RequestHandlerClass, bind_and_activate=False)
    except BaseException:
        sock.detach()
        raise
    server.socket.close()
    server.socket = sock
    server.server_address = address
    for name, value in attributes.items():
        setattr(server, name, value)
    if sock.type == socket.SOCK_STREAM and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        server.server_activate()
    return server


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
