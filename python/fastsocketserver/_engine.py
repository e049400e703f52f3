"""What the server classes tell the engine, in one place.

The server classes stay shaped as the stdlib's; this module holds the decisions they
hand to the Rust engine (``_core``):

- which hooks a server overrides (``overridden``, ``library_dispatch``,
  ``library_get_request``): where a hook is the library's own the engine does its work
  in Rust, where it is overridden the engine calls it;
- which engine object serves it (``make_engine``): a ``Reactor`` for handlers with a
  ``handle()``, an ``EventLoop`` for ``asyncio.Protocol``-shaped handlers; accepting in
  the engine only on a plain ``socket.socket`` listener (``plain_listener``), so that an
  ``ssl.SSLSocket``'s ``accept()`` (its handshake) is never bypassed;
- how exceptions the engine catches reach ``handle_error`` (``HANDLED``);
- a server's PROXY protocol settings as the engine's ``ProxyPolicy`` (``proxy_policy``),
  and where the engine cannot apply them (``check_proxy``).

The server module registers its own hook implementations here once, when it is
imported (``register_library``), since they are what "the library's own" means.
"""

from __future__ import annotations

import socket
import sys
import weakref
from typing import Any, Callable

from . import _core
from ._handlers import BaseRequestHandler

#: What the dispatch boundary sends to ``handle_error``: the stdlib's ``Exception``, and
#: a Rust panic (PyO3's ``PanicException`` derives from ``BaseException``) so that an
#: engine bug fails one request instead of stopping the server.
HANDLED = (Exception, _core.PanicException)

#: The library's own classes and hooks, filled in by ``register_library``.
_base: type | None = None
_own_get_request: dict[Any, int] = {}
_library_dispatch: dict[int, dict[str, Any]] = {}


def register_library(base: type, get_request: dict[Any, int], dispatch: dict[int, dict[str, Any]]) -> None:
    """Record the library's base server class, its ``get_request`` implementations (by
    socket type) and the dispatch hooks the engine may run itself (by socket type)."""
    global _base
    _base = base
    _own_get_request.update(get_request)
    _library_dispatch.update(dispatch)


def weak_method(server: Any, name: str) -> Callable[..., Any]:
    """``getattr(server, name)`` as a callable that does not keep ``server`` alive."""
    ref = weakref.ref(server)

    def call(*args: Any) -> Any:
        target = ref()
        if target is None:
            raise ReferenceError(f"the server of this {name}() is gone")
        return getattr(target, name)(*args)

    return call


def is_protocol_class(handler: Any) -> bool:
    """True for an ``asyncio.Protocol``-shaped handler class (run on the event loop)."""
    if not isinstance(handler, type) or issubclass(handler, BaseRequestHandler):
        return False
    asyncio = sys.modules.get("asyncio")
    if asyncio is not None and issubclass(handler, asyncio.BaseProtocol):
        return True
    return any(
        hasattr(handler, name) for name in ("data_received", "get_buffer", "datagram_received")
    )


def overridden(server: Any, name: str) -> bool:
    """True when ``server.<name>`` is not the base server's own (a subclass or the
    instance overrides it), so the engine must call it."""
    return name in vars(server) or getattr(type(server), name) is not getattr(_base, name)


def library_dispatch(server: Any, kind: int, **mixin_hooks: Any) -> bool:
    """True when every dispatch hook of ``server`` is the library's own for a socket
    of ``kind`` (no subclass, mix-in or instance overrides one): the engine may then run
    them itself, with the same behaviour and fewer Python calls. ``mixin_hooks`` are
    the hooks a library mix-in replaces (``process_request=ThreadingMixIn.process_request``)."""
    hooks = _library_dispatch.get(kind)
    if hooks is None:
        return False
    hooks = {**hooks, **mixin_hooks}
    return all(name not in vars(server) and getattr(type(server), name, None) is own for name, own in hooks.items())


def library_get_request(server: Any, kind: int) -> bool:
    """True when ``server.get_request`` is the library's own for a socket of ``kind``,
    so that the engine may accept (or receive) on its behalf."""
    if "get_request" in vars(server):
        return False
    return _own_get_request.get(getattr(type(server), "get_request", None)) == kind


def plain_listener(sock: Any, kind: int) -> bool:
    """True when taking a request on ``sock``'s descriptor in the engine is exactly what
    ``sock.accept()`` (``sock.recvfrom()`` for datagrams) would do: a ``socket.socket``
    whose class and instance keep the socket module's own methods. Anything else (an
    ``ssl.SSLSocket``, whose ``accept()`` runs the TLS handshake; a subclass or object
    with its own ``accept``) must be called as the stdlib calls it."""
    if not isinstance(sock, socket.socket):
        return False
    ssl = sys.modules.get("ssl")
    if ssl is not None and isinstance(sock, ssl.SSLSocket):
        return False
    names = ("accept", "_accept") if kind == socket.SOCK_STREAM else ("recvfrom",)
    own = getattr(sock, "__dict__", {})
    cls = type(sock)
    return all(name not in own and getattr(cls, name) is getattr(socket.socket, name) for name in names)


def fileno(sock: Any) -> int:
    """``sock.fileno()``, or -1 for a closed or detached socket or no socket at all."""
    try:
        return sock.fileno()
    except (AttributeError, OSError, ValueError):
        return -1


def close(engine: Any, listener: Any) -> None:
    """Close a Reactor or EventLoop; a Reactor is told whether its listener is still
    open under its number (then it puts the listener's blocking flag back)."""
    if type(engine) is _core.Reactor:
        engine.close(fileno(listener) == engine.fd)
    else:
        engine.close()


def proxy_policy(server: Any) -> _core.ProxyPolicy | None:
    """``server``'s PROXY protocol settings as the engine applies them, or None when
    ``proxy_protocol`` is None. Built again only when the attributes change."""
    version = server.proxy_protocol
    if version is None:
        return None
    trusted = server.proxy_trusted
    if isinstance(trusted, (str, bytes)):
        trusted = (trusted,)
    key = (version, tuple(trusted), server.proxy_header_timeout)
    cached = server.__dict__.get("_proxy_cache")
    if cached is not None and cached[0] == key:
        return cached[1]
    if not isinstance(version, str):
        raise TypeError(f"proxy_protocol must be None, 'v1' or 'v2', not {version!r}")
    import ipaddress

    networks = []
    for entry in key[1]:
        net = ipaddress.ip_network(entry, strict=False)
        networks.append((net.network_address.packed, net.prefixlen))
    policy = _core.ProxyPolicy(version, networks, key[2], weak_method(server, "_proxy_refused"))
    server.__dict__["_proxy_cache"] = (key, policy)
    return policy


def check_proxy(server: Any, kind: int, accepting: bool, protocol: bool) -> None:
    """Refuse, with a ``TypeError``, a ``proxy_protocol`` the engine cannot apply: the
    header is read off the connections the engine accepts itself, on stream sockets."""
    if server.proxy_protocol is None:
        return
    name = type(server).__name__
    if kind != socket.SOCK_STREAM:
        raise TypeError(f"{name}: proxy_protocol needs a stream server (the PROXY protocol precedes a stream)")
    if not accepting:
        raise TypeError(
            f"{name}: proxy_protocol needs the engine to accept the connections: the server's "
            "socket must be a plain socket.socket and get_request() the library's own (an "
            "overridden get_request() or a TLS socket would read the stream before the header)"
        )
    proxy_policy(server)  # bad settings fail here, before the first connection


def make_engine(server: Any, fd: int, sock: Any) -> Any:
    """The engine object that serves ``server`` on listener ``sock`` (descriptor
    ``fd``): an ``EventLoop`` for a protocol handler, else a ``Reactor`` that accepts in
    the engine when it may and otherwise only reports readiness."""
    if isinstance(sock, socket.socket) and sock.fileno() == fd:
        family, kind, proto = int(sock.family), int(sock.type), sock.proto
    else:
        family, kind, proto = socket.AF_UNSPEC, 0, 0
    plain = plain_listener(sock, kind)
    accepting = plain and library_get_request(server, kind)
    protocol = is_protocol_class(server.RequestHandlerClass)
    check_proxy(server, kind, accepting, protocol)
    if not protocol:
        return _core.Reactor(fd, family, kind, proto, accepting)
    name = type(server).__name__
    if not plain:
        raise TypeError(
            f"{name}.socket is a {type(sock).__module__}.{type(sock).__qualname__}, not a "
            "plain socket.socket: protocol handlers are accepted by the engine's event "
            "loop on the raw descriptor, which would bypass that object's accept() (for "
            "an ssl.SSLSocket, its TLS handshake) and serve plaintext"
        )
    if not accepting:
        raise TypeError(
            "protocol handlers are served by the engine's own accept loop; "
            f"{name} overrides get_request(), which it cannot call"
        )
    # The loop lives in the server's __dict__: it must not hold the server strongly
    # (the engine's objects are invisible to the cycle collector), or a server dropped
    # without server_close() would never be freed, nor its connections closed.
    verify = weak_method(server, "verify_request") if overridden(server, "verify_request") else None
    return _core.EventLoop(
        fd,
        family,
        kind,
        proto,
        server.RequestHandlerClass,
        weak_method(server, "_report_error"),
        verify,
        server.idle_timeout,
        proxy_policy(server),
    )
