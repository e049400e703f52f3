"""XML-RPC servers on fastsocketserver: ``xmlrpc.server``'s server classes on our engine.

``SimpleXMLRPCServer`` has the constructor and behaviour of
``xmlrpc.server.SimpleXMLRPCServer`` (the stdlib's ``SimpleXMLRPCDispatcher`` does the
dispatching and its ``SimpleXMLRPCRequestHandler`` speaks HTTP), on fastsocketserver's
``TCPServer``; ``ThreadingSimpleXMLRPCServer`` answers each request in its own thread.
"""

from __future__ import annotations

from typing import Any

from xmlrpc.server import SimpleXMLRPCDispatcher, SimpleXMLRPCRequestHandler

from . import TCPServer, ThreadingMixIn

__all__ = ["SimpleXMLRPCServer", "ThreadingSimpleXMLRPCServer", "SimpleXMLRPCRequestHandler"]


class SimpleXMLRPCServer(TCPServer, SimpleXMLRPCDispatcher):
    """``xmlrpc.server.SimpleXMLRPCServer`` on our ``TCPServer``: it answers XML-RPC calls
    with the functions and the instance registered on it.

    The dispatching is ``SimpleXMLRPCDispatcher``'s, so a ``_dispatch`` override
    changes it exactly as it would on the stdlib's class.
    """

    allow_reuse_address = True

    # True adds the exception and its traceback (X-exception, X-traceback headers) to
    # a 500 response, sent for an error the dispatcher did not turn into a fault. A
    # debugging aid only: it shows the server's internals to any client.
    _send_traceback_header = False

    def __init__(
        self,
        addr: Any,
        requestHandler: type[SimpleXMLRPCRequestHandler] = SimpleXMLRPCRequestHandler,
        logRequests: bool = True,
        allow_none: bool = False,
        encoding: str | None = None,
        bind_and_activate: bool = True,
        use_builtin_types: bool = False,
    ) -> None:
        self.logRequests = logRequests
        SimpleXMLRPCDispatcher.__init__(self, allow_none, encoding, use_builtin_types)
        TCPServer.__init__(self, addr, requestHandler, bind_and_activate)


class ThreadingSimpleXMLRPCServer(ThreadingMixIn, SimpleXMLRPCServer):
    """``SimpleXMLRPCServer`` answering each request in its own thread."""
