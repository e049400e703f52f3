"""Ready-made echo handlers, the default handlers of ``python -m fastsocketserver``."""

from __future__ import annotations

from ._handlers import DatagramRequestHandler, StreamRequestHandler

__all__ = ["LineEchoHandler", "DatagramEchoHandler"]


class LineEchoHandler(StreamRequestHandler):
    """Send every line received back to the client, until it closes."""

    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line)


class DatagramEchoHandler(DatagramRequestHandler):
    """Send every datagram back to its sender."""

    def handle(self) -> None:
        self.wfile.write(self.rfile.read())
