"""Request handler classes: ``BaseRequestHandler``, ``StreamRequestHandler``,
``DatagramRequestHandler``, as in the stdlib.

On a connection the engine accepted, ``rfile`` and ``wfile`` are the engine's own
buffered reader and writer (``_core.SocketReader``/``_core.SocketWriter``, registered as
``io.BufferedIOBase``); on a genuine ``socket.socket`` (a server whose ``get_request``
override returns one) they are the stdlib's ``makefile`` objects.
"""

from __future__ import annotations

import socket
from io import BufferedIOBase, BytesIO
from typing import Any

from . import _core

__all__ = ["BaseRequestHandler", "StreamRequestHandler", "DatagramRequestHandler"]


class BaseRequestHandler:
    """The object a server makes for each request; a service subclasses it and defines
    ``handle()``.

    The constructor stores ``request``, ``client_address`` and ``server`` on the
    instance, then runs ``setup()``, ``handle()`` and ``finish()``; ``finish()`` runs
    even when ``handle()`` raises.
    """

    def __init__(self, request: Any, client_address: Any, server: Any) -> None:
        self.request = request
        self.client_address = client_address
        self.server = server
        self.setup()
        try:
            self.handle()
        finally:
            self.finish()

    def setup(self) -> None:
        pass

    def handle(self) -> None:
        pass

    def finish(self) -> None:
        pass


class StreamRequestHandler(BaseRequestHandler):
    """A handler for a stream connection (``self.connection``), read through ``rfile``
    and written through ``wfile``."""

    # rfile's buffer: -1 is io.DEFAULT_BUFFER_SIZE. wfile's: 0 sends each write before
    # it returns; a positive size lets writes collect, sent at the latest when the
    # buffer fills, at flush() or at close.
    rbufsize = -1
    wbufsize = 0

    # setup() gives the connection this timeout (settimeout) unless it is None.
    timeout: float | None = None

    # True: setup() sets TCP_NODELAY, so small writes leave without waiting.
    disable_nagle_algorithm = False

    def setup(self) -> None:
        self.connection = self.request
        if self.timeout is not None:
            self.connection.settimeout(self.timeout)
        if self.disable_nagle_algorithm:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        self.rfile = self.connection.makefile("rb", self.rbufsize)
        if self.wbufsize == 0:
            if type(self.connection) is _core.Connection:
                self.wfile = _core.SocketWriter(self.connection)
            else:
                self.wfile = _SocketWriter(self.connection)
        else:
            self.wfile = self.connection.makefile("wb", self.wbufsize)

    def finish(self) -> None:
        if not self.wfile.closed:
            try:
                self.wfile.flush()
            except OSError:
                # The connection may be broken by now (ECONNABORTED, say); the files
                # are closed all the same.
                pass
        self.wfile.close()
        self.rfile.close()


class _SocketWriter(BufferedIOBase):
    """Writable BufferedIOBase over a genuine socket, holding nothing in a buffer."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:  # type: ignore[override]
        self._sock.sendall(b)
        with memoryview(b) as view:
            return view.nbytes

    def fileno(self) -> int:
        return self._sock.fileno()


class DatagramRequestHandler(BaseRequestHandler):
    """A handler for one datagram: ``rfile`` reads the packet, and what the handler
    writes to ``wfile`` is sent back to the client by ``finish()``."""

    def setup(self) -> None:
        self.packet, self.socket = self.request
        self.rfile = BytesIO(self.packet)
        self.wfile = BytesIO()

    def finish(self) -> None:
        self.socket.sendto(self.wfile.getvalue(), self.client_address)


BufferedIOBase.register(_core.SocketReader)
BufferedIOBase.register(_core.SocketWriter)
