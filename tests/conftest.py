"""Shared fixtures and helpers for the fastsocketserver test-suite.

Most tests are *differential*: they are parametrized over the stdlib
``socketserver`` module and ``fastsocketserver`` (fixture ``mod``), run the
same scenario against both, and assert the same client-visible behaviour and
the same hook call sequence.  The stdlib run is the reference.

Rules every helper here follows:

* loopback only, port 0 only (or a Unix socket path in a fresh short temp dir);
* every client socket has a timeout (``CLIENT_TIMEOUT``);
* every server started in a thread is shut down, closed and joined with a
  timeout, even when the test fails (``serving``).
"""

from __future__ import annotations

import contextlib
import faulthandler
import gc
import os
import shutil
import socket
import socketserver as stdlib_socketserver
import sys
import tempfile
import threading
import time

import pytest

# Tests live in folders by concern (blocking/, evented/, conformance/, stress/, workers/);
# the helpers they share (this module, handler_probe) are here, one level up. A few test
# modules reuse another folder's helpers (the CLI runner of blocking/test_lifecycle), so
# every folder is importable, whichever folders a run collects.
_TESTS = os.path.dirname(os.path.abspath(__file__))
for _folder in ("", "blocking", "evented", "conformance", "stress", "workers"):
    if os.path.join(_TESTS, _folder).rstrip(os.sep) not in sys.path:
        sys.path.append(os.path.join(_TESTS, _folder).rstrip(os.sep))

CLIENT_TIMEOUT = 10.0
JOIN_TIMEOUT = 10.0
#: hard ceiling for a single test; a hang dumps every thread's stack and exits
TEST_HARD_TIMEOUT = 120.0

STDLIB = stdlib_socketserver

#: names that Python 3.12 added to socketserver.__all__; fastsocketserver may
#: export them on 3.11 as well (the compatibility contract covers 3.11-3.13)
PY312_NAMES = {"ForkingUnixStreamServer", "ForkingUnixDatagramServer"}


# ---------------------------------------------------------------------------
# module fixtures
# ---------------------------------------------------------------------------

def import_fast():
    """Import fastsocketserver; a failing import fails the test (never a skip that
    would hide a broken build)."""
    import fastsocketserver

    return fastsocketserver


@pytest.fixture(params=["stdlib", "fast"])
def mod(request):
    """The module under test: stdlib ``socketserver`` or ``fastsocketserver``."""
    if request.param == "stdlib":
        return STDLIB
    return import_fast()


@pytest.fixture
def fast_mod():
    """``fastsocketserver`` only (skips while it cannot be imported)."""
    return import_fast()


def differential(mod, scenario, *args, **kwargs):
    """Run ``scenario(module, ...)`` for the stdlib and for ``mod``.

    Returns ``(reference, got)``.  When ``mod`` is the stdlib the scenario runs
    once and both values are the same object; tests then still check their
    sanity assertions on the reference.
    """
    got = scenario(mod, *args, **kwargs)
    if mod is STDLIB:
        return got, got
    ref = scenario(STDLIB, *args, **kwargs)
    return ref, got


# ---------------------------------------------------------------------------
# safety net against hangs
# ---------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _hard_timeout(request):
    """Dump all stacks and exit if a single test hangs (belt and braces: every
    test is bounded by socket and join timeouts already)."""
    try:
        configured = request.config.getini("faulthandler_timeout")
    except (ValueError, KeyError):
        configured = None
    if configured:
        yield
        return
    faulthandler.dump_traceback_later(TEST_HARD_TIMEOUT, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def main_thread():
    """Skip unless the test runs in the main thread (signal tests need it)."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal tests must run in the main thread")


# ---------------------------------------------------------------------------
# processes, descriptors, paths
# ---------------------------------------------------------------------------

def fd_count() -> int:
    """Number of open file descriptors of this process."""
    return len(os.listdir("/proc/self/fd"))


def settled_fd_count() -> int:
    """fd count after a garbage collection (sockets closed by GC go away, including
    those the engine's destructors hand to its closer thread)."""
    gc.collect()
    import_fast()._core._settle_closes()
    return fd_count()


def make_unix_dir() -> str:
    """A fresh short temp dir (Unix socket paths are limited to 107 bytes)."""
    return tempfile.mkdtemp(prefix="fss", dir="/tmp")


@pytest.fixture
def unix_dir():
    path = make_unix_dir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class PathMaker:
    """Hands out unique socket paths inside one temp dir."""

    def __init__(self, directory: str):
        self.directory = directory
        self._n = 0

    def __call__(self, stem: str = "s") -> str:
        self._n += 1
        return os.path.join(self.directory, f"{stem}{self._n}")


@pytest.fixture
def unix_path(unix_dir):
    """Factory: ``unix_path()`` returns a new unused path in a temp dir."""
    return PathMaker(unix_dir)


_ipv6_cache: list = []


def ipv6_available() -> bool:
    if not _ipv6_cache:
        ok = False
        if socket.has_ipv6:
            try:
                with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
                    s.bind(("::1", 0))
                ok = True
            except OSError:
                ok = False
        _ipv6_cache.append(ok)
    return _ipv6_cache[0]


def require_ipv6():
    if not ipv6_available():
        pytest.skip("IPv6 loopback (::1) is not available")


# ---------------------------------------------------------------------------
# server kinds
# ---------------------------------------------------------------------------

class Kind:
    """One kind of server: address family, socket type, base class name."""

    def __init__(self, name, family, socktype, base_name, host=None):
        self.name = name
        self.family = family
        self.socktype = socktype
        self.base_name = base_name
        self.host = host

    @property
    def stream(self) -> bool:
        return self.socktype == socket.SOCK_STREAM

    @property
    def unix(self) -> bool:
        return self.family == socket.AF_UNIX

    def server_class(self, mod):
        base = getattr(mod, self.base_name)
        if self.family == socket.AF_INET6:
            return type(base.__name__ + "6", (base,),
                        {"address_family": socket.AF_INET6})
        return base

    def bind_address(self, paths: PathMaker):
        if self.unix:
            return paths("srv")
        return (self.host, 0)

    def client(self, server_address, paths: PathMaker | None = None,
               timeout: float = CLIENT_TIMEOUT, connect: bool = True,
               bind: bool = True):
        """A client socket with a timeout.  Stream clients are connected;
        Unix datagram clients are bound to their own path (so the server can
        reply) unless ``bind=False``."""
        s = socket.socket(self.family, self.socktype)
        try:
            s.settimeout(timeout)
            if self.unix and not self.stream and bind:
                assert paths is not None
                s.bind(paths("cli"))
            if self.stream and connect:
                s.connect(server_address)
        except BaseException:
            s.close()
            raise
        return s

    def __repr__(self):
        return f"Kind({self.name})"


KINDS = {
    "tcp": Kind("tcp", socket.AF_INET, socket.SOCK_STREAM, "TCPServer", "127.0.0.1"),
    "tcp6": Kind("tcp6", socket.AF_INET6, socket.SOCK_STREAM, "TCPServer", "::1"),
    "unix_stream": Kind("unix_stream", socket.AF_UNIX, socket.SOCK_STREAM, "UnixStreamServer"),
    "udp": Kind("udp", socket.AF_INET, socket.SOCK_DGRAM, "UDPServer", "127.0.0.1"),
    "udp6": Kind("udp6", socket.AF_INET6, socket.SOCK_DGRAM, "UDPServer", "::1"),
    "unix_dgram": Kind("unix_dgram", socket.AF_UNIX, socket.SOCK_DGRAM, "UnixDatagramServer"),
}
STREAM_KINDS = ["tcp", "tcp6", "unix_stream"]
DGRAM_KINDS = ["udp", "udp6", "unix_dgram"]
ALL_KINDS = STREAM_KINDS + DGRAM_KINDS


def get_kind(name: str) -> Kind:
    kind = KINDS[name]
    if kind.family == socket.AF_INET6:
        require_ipv6()
    return kind


def make_server(mod, kind: Kind, handler, paths: PathMaker, *, bases=(),
                attrs=None, bind_and_activate=True, server_cls=None):
    """Build a server of ``kind`` from ``mod``.  ``bases`` are extra classes put
    before the module's class (e.g. a recording mixin), ``attrs`` class attrs."""
    base = server_cls if server_cls is not None else kind.server_class(mod)
    cls = base
    if bases or attrs:
        cls = type("Test" + base.__name__, tuple(bases) + (base,), dict(attrs or {}))
    return cls(kind.bind_address(paths), handler, bind_and_activate)


# ---------------------------------------------------------------------------
# serving in a thread
# ---------------------------------------------------------------------------

class ServeThread:
    def __init__(self, server, poll_interval):
        self.server = server
        self.poll_interval = poll_interval
        self.exception: BaseException | None = None
        self.returned = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name="serve_forever")

    def _run(self):
        try:
            self.server.serve_forever(self.poll_interval)
        except BaseException as exc:  # recorded, re-raised in the test
            self.exception = exc
        finally:
            self.returned.set()


def call_with_timeout(fn, timeout=JOIN_TIMEOUT, name="helper"):
    """Run ``fn()`` in a daemon thread; return (finished, result, exception)."""
    box = {}

    def run():
        try:
            box["result"] = fn()
        except BaseException as exc:
            box["exc"] = exc

    t = threading.Thread(target=run, daemon=True, name=name)
    t.start()
    t.join(timeout)
    return (not t.is_alive()), box.get("result"), box.get("exc")


@contextlib.contextmanager
def serving(server, poll_interval=0.01, *, allow_exception=False, close=True):
    """Run ``server.serve_forever(poll_interval)`` in a daemon thread.

    On exit always calls ``shutdown()`` (bounded by a timeout) and
    ``server_close()``, joins the thread with a timeout and asserts that it
    stopped and (unless ``allow_exception``) that serve_forever raised nothing.
    """
    st = ServeThread(server, poll_interval)
    st.thread.start()
    body_failed = False
    try:
        yield st
    except BaseException:
        body_failed = True
        raise
    finally:
        shut_ok, _, shut_exc = call_with_timeout(server.shutdown, name="shutdown")
        if close:
            try:
                server.server_close()
            except Exception:
                if not body_failed:
                    raise
        st.thread.join(JOIN_TIMEOUT)
        if not body_failed:
            assert shut_ok, "server.shutdown() did not return within the timeout"
            assert shut_exc is None, f"server.shutdown() raised {shut_exc!r}"
            assert not st.thread.is_alive(), "serve_forever() thread did not stop"
            if st.exception is not None and not allow_exception:
                raise AssertionError(
                    f"serve_forever() raised {st.exception!r}") from st.exception


# ---------------------------------------------------------------------------
# client helpers
# ---------------------------------------------------------------------------

def recv_until_eof(sock, limit=1 << 30) -> bytes:
    chunks = []
    total = 0
    while True:
        data = sock.recv(65536)
        if not data:
            break
        chunks.append(data)
        total += len(data)
        if total > limit:
            raise AssertionError("peer sent more than expected")
    return b"".join(chunks)


def recv_exactly(sock, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = sock.recv(min(65536, n - len(buf)))
        if not data:
            break
        buf += data
    return bytes(buf)


def recv_line(sock, maxlen=1 << 20) -> bytes:
    """Read up to and including b'\\n' (byte-wise; for small replies)."""
    buf = bytearray()
    while not buf.endswith(b"\n"):
        data = sock.recv(1)
        if not data:
            break
        buf += data
        if len(buf) > maxlen:
            raise AssertionError("line too long")
    return bytes(buf)


def stream_exchange(sock, chunks, half_close=True) -> bytes:
    """Send ``chunks`` (one send each) from a helper thread while reading the
    reply until EOF; returns everything received.  Closes ``sock``."""
    errors = []

    def sender():
        try:
            for c in chunks:
                sock.sendall(c)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=sender, daemon=True, name="sender")
    t.start()
    try:
        data = recv_until_eof(sock)
    finally:
        t.join(JOIN_TIMEOUT)
        sock.close()
    assert not t.is_alive(), "sender thread did not finish"
    if errors:
        raise errors[0]
    return data


def wait_for(predicate, timeout=JOIN_TIMEOUT, interval=0.005) -> bool:
    """Poll ``predicate`` until true or timeout; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


# ---------------------------------------------------------------------------
# recording hook calls
# ---------------------------------------------------------------------------

SERVER_HOOKS = ["server_bind", "server_activate", "get_request", "verify_request",
                "process_request", "finish_request", "shutdown_request",
                "close_request", "handle_error", "handle_timeout",
                "service_actions", "server_close"]


def addr_shape(addr):
    """Type/shape of an address, comparable between the two modules."""
    if addr is None:
        return ("None",)
    if isinstance(addr, str):
        return ("str", "empty" if addr == "" else "path")
    if isinstance(addr, bytes):
        return ("bytes", len(addr) > 0)
    if isinstance(addr, tuple):
        return ("tuple", len(addr), tuple(type(x).__name__ for x in addr))
    return (type(addr).__name__,)


class RecordingServerMixin:
    """Put before a server class: every hook appends ``(name, ...)`` to
    ``self.calls`` then calls super().  Requests are recorded as indices
    (``req#N``) so identity of the request object across hooks is checked."""

    def __init__(self, *args, **kwargs):
        self.calls = []
        self.requests = []
        self.calls_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def record(self, *entry):
        with self.calls_lock:
            self.calls.append(entry)

    def rid(self, request):
        with self.calls_lock:
            for i, r in enumerate(self.requests):
                if r is request:
                    return f"req#{i}"
            self.requests.append(request)
            return f"req#{len(self.requests) - 1}"

    def server_bind(self):
        self.record("server_bind")
        return super().server_bind()

    def server_activate(self):
        self.record("server_activate")
        return super().server_activate()

    def get_request(self):
        try:
            request, client_address = super().get_request()
        except BaseException as exc:
            self.record("get_request", "raised", type(exc).__name__)
            raise
        self.record("get_request", self.rid(request), addr_shape(client_address))
        return request, client_address

    def verify_request(self, request, client_address):
        self.record("verify_request", self.rid(request), addr_shape(client_address))
        return super().verify_request(request, client_address)

    def process_request(self, request, client_address):
        self.record("process_request", self.rid(request), addr_shape(client_address))
        return super().process_request(request, client_address)

    def finish_request(self, request, client_address):
        self.record("finish_request", self.rid(request), addr_shape(client_address))
        return super().finish_request(request, client_address)

    def shutdown_request(self, request):
        self.record("shutdown_request", self.rid(request))
        return super().shutdown_request(request)

    def close_request(self, request):
        self.record("close_request", self.rid(request))
        return super().close_request(request)

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        self.record("handle_error", self.rid(request), addr_shape(client_address),
                    type(exc).__name__ if exc is not None else None)
        # do not print the traceback: tests that want it use the default

    def handle_timeout(self):
        self.record("handle_timeout")
        return super().handle_timeout()

    def service_actions(self):
        self.record("service_actions")
        return super().service_actions()

    def server_close(self):
        self.record("server_close")
        return super().server_close()


class RecordingHandlerMixin:
    """Put before a handler class: setup/handle/finish append to server.calls."""

    def setup(self):
        self.server.record("setup", self.server.rid(self.request),
                           addr_shape(self.client_address))
        return super().setup()

    def handle(self):
        self.server.record("handle")
        return super().handle()

    def finish(self):
        self.server.record("finish")
        return super().finish()


def normalize_calls(calls):
    """Keep the deterministic part of a call list: collapse runs of
    ``service_actions`` into one and drop one that directly follows
    ``server_activate`` (it depends on whether a poll timed out before the
    first client connected)."""
    out = []
    for entry in calls:
        if entry[0] == "service_actions":
            if out and out[-1][0] in ("service_actions", "server_activate"):
                continue
        out.append(entry)
    return out


def names(calls):
    return [c[0] for c in calls]


# ---------------------------------------------------------------------------
# handler building blocks (mixins with the handler logic; combine with a
# module's StreamRequestHandler / DatagramRequestHandler / BaseRequestHandler)
# ---------------------------------------------------------------------------

class LineEchoLogic:
    def handle(self):
        for line in self.rfile:
            self.wfile.write(line)


class RecvEchoLogic:
    def handle(self):
        while True:
            data = self.request.recv(4096)
            if not data:
                break
            self.request.sendall(data)


class DatagramUpperLogic:
    def handle(self):
        data, sock = self.request
        sock.sendto(data.upper(), self.client_address)


class DatagramFileEchoLogic:
    def handle(self):
        for line in self.rfile:
            self.wfile.write(line.upper())


def handler_class(mod, base_name, *logic, attrs=None, record=False):
    bases = ((RecordingHandlerMixin,) if record else ()) + tuple(logic) + (
        getattr(mod, base_name),)
    return type("TestHandler", bases, dict(attrs or {}))


def default_handler(mod, kind: Kind, record=False):
    """Line echo for streams (StreamRequestHandler), upper-casing echo for
    datagrams (DatagramRequestHandler)."""
    if kind.stream:
        return handler_class(mod, "StreamRequestHandler", LineEchoLogic, record=record)
    return handler_class(mod, "DatagramRequestHandler", DatagramFileEchoLogic,
                         record=record)
