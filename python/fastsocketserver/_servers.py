"""Server classes: the stdlib's ``BaseServer`` family on the Rust engine.

The listening socket is a genuine ``socket.socket`` created exactly as the stdlib
creates it, so every ``server_bind``/``server_activate`` override keeps working. The
wait for the next request is the engine's (``_core.Reactor``, on mio): it releases the
GIL once per wait, wakes at once on ``shutdown()``, and, when ``get_request`` is the
library's own, accepts the connection (or receives the datagram) inside that same wait
and hands the handler a Rust-owned ``Connection``. When a subclass overrides
``get_request`` the reactor only reports readiness and the override is called, exactly
as the stdlib would call it.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from time import monotonic as _time
from typing import Any, Callable

from . import _core, _engine

__all__ = ["BaseServer", "TCPServer", "UDPServer", "UnixStreamServer", "UnixDatagramServer"]

#: What ``_next_request`` returns when the listener is readable but the request must be
#: taken by the (overridden) ``get_request``.
_READY = object()
#: What ``_next_request`` returns when the event loop ran protocol callbacks itself.
_DONE = object()


class BaseServer:
    """The request loop and the hooks every server class shares.

    A caller runs ``serve_forever(poll_interval=0.5)`` (stopped by ``shutdown()``) or
    ``handle_request()`` for a single request; ``fileno()`` is the listener's descriptor.
    Subclasses customise ``server_bind()``, ``server_activate()``, ``get_request()``,
    ``verify_request()``, ``process_request()``, ``finish_request()``,
    ``shutdown_request()``, ``close_request()``, ``handle_error()``,
    ``handle_timeout()``, ``service_actions()`` and ``server_close()``. The engine does
    the waiting; while a hook is the library's own it may do that hook's work itself,
    and it calls every hook a subclass or instance overrides.
    """

    timeout: float | None = None
    #: Protocol handlers only (an extension): close connections silent this many
    #: seconds, with ``connection_lost(TimeoutError())``. None keeps them open.
    idle_timeout: float | None = None
    #: The PROXY protocol (an extension): None, or "v1" / "v2" for the header a load
    #: balancer (HAProxy's ``send-proxy`` / ``send-proxy-v2``) sends first on every
    #: connection. The engine reads it before the handler runs, and ``client_address``
    #: is then the original client (``request.getpeername()`` stays the proxy). A
    #: ``LOCAL`` (v2) or ``UNKNOWN`` (v1) header keeps the connection's own address.
    #: Strict: every connection must start with a header of that version; one that
    #: does not, a malformed one, or one from a peer outside ``proxy_trusted`` closes
    #: that connection (a warning on the ``fastsocketserver`` logger), and no handler
    #: runs. Stream servers whose connections the engine accepts (the library's own
    #: ``get_request`` on a plain socket): anything else is a ``TypeError`` when serving.
    proxy_protocol: str | None = None
    #: The networks (``ipaddress.ip_network`` strings) from which headers are accepted.
    #: Peers of a Unix socket server are always trusted (the socket file's permissions
    #: decide who connects). ``("0.0.0.0/0", "::/0")`` trusts every peer.
    proxy_trusted: Any = ("127.0.0.0/8", "::1")
    #: Seconds a connection may take to send its whole header (None: no limit).
    proxy_header_timeout: float | None = 5.0
    # False for servers that cannot run protocol handlers (ForkingMixIn).
    _serves_protocols = True

    def __init__(self, server_address: Any, RequestHandlerClass: Callable[..., Any]) -> None:
        """Record the address and handler class and set up the loop's state.

        Subclasses extend this (calling it), never replace it.
        """
        if not self._serves_protocols and _engine.is_protocol_class(RequestHandlerClass):
            raise TypeError(
                f"{type(self).__name__} cannot run the protocol handler "
                f"{RequestHandlerClass.__name__}: protocol handlers run on the server's "
                "event loop, which a forking server would copy into every child; use "
                "TCPServer/UDPServer or a ThreadingMixIn server"
            )
        self.server_address = server_address
        self.RequestHandlerClass = RequestHandlerClass
        self.__is_shut_down = threading.Event()
        self.__shutdown_request = False
        self.__reactor: _core.Reactor | None = None
        # The listening socket object the reactor was made for: a socket replaced by
        # another one that got the same descriptor number is still a new socket.
        self.__reactor_socket: Any = None

    def server_activate(self) -> None:
        """Hook that makes the server ready for requests; nothing to do here."""

    # -- waiting for requests (the engine) ------------------------------------------

    def _reactor(self) -> _core.Reactor:
        fd = self.fileno()
        sock = getattr(self, "socket", None)
        reactor = self.__reactor
        if (
            reactor is None
            or reactor.fd != fd
            or self.__reactor_socket is not sock
            or getattr(reactor, "stale", False)
        ):
            old_socket = self.__reactor_socket
            self.__reactor = self.__reactor_socket = None
            if reactor is not None:
                # The old listener's flag is put back only if it is still open under
                # the same number; in a forked child this only marks the parent's
                # reactor closed.
                _engine.close(reactor, old_socket)
            reactor = _engine.make_engine(self, fd, sock)
            self.__reactor, self.__reactor_socket = reactor, sock
        return reactor

    def _engine_pool(self, kind: int) -> Any:
        """The worker pool the engine may hand requests to itself (see ThreadingMixIn):
        None, as a plain server runs each request inline."""
        return None

    def _report_error(self, request: Any, client_address: Any, exc: BaseException) -> None:
        """Report an exception the engine caught (from a handler it ran itself, or a
        protocol callback) through ``handle_error``, inside an ``except`` block as the
        stdlib calls it."""
        try:
            raise exc
        except BaseException:
            self.handle_error(request, client_address)
        finally:
            del exc

    def _proxy_refused(self, client_address: Any, reason: str) -> None:
        """A connection's PROXY protocol header was refused and the connection closed:
        a warning on the ``fastsocketserver`` logger (not ``handle_error``: no handler ran)."""
        import logging

        logging.getLogger("fastsocketserver").warning(
            "PROXY protocol: closed the connection from %s: %s", client_address, reason
        )

    def _close_reactor(self) -> None:
        reactor, self.__reactor = self.__reactor, None
        old_socket, self.__reactor_socket = self.__reactor_socket, None
        if reactor is not None:
            _engine.close(reactor, old_socket)

    def _next_request(self, timeout: float | None) -> Any:
        """Wait up to ``timeout`` for the next request.

        Returns None (nothing yet, or woken by ``shutdown()``), ``_READY`` (the listener
        is readable: call ``get_request``), or ``(request, client_address)`` taken by the
        engine on the library's own ``get_request`` path.
        """
        reactor = self._reactor()
        if type(reactor) is _core.EventLoop:
            return _DONE if reactor.run_once(timeout) else None
        if not reactor.accepting:
            return _READY if reactor.wait(timeout) else None
        try:
            if reactor.kind == socket.SOCK_DGRAM:
                got = reactor.recvfrom(self.max_packet_size, timeout)  # type: ignore[attr-defined]
                if got is None:
                    return None
                data, client_address = got
                return (data, self.socket), client_address  # type: ignore[attr-defined]
            return reactor.accept(timeout)
        except OSError:
            # get_request() failing is ignored by the stdlib loop too.
            return None

    # -- the loop --------------------------------------------------------------------

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Serve requests until ``shutdown()`` is called.

        The loop runs in the engine, in the stdlib's order (wait, check for shutdown,
        handle the request, ``service_actions()``), and calls every hook a subclass
        overrides. ``poll_interval`` is how often ``service_actions()`` runs while no
        request comes; ``shutdown()`` wakes the loop at once, not after it.
        """
        if type(self.__reactor) is _core.EventLoop and self.__reactor.running:
            # From a protocol callback: refused before the running loop's state is touched.
            raise RuntimeError("This event loop is already running")
        self.__is_shut_down.clear()
        try:
            # A round of the engine's loop ends it when server.socket was replaced; the
            # loop then goes on with a reactor for the new socket.
            while self._serve_with(self._reactor(), poll_interval):
                pass
        finally:
            self.__shutdown_request = False
            self.__is_shut_down.set()

    def _serve_with(self, reactor: Any, poll_interval: float | None) -> bool:
        """Run the engine's loop on ``reactor``: True if it ended because
        ``server.socket`` was replaced."""
        actions = self.service_actions if _engine.overridden(self, "service_actions") else None
        if type(reactor) is _core.EventLoop:
            reactor.serve(self, poll_interval, actions)
            return False
        listener = getattr(self, "socket", None)
        if reactor.accepting:
            bufsize = getattr(self, "max_packet_size", 8192)
            pool = self._engine_pool(reactor.kind)
            library = pool is not None or _engine.library_dispatch(self, reactor.kind)
            report = self._report_error if library else None
            proxy = _engine.proxy_policy(self) if library else None
            return reactor.serve(
                self,
                poll_interval,
                self._handle_accepted,
                actions,
                listener=listener,
                bufsize=bufsize,
                report=report,
                pool=pool,
                proxy=proxy,
            )
        return reactor.serve(self, poll_interval, self._handle_request_noblock, actions, listener=listener)

    def shutdown(self) -> None:
        """Stop ``serve_forever()`` and wait until it has returned.

        The loop is woken at once, not after ``poll_interval``. Call this from a thread
        other than the serving one: the serving thread itself would wait forever.
        """
        self.__shutdown_request = True
        reactor = self.__reactor
        if reactor is not None:
            reactor.wake()
        self.__is_shut_down.wait()

    def service_actions(self) -> None:
        """Hook run by ``serve_forever()`` after every round (a request, or
        ``poll_interval`` without one); a no-op, which the engine skips unless overridden."""

    def handle_request(self) -> Any:
        """Wait for one request and handle it, or return ``handle_timeout()``'s result.

        The wait is bounded by ``self.timeout`` and the listening socket's own timeout,
        whichever is shorter; with neither set it waits as long as it takes.
        """
        timeout = self.socket.gettimeout()  # type: ignore[attr-defined]
        if timeout is None:
            timeout = self.timeout
        elif self.timeout is not None:
            timeout = min(timeout, self.timeout)
        if timeout is not None:
            deadline = _time() + timeout
        while True:
            got = self._next_request(timeout)
            if got is not None:
                return self._handle_got(got)
            if timeout is not None:
                timeout = deadline - _time()
                if timeout < 0:
                    return self.handle_timeout()

    def _handle_got(self, got: Any) -> None:
        if got is _READY:
            self._handle_request_noblock()
        elif got is not _DONE:
            self._handle_accepted(*got)

    def _handle_request_noblock(self) -> None:
        """Take a request from ``get_request()`` (the listener is readable) and run it."""
        try:
            request, client_address = self.get_request()
        except OSError:
            return
        self._handle_accepted(request, client_address)

    def _handle_accepted(self, request: Any, client_address: Any) -> None:
        if self.proxy_protocol is not None and type(request) is _core.Connection:
            # The compatible path (a hook is overridden, or handle_request()): the
            # header is read here, before verify_request(), so that every hook sees
            # the original client; a refused header ends the request as a refused one.
            policy = _engine.proxy_policy(self)
            if policy is not None:
                client_address = request._read_proxy_header(policy, client_address)
                if client_address is None:
                    self.shutdown_request(request)
                    return
        if self.verify_request(request, client_address):
            try:
                self.process_request(request, client_address)
            except _engine.HANDLED:
                self.handle_error(request, client_address)
                self.shutdown_request(request)
            except:  # noqa: E722 -- SystemExit/KeyboardInterrupt propagate, as in the stdlib
                self.shutdown_request(request)
                raise
        else:
            self.shutdown_request(request)

    def handle_timeout(self) -> None:
        """Hook run when ``handle_request()``'s wait expires without a request; a no-op."""

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Hook that admits a request (True) or closes it unhandled (False); admits all."""
        return True

    def process_request(self, request: Any, client_address: Any) -> None:
        """Hook that runs an admitted request: ``finish_request()``, then
        ``shutdown_request()``. The mix-ins replace it (worker thread, child process)."""
        self.finish_request(request, client_address)
        self.shutdown_request(request)

    def server_close(self) -> None:
        """Release what the server holds (here, the engine's reactor); extend it."""
        self._close_reactor()

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Hook that handles the request: ``RequestHandlerClass(request, client_address, self)``."""
        self.RequestHandlerClass(request, client_address, self)

    def shutdown_request(self, request: Any) -> None:
        """Hook that ends a handled (or refused) request; here it calls ``close_request()``."""
        self.close_request(request)

    def close_request(self, request: Any) -> None:
        """Hook that releases a request's resources; nothing to release here."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Report an exception raised while a request was processed; serving goes on.

        It runs inside the ``except`` block, so ``sys.exc_info()`` holds the exception.
        The default prints the client address and the traceback to stderr.
        """
        # This banner and layout are the stdlib's output, kept to the letter on purpose:
        # logs and tests written against socketserver match them.
        print("-" * 40, file=sys.stderr)
        print("Exception occurred during processing of request from", client_address, file=sys.stderr)
        import traceback

        traceback.print_exc()
        print("-" * 40, file=sys.stderr)

    def __enter__(self):  # type: ignore[no-untyped-def]
        return self

    def __exit__(self, *args: object) -> None:
        self.server_close()


class TCPServer(BaseServer):
    """A server on a ``socket.socket`` it creates itself; by default a TCP stream server
    that handles one request at a time.

    The socket is made from the class attributes ``address_family`` and
    ``socket_type``; ``server_bind()`` honours ``allow_reuse_address`` and
    ``allow_reuse_port``, ``server_activate()`` listens with a backlog of
    ``request_queue_size``. Instances have ``server_address`` (the bound address),
    ``RequestHandlerClass`` and ``socket``.
    """

    address_family = socket.AF_INET
    socket_type = socket.SOCK_STREAM
    request_queue_size = 5
    allow_reuse_address = False
    allow_reuse_port = False

    def __init__(
        self,
        server_address: Any,
        RequestHandlerClass: Callable[..., Any],
        bind_and_activate: bool = True,
    ) -> None:
        """Create ``self.socket``; with ``bind_and_activate``, also call ``server_bind()``
        and ``server_activate()``, closing the server if either raises.

        Subclasses extend this (calling it), never replace it.
        """
        BaseServer.__init__(self, server_address, RequestHandlerClass)
        self.socket = socket.socket(self.address_family, self.socket_type)
        if bind_and_activate:
            try:
                self.server_bind()
                self.server_activate()
            except:  # noqa: E722 -- close on any failure, then re-raise it
                self.server_close()
                raise

    def server_bind(self) -> None:
        """Bind ``self.socket`` to ``server_address``, then store the address it got.

        SO_REUSEADDR and SO_REUSEPORT are set first when ``allow_reuse_address`` and
        ``allow_reuse_port`` ask for them (and the platform has them); afterwards
        ``server_address`` is what ``getsockname()`` reports (the port chosen for 0, say).
        """
        if self.allow_reuse_address and hasattr(socket, "SO_REUSEADDR"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.allow_reuse_port and hasattr(socket, "SO_REUSEPORT"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.socket.bind(self.server_address)
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        """Listen on ``self.socket``, with a backlog of ``request_queue_size``."""
        self.socket.listen(self.request_queue_size)

    def server_close(self) -> None:
        """Close the engine's reactor, then the listening socket."""
        self._close_reactor()
        self.socket.close()

    def fileno(self) -> int:
        """The listening socket's descriptor (what a selector waits on); -1 once closed."""
        return self.socket.fileno()

    def get_request(self) -> Any:
        """Accept a connection: ``(connection, client_address)``.

        While this is the library's own, the engine accepts inside its wait instead of
        calling it.
        """
        return self.socket.accept()

    def shutdown_request(self, request: Any) -> None:
        """Send the end of the stream, then ``close_request()``.

        For the connections it accepts, the engine does the same itself while every
        dispatch hook is the library's own.
        """
        try:
            # close() alone would not end the stream while a makefile() object or any
            # other reference still holds the socket open; SHUT_WR sends the FIN now.
            request.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the peer may be gone already (ENOTCONN): closing is all that is left
        self.close_request(request)

    def close_request(self, request: Any) -> None:
        """Close the connection."""
        request.close()


class UDPServer(TCPServer):
    """A datagram server (UDP by default): each request is one packet, handed to the
    handler as ``(data, server_socket)``, at most ``max_packet_size`` bytes of it."""

    allow_reuse_address = False
    allow_reuse_port = False
    socket_type = socket.SOCK_DGRAM
    max_packet_size = 8192

    def get_request(self) -> Any:
        """Receive one datagram: ``((data, self.socket), client_address)``.

        While this is the library's own, the engine receives inside its wait instead of
        calling it.
        """
        data, client_addr = self.socket.recvfrom(self.max_packet_size)
        return (data, self.socket), client_addr

    def server_activate(self) -> None:
        """Nothing to do: a datagram socket does not listen."""

    def shutdown_request(self, request: Any) -> None:
        """A datagram has no stream to shut down: only ``close_request()`` runs."""
        self.close_request(request)

    def close_request(self, request: Any) -> None:
        """Nothing to close: the socket in the request is the server's own."""


class UnixStreamServer(TCPServer):
    address_family = socket.AF_UNIX


class UnixDatagramServer(UDPServer):
    address_family = socket.AF_UNIX


_engine.register_library(
    base=BaseServer,
    get_request={TCPServer.get_request: socket.SOCK_STREAM, UDPServer.get_request: socket.SOCK_DGRAM},
    dispatch={
        kind: {
            "_handle_accepted": BaseServer._handle_accepted,
            "verify_request": BaseServer.verify_request,
            "process_request": BaseServer.process_request,
            "finish_request": BaseServer.finish_request,
            "shutdown_request": server.shutdown_request,
            "close_request": server.close_request,
        }
        for kind, server in ((socket.SOCK_STREAM, TCPServer), (socket.SOCK_DGRAM, UDPServer))
    },
)

del os
