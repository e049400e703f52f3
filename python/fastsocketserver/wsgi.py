"""A WSGI server on fastsocketserver: ``wsgiref.simple_server`` on our engine.

``WSGIServer`` is ``wsgiref.simple_server.WSGIServer`` on fastsocketserver's
``HTTPServer``; the stdlib's ``WSGIRequestHandler`` (and its ``ServerHandler``) runs the
application unchanged. ``make_server`` has the stdlib's signature::

    with make_server("127.0.0.1", 8000, app) as httpd:
        httpd.serve_forever()
"""

from __future__ import annotations

from typing import Any, Callable

from wsgiref import simple_server
from wsgiref.simple_server import WSGIRequestHandler

from .http import HTTPServer

__all__ = ["WSGIServer", "WSGIRequestHandler", "make_server"]


class WSGIServer(HTTPServer):
    """``wsgiref.simple_server.WSGIServer`` on our ``HTTPServer``: it serves the one WSGI
    (PEP 3333) application given to ``set_app()``."""

    application: Callable[..., Any] | None = None
    base_environ: dict[str, str]

    # The environment and application accessors are the stdlib's own.
    setup_environ = simple_server.WSGIServer.setup_environ
    get_app = simple_server.WSGIServer.get_app
    set_app = simple_server.WSGIServer.set_app

    def server_bind(self) -> None:
        """Bind as ``HTTPServer`` does, then build ``base_environ`` (``setup_environ()``),
        the environment each request's WSGI environ starts from."""
        HTTPServer.server_bind(self)
        self.setup_environ()


def make_server(
    host: str,
    port: int,
    app: Callable[..., Any],
    server_class: type[WSGIServer] = WSGIServer,
    handler_class: type[WSGIRequestHandler] = WSGIRequestHandler,
) -> WSGIServer:
    """Return a ``server_class`` already listening on ``(host, port)``, serving ``app``
    through ``handler_class``; ``serve_forever()`` starts it."""
    server = server_class((host, port), handler_class)
    server.set_app(app)
    return server
