"""HTTP servers on fastsocketserver: ``http.server``'s server classes on our engine.

``HTTPServer`` and ``ThreadingHTTPServer`` behave like their namesakes in
``http.server`` (the stdlib's request handlers, ``BaseHTTPRequestHandler``,
``SimpleHTTPRequestHandler``, ..., run on them unchanged), but the sockets, the waits
and the I/O are fastsocketserver's.

``python -m fastsocketserver.http [-b ADDRESS] [-d DIRECTORY] [-p VERSION] [port]``
serves a directory exactly like ``python -m http.server``; the operator options of
``python -m fastsocketserver`` (``--workers``, ``--reuse-port``, ``--graceful-timeout``,
``--max-requests``, ``--proxy-protocol``, ``--fd``, ...) apply to it too.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import os
import socket
import sys
from typing import Any

from . import TCPServer, ThreadingMixIn, WorkerCrashLoop, _cli, sd_notify, server_from_fd

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


def _handler_class(directory: str, protocol: str) -> type:
    """``SimpleHTTPRequestHandler`` serving ``directory`` and declaring ``protocol``.

    The directory is the handler's own default rather than an argument the server
    passes (as ``http.server``'s command line does from ``finish_request``): the server
    keeps its own ``finish_request``, so the engine dispatches requests itself and reads
    PROXY protocol headers before a handler thread is involved.
    """
    base = http.server.SimpleHTTPRequestHandler
    served = directory

    def __init__(self: Any, *args: Any, directory: Any = None, **kwargs: Any) -> None:
        base.__init__(self, *args, directory=served if directory is None else directory, **kwargs)

    # A class of its own, so that the stdlib's class keeps its protocol_version.
    return type(base.__name__, (base,), {"__init__": __init__, "protocol_version": protocol})


class _DualStackServer(ThreadingHTTPServer):
    """Accept IPv4 clients on an IPv6 socket too (CPython bpo-38907)."""

    def server_bind(self) -> None:
        # Clearing IPV6_V6ONLY fails on an IPv4 socket, which needs nothing: ignored.
        with contextlib.suppress(Exception):
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def _parser() -> argparse.ArgumentParser:
    # The options of ``python -m http.server`` (its --cgi aside), with their defaults,
    # then the operator options of ``python -m fastsocketserver``.
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
    _cli.add_operator_arguments(parser, tcp_only=True)
    return parser


def _server(args: argparse.Namespace, fd: int | None) -> HTTPServer:
    """The server the options describe, bound (or on the inherited socket ``fd``)."""
    handler = _handler_class(args.directory, args.protocol)
    if fd is not None:
        server = server_from_fd(_cli.operator_class(_DualStackServer, args), fd, handler)
        if server.socket.family not in (socket.AF_INET, socket.AF_INET6):
            server.socket.detach()
            raise ValueError(f"it is an {socket.AddressFamily(server.socket.family).name} socket; "
                             "HTTP is served on TCP (AF_INET or AF_INET6)")
        # Not bound here, so server_bind() did not record what the handlers report.
        host, port = server.server_address[:2]
        server.server_name, server.server_port = socket.getfqdn(host), port
        return server
    # The address http.server picks: the first passive one for the name (or for every
    # address of this host without --bind), whose family the server class takes.
    family, _, _, _, address = socket.getaddrinfo(
        args.bind, args.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    cls = _cli.operator_class(_DualStackServer, args, address_family=family)
    return cls(address, handler)


def main(argv: list[str] | None = None) -> None:
    """Serve a directory over HTTP like ``python -m http.server``.

    The server is a dual-stack ``ThreadingHTTPServer`` and the handler the stdlib's
    ``SimpleHTTPRequestHandler``; the banner, the address choice and the clean exit on
    Ctrl-C are ``http.server``'s. The operator options (workers, PROXY protocol, an
    inherited socket) are ``python -m fastsocketserver``'s.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    fd = _cli.inherited_fd(args)
    problem = _cli.conflict(args, fd)
    if problem is not None:
        parser.error(problem)
    prefork = _cli.prefork_attributes(args) is not None
    if prefork:
        _cli.log_supervisor()
    if fd is None:
        # As with http.server, a failure to bind is the OSError's traceback.
        httpd = _server(args, fd)
    else:
        try:
            httpd = _server(args, fd)
        except (OSError, ValueError) as exc:
            sys.exit(f"{parser.prog}: cannot serve descriptor {fd}: {exc}")
    with httpd:
        host, port = httpd.socket.getsockname()[:2]
        url_host = f"[{host}]" if ":" in host else host
        print(f"Serving HTTP on {host} port {port} (http://{url_host}:{port}/) ...")
        try:
            if not prefork:
                sd_notify("READY=1")
            httpd.serve_forever()
        except KeyboardInterrupt:
            print("\nKeyboard interrupt received, exiting.")
            sys.exit(0)
        except WorkerCrashLoop as exc:
            # The exit status python -m fastsocketserver gives a crash loop.
            print(f"{parser.prog}: {exc}", file=sys.stderr, flush=True)
            sys.exit(3)


if __name__ == "__main__":
    main()
