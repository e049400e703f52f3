"""HTTP servers on fastsocketserver: ``http.server``'s server classes on our engine.

``HTTPServer`` and ``ThreadingHTTPServer`` behave like their namesakes in
``http.server`` (the stdlib's request handlers, ``BaseHTTPRequestHandler``,
``SimpleHTTPRequestHandler``, ..., run on them unchanged), but the sockets, the waits
and the I/O are fastsocketserver's.

``python -m fastsocketserver.http [-b ADDRESS] [-d DIRECTORY] [-p VERSION] [port]``
serves a directory exactly like ``python -m http.server``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import os
import socket
from typing import Any

from . import TCPServer, ThreadingMixIn

__all__ = ["HTTPServer", "ThreadingHTTPServer", "main"]


class HTTPServer(TCPServer):
    """``http.server.HTTPServer`` on fastsocketserver's ``TCPServer``."""

    # The stdlib's own value (1), by reference: a restarted server rebinds its port at
    # once instead of failing while the old connections sit in TIME_WAIT.
    allow_reuse_address = http.server.HTTPServer.allow_reuse_address

    server_name: str
    server_port: int

    def server_bind(self) -> None:
        """Bind as ``TCPServer`` does, then record ``server_name`` (the bound host's
        fully qualified name) and ``server_port``, which the request handlers report."""
        TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = socket.getfqdn(host)
        self.server_port = port


class ThreadingHTTPServer(ThreadingMixIn, HTTPServer):
    """``http.server.ThreadingHTTPServer``: one request per thread, daemonic."""

    daemon_threads = True


def main(argv: list[str] | None = None) -> None:
    """Serve a directory over HTTP like ``python -m http.server``.

    The server is a dual-stack ``ThreadingHTTPServer`` and the handler the stdlib's
    ``SimpleHTTPRequestHandler``; the banner, the address choice and the clean exit on
    Ctrl-C are ``http.server.test``'s own.
    """
    # The options of ``python -m http.server`` (its --cgi aside), with their defaults.
    parser = argparse.ArgumentParser(
        prog="python -m fastsocketserver.http",
        description="Serve the files of a directory over HTTP, on fastsocketserver.",
    )
    parser.add_argument("-b", "--bind", metavar="ADDRESS",
                        help="the address to listen on (default: every address of this host)")
    parser.add_argument("-d", "--directory", default=os.getcwd(),
                        help="the directory whose files are served (default: the current one)")
    parser.add_argument("-p", "--protocol", metavar="VERSION", default="HTTP/1.0",
                        help="the HTTP version the responses declare (default: %(default)s)")
    parser.add_argument("port", default=8000, type=int, nargs="?",
                        help="the port to listen on (default: %(default)s)")
    args = parser.parse_args(argv)

    class DualStackServer(ThreadingHTTPServer):
        """Accept IPv4 clients on an IPv6 socket too (CPython bpo-38907)."""

        def server_bind(self) -> None:
            # Clearing IPV6_V6ONLY fails on an IPv4 socket, which needs nothing: ignored.
            with contextlib.suppress(Exception):
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            super().server_bind()

        def finish_request(self, request: Any, client_address: Any) -> None:
            self.RequestHandlerClass(request, client_address, self, directory=args.directory)

    # http.server.test() sets protocol_version on the class it is given: give it a
    # subclass of its own, so that the stdlib's class is left as it was.
    handler = type("SimpleHTTPRequestHandler", (http.server.SimpleHTTPRequestHandler,), {})
    http.server.test(HandlerClass=handler, ServerClass=DualStackServer, port=args.port,
                     bind=args.bind, protocol=args.protocol)


if __name__ == "__main__":
    main()
