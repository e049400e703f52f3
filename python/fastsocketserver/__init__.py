"""The classes of Python's ``socketserver`` (servers, mix-ins, handlers) on a Rust engine.

``import fastsocketserver as socketserver`` is a drop-in for the standard library's
``socketserver``: the same names, class hierarchy, mix-ins, attributes, defaults and
hooks. Rust (``fastsocketserver._core``, on mio) owns the accepted sockets, the waits
and the I/O of the handlers' ``rfile``/``wfile``; handlers stay ordinary Python classes.

Server classes: ``BaseServer``, ``TCPServer``, ``UDPServer``, ``UnixStreamServer``,
``UnixDatagramServer``; mix-ins ``ThreadingMixIn`` and ``ForkingMixIn`` and their
combinations (``ThreadingTCPServer``, ``ForkingUnixDatagramServer``, ...); handler
classes ``BaseRequestHandler``, ``StreamRequestHandler``, ``DatagramRequestHandler``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from ._handlers import BaseRequestHandler, DatagramRequestHandler, StreamRequestHandler
from ._handlers import _SocketWriter
from ._mixins import ForkingMixIn, ThreadingMixIn
from ._servers import BaseServer, TCPServer, UDPServer, UnixDatagramServer, UnixStreamServer

__all__ = [
    "BaseServer",
    "TCPServer",
    "UDPServer",
    "ThreadingUDPServer",
    "ThreadingTCPServer",
    "BaseRequestHandler",
    "StreamRequestHandler",
    "DatagramRequestHandler",
    "ThreadingMixIn",
    "ForkingUDPServer",
    "ForkingTCPServer",
    "ForkingMixIn",
    "UnixStreamServer",
    "UnixDatagramServer",
    "ThreadingUnixStreamServer",
    "ThreadingUnixDatagramServer",
    "ForkingUnixStreamServer",
    "ForkingUnixDatagramServer",
]


class ForkingUDPServer(ForkingMixIn, UDPServer):
    pass


class ForkingTCPServer(ForkingMixIn, TCPServer):
    pass


class ThreadingUDPServer(ThreadingMixIn, UDPServer):
    pass


class ThreadingTCPServer(ThreadingMixIn, TCPServer):
    pass


class ThreadingUnixStreamServer(ThreadingMixIn, UnixStreamServer):
    pass


class ThreadingUnixDatagramServer(ThreadingMixIn, UnixDatagramServer):
    pass


class ForkingUnixStreamServer(ForkingMixIn, UnixStreamServer):
    pass


class ForkingUnixDatagramServer(ForkingMixIn, UnixDatagramServer):
    pass


# Extensions, beyond the stdlib's names: not in __all__, and they keep the __module__ of
# their private submodule, so that the names the stdlib's own test_all collects (classes
# whose __module__ is this module) stay exactly socketserver's.
# Pre-forked workers under a supervisor; systemd's socket activation and sd_notify.
from ._prefork import PreforkMixIn, WorkerCrashLoop  # noqa: E402
from ._systemd import listen_fds, server_from_fd  # noqa: E402
from ._systemd import notify as sd_notify  # noqa: E402

# The public classes present themselves as members of this module, as the stdlib's
# are members of ``socketserver`` (their definitions live in private submodules).
for _name in __all__:
    globals()[_name].__module__ = __name__
_SocketWriter.__module__ = __name__
del _name
