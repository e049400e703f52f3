"""The listening socket is the user's: TLS recipes and the socket's state after serving.

Part one drives the recipes users copy to serve HTTPS with ``http.server``'s handler, each
on the stdlib and on fastsocketserver:

* ``wrap``: ``httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)`` after
  construction (the common recipe);
* ``activate``: a ``server_activate()`` override that calls the base class, then wraps
  ``self.socket`` (the shape of CPython 3.14's ``HTTPSServer``);
* ``get_request``: a ``get_request()`` override that wraps each accepted socket;
* ``accept``: a ``socket.socket`` subclass whose own ``accept()`` wraps the connection,
  put in as ``server.socket``.

For each, ``curl`` with the test's CA gets the page over https, ``curl`` over plain http
gets no HTTP answer at all, and Python's ``ssl`` client (hostname checked against the
certificate's IP subjectAltName) gets the page over TLS 1.2 or 1.3. A protocol handler on
such a listener must be refused with a ``TypeError`` and serve nothing in the clear.

Part two checks that serving leaves the listening socket as it was found: blocking
(descriptor flag included), usable with a plain blocking ``accept()`` in this process and
in a process that is handed the descriptor.

The certificate is made at test time with the ``openssl`` command (a missing ``openssl``
or ``curl`` fails these tests: CI installs both).
"""

from __future__ import annotations

import asyncio
import http.server
import os
import shutil
import socket
import ssl
import subprocess
import sys
import textwrap
import threading

import pytest

from conftest import (
    CLIENT_TIMEOUT,
    JOIN_TIMEOUT,
    STDLIB,
    call_with_timeout,
    recv_until_eof,
    serving,
)

BODY = b"hello over the listener\n"
RECIPES = ["wrap", "activate", "get_request", "accept"]
#: server base classes by name, from the module under test (HTTP ones from http.server
#: for the stdlib and fastsocketserver.http for ours)
BASES = ["TCPServer", "ThreadingTCPServer", "HTTPServer", "ThreadingHTTPServer"]
CURL_TIMEOUT = 10


# ---------------------------------------------------------------------------
# certificate, handler, servers
# ---------------------------------------------------------------------------

def _require_tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"the {name!r} command is needed by these tests (apt-get install {name})"
    return path


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    """(cert.pem, key.pem): a self-signed certificate for 127.0.0.1 (IP subjectAltName)."""
    openssl = _require_tool("openssl")
    directory = tmp_path_factory.mktemp("cert")
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-keyout", str(key_path), "-out", str(cert_path), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )
    return str(cert_path), str(key_path)


@pytest.fixture
def server_ctx(cert):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*cert)
    return ctx


def client_ctx(cert) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cert[0])
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    return ctx


class PageHandler(http.server.BaseHTTPRequestHandler):
    """Answers every GET with BODY; silent (AF_UNIX client addresses cannot be logged)."""

    protocol_version = "HTTP/1.0"

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, format, *args):
        pass


def base_class(mod, name: str):
    if name.endswith("HTTPServer"):
        if mod is STDLIB:
            return getattr(http.server, name)
        import fastsocketserver.http

        return getattr(fastsocketserver.http, name)
    return getattr(mod, name)


def tls_listener_class(base_socket_class=socket.socket):
    """A socket class whose accept() returns TLS connections (recipe ``accept``)."""

    class TLSListener(base_socket_class):
        accepts = 0

        def __init__(self, ctx, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.ctx = ctx

        def accept(self):
            conn, address = super().accept()
            type(self).accepts += 1
            try:
                return self.ctx.wrap_socket(conn, server_side=True), address
            except BaseException:
                conn.close()
                raise

    return TLSListener


def make_tls_server(mod, base_name: str, recipe: str, ctx, address=("127.0.0.1", 0),
                    handler=PageHandler):
    """A server of ``base_name`` from ``mod`` serving TLS by ``recipe``."""
    base = base_class(mod, base_name)
    attrs = {"allow_reuse_address": True}
    if base_name.startswith("Threading"):
        attrs["daemon_threads"] = True
    if recipe == "activate":
        def server_activate(self):
            base.server_activate(self)
            self.socket = ctx.wrap_socket(self.socket, server_side=True)

        attrs["server_activate"] = server_activate
    elif recipe == "get_request":
        def get_request(self):
            conn, client = self.socket.accept()
            try:
                return ctx.wrap_socket(conn, server_side=True), client
            except BaseException:
                conn.close()
                raise

        attrs["get_request"] = get_request
    cls = type("TLS" + base.__name__, (base,), attrs)
    server = cls(address, handler)
    try:
        if recipe == "wrap":
            server.socket = ctx.wrap_socket(server.socket, server_side=True)
        elif recipe == "accept":
            listener_cls = tls_listener_class()
            server.socket = listener_cls(ctx, fileno=server.socket.detach())
    except BaseException:
        server.server_close()
        raise
    return server


# ---------------------------------------------------------------------------
# clients
# ---------------------------------------------------------------------------

def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([_require_tool("curl"), "-sS", "-i", "--max-time", str(CURL_TIMEOUT),
                           *args], capture_output=True, timeout=CURL_TIMEOUT + 10)


def assert_page(raw: bytes) -> None:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), raw[:300]
    assert body == BODY


def assert_no_http_answer(done: subprocess.CompletedProcess) -> None:
    assert done.returncode != 0, f"plain http was answered: {done.stdout[:300]!r}"
    assert b"HTTP/" not in done.stdout, done.stdout[:300]
    assert BODY not in done.stdout


def ssl_get(cert, connect) -> tuple[bytes, str]:
    """GET / over TLS on the stream socket ``connect()`` returns; (reply, TLS version)."""
    raw = connect()
    raw.settimeout(CLIENT_TIMEOUT)
    with client_ctx(cert).wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        version = tls.version()
        tls.sendall(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        reply = recv_until_eof(tls)
        return reply, version


def plain_get(connect) -> bytes:
    """GET / in the clear; returns whatever comes back before the server closes (a TLS
    server sends at most an alert, never an HTTP answer)."""
    with connect() as s:
        s.settimeout(CLIENT_TIMEOUT)
        try:
            s.sendall(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            return recv_until_eof(s)
        except ConnectionError:
            return b""


def tcp_connector(server):
    return lambda: socket.create_connection(server.server_address[:2], timeout=CLIENT_TIMEOUT)


# ---------------------------------------------------------------------------
# TLS recipes
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("base_name", BASES)
@pytest.mark.parametrize("recipe", RECIPES)
def test_tls_recipe_over_tcp(mod, recipe, base_name, cert, server_ctx):
    """curl over https gets the page, plain http gets no HTTP answer, and Python's ssl
    client gets the page over TLS 1.2/1.3, after (and before) the plaintext attempt."""
    server = make_tls_server(mod, base_name, recipe, server_ctx)
    port = server.server_address[1]
    with serving(server):
        done = curl("--cacert", cert[0], f"https://127.0.0.1:{port}/")
        assert done.returncode == 0, done.stderr
        assert_page(done.stdout)

        assert_no_http_answer(curl(f"http://127.0.0.1:{port}/"))
        assert b"HTTP/" not in plain_get(tcp_connector(server))

        reply, version = ssl_get(cert, tcp_connector(server))
        assert_page(reply)
        assert version in ("TLSv1.2", "TLSv1.3")
    if recipe == "accept":
        assert type(server.socket).accepts >= 3


@pytest.mark.parametrize("recipe", RECIPES)
def test_tls_recipe_over_unix_stream(mod, recipe, cert, server_ctx, unix_path):
    """The same recipes on a UnixStreamServer, with Python's ssl client over AF_UNIX."""
    path = unix_path("tls")
    server = make_tls_server(mod, "UnixStreamServer", recipe, server_ctx, address=path)

    def connect():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(CLIENT_TIMEOUT)
        s.connect(path)
        return s

    with serving(server):
        assert b"HTTP/" not in plain_get(connect)
        reply, version = ssl_get(cert, connect)
        assert_page(reply)
        assert version in ("TLSv1.2", "TLSv1.3")


@pytest.mark.parametrize("recipe", RECIPES)
def test_tls_recipe_handle_request(mod, recipe, cert, server_ctx):
    """handle_request() on a TLS listener serves one TLS request (plain TCPServer)."""
    server = make_tls_server(mod, "TCPServer", recipe, server_ctx)
    server.timeout = JOIN_TIMEOUT
    try:
        box = {}

        def client():
            try:
                box["reply"] = ssl_get(cert, tcp_connector(server))
            except BaseException as exc:  # reported by the assertion below
                box["client_exc"] = exc

        t = threading.Thread(target=client, daemon=True)
        t.start()
        ok, _, exc = call_with_timeout(server.handle_request)
        t.join(JOIN_TIMEOUT)
        assert ok and exc is None, exc
        assert not t.is_alive()
        assert "client_exc" not in box, f"the TLS client failed: {box.get('client_exc')!r}"
        reply, version = box["reply"]
        assert_page(reply)
        assert version in ("TLSv1.2", "TLSv1.3")
    finally:
        server.server_close()


class EchoProtocol(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)


@pytest.mark.parametrize("entry", ["serve_forever", "handle_request"])
@pytest.mark.parametrize("recipe", ["wrap", "activate", "accept"])
def test_protocol_handler_on_tls_listener_is_refused(fast_mod, recipe, entry, server_ctx):
    """A protocol handler cannot run on a TLS (or otherwise user-made) listener: the
    engine raises TypeError (at construction or when asked to serve) and nothing is
    echoed in the clear."""
    try:
        server = make_tls_server(fast_mod, "TCPServer", recipe, server_ctx, handler=EchoProtocol)
    except TypeError as exc:
        assert any(w in str(exc).lower() for w in ("tls", "ssl", "socket")), exc
        return
    server.timeout = 2.0
    client = socket.create_connection(server.server_address[:2], timeout=CLIENT_TIMEOUT)
    try:
        client.sendall(b"in the clear\n")
        if entry == "serve_forever":
            ok, _, exc = call_with_timeout(lambda: server.serve_forever(0.05), timeout=5)
            if not ok:
                call_with_timeout(server.shutdown)
        else:
            ok, _, exc = call_with_timeout(server.handle_request, timeout=5)
        assert ok, f"{entry}() kept serving a protocol handler on a TLS listener"
        assert isinstance(exc, TypeError), f"{entry}() raised {exc!r}, not TypeError"
        assert any(w in str(exc).lower() for w in ("tls", "ssl", "socket")), exc
        client.settimeout(0.5)
        try:
            echoed = client.recv(100)
        except (TimeoutError, ConnectionError):
            echoed = b""
        assert b"in the clear" not in echoed
    finally:
        client.close()
        server.server_close()


# ---------------------------------------------------------------------------
# the listening socket is left as it was found
# ---------------------------------------------------------------------------

def line_echo_handler(mod):
    """A StreamRequestHandler class for ``mod`` that echoes one line."""

    class Echo(mod.StreamRequestHandler):
        def handle(self):
            self.wfile.write(self.rfile.readline())

    return Echo


LISTENER_BASES = ["TCPServer", "ThreadingTCPServer", "UnixStreamServer"]


def make_plain_server(mod, base_name, unix_path):
    base = getattr(mod, base_name)
    address = unix_path("plain") if base_name.startswith("Unix") else ("127.0.0.1", 0)
    cls = type("Plain" + base_name, (base,), {"daemon_threads": True})
    return cls(address, line_echo_handler(mod))


def connector(server):
    if server.address_family == socket.AF_UNIX:
        def connect():
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(CLIENT_TIMEOUT)
            s.connect(server.server_address)
            return s

        return connect
    return tcp_connector(server)


def echo_once(connect) -> bytes:
    with connect() as s:
        s.sendall(b"ping\n")
        return recv_until_eof(s)


def assert_listener_as_found(server) -> None:
    """server.socket is blocking at both levels and a plain blocking accept() waits for
    a client and then returns it (instead of raising BlockingIOError at once)."""
    sock = server.socket
    assert sock.getblocking() is True
    assert sock.gettimeout() is None
    assert os.get_blocking(sock.fileno()) is True, "O_NONBLOCK left set on the listener"
    box = {}

    def accept():
        try:
            box["conn"] = sock.accept()[0]
        except BaseException as exc:
            box["exc"] = exc

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    # A blocking accept() with no client waiting must still be waiting a moment later.
    t.join(0.3)
    assert "exc" not in box, f"blocking accept() raised {box['exc']!r}"
    with connector(server)() as client:
        t.join(JOIN_TIMEOUT)
        assert not t.is_alive(), "accept() did not return for a waiting client"
        assert "exc" not in box, f"blocking accept() raised {box['exc']!r}"
        conn = box["conn"]
        try:
            conn.sendall(b"accepted by hand\n")
            client.settimeout(CLIENT_TIMEOUT)
            assert client.recv(100) == b"accepted by hand\n"
        finally:
            conn.close()


@pytest.mark.parametrize("base_name", LISTENER_BASES)
def test_listener_blocking_after_serve_forever(mod, base_name, unix_path):
    server = make_plain_server(mod, base_name, unix_path)
    try:
        with serving(server, close=False):
            assert echo_once(connector(server)) == b"ping\n"
        assert_listener_as_found(server)
    finally:
        server.server_close()


@pytest.mark.parametrize("base_name", LISTENER_BASES)
def test_listener_blocking_after_handle_request(mod, base_name, unix_path):
    server = make_plain_server(mod, base_name, unix_path)
    server.timeout = JOIN_TIMEOUT
    try:
        box = {}
        t = threading.Thread(target=lambda: box.setdefault("reply", echo_once(connector(server))),
                             daemon=True)
        t.start()
        ok, _, exc = call_with_timeout(server.handle_request)
        t.join(JOIN_TIMEOUT)
        assert ok and exc is None, exc
        assert box.get("reply") == b"ping\n"
        assert_listener_as_found(server)
    finally:
        server.server_close()


def test_listener_blocking_after_handle_request_timeout(mod):
    """handle_request() that times out with no client leaves the listener blocking."""
    server = mod.TCPServer(("127.0.0.1", 0), line_echo_handler(mod))
    server.timeout = 0.05
    try:
        ok, _, exc = call_with_timeout(server.handle_request)
        assert ok and exc is None, exc
        assert_listener_as_found(server)
    finally:
        server.server_close()


#: Runs in the successor process: accepts one client on the inherited listener (fd in
#: argv[1]) with a plain blocking accept(), answers it, exits 0. SIGALRM ends it if the
#: accept never returns.
SUCCESSOR = textwrap.dedent(r"""
    import os, signal, socket, sys
    signal.alarm(20)
    fd = int(sys.argv[1])
    listener = socket.socket(fileno=fd)
    print("nonblocking" if not os.get_blocking(fd) else "blocking", flush=True)
    conn, _ = listener.accept()
    conn.sendall(b"from the successor\n")
    conn.close()
""")


@pytest.mark.parametrize("base_name", ["TCPServer", "ThreadingTCPServer"])
def test_listener_handed_to_another_process(mod, base_name, unix_path):
    """After serve_forever() stops, a process given the listening descriptor accepts on
    it with a plain blocking accept(), as a zero-downtime successor would."""
    server = make_plain_server(mod, base_name, unix_path)
    try:
        with serving(server, close=False):
            assert echo_once(connector(server)) == b"ping\n"
        fd = server.socket.fileno()
        child = subprocess.Popen([sys.executable, "-c", SUCCESSOR, str(fd)], pass_fds=(fd,),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            first = child.stdout.readline()
            with connector(server)() as client:
                # The successor answers and exits (or fails) before the reply is read,
                # so a failed accept() does not leave this client waiting.
                _, err = child.communicate(timeout=30)
                assert child.returncode == 0, (first, err.decode(errors="replace"))
                reply = recv_until_eof(client)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(10)
        assert first == b"blocking\n"
        assert reply == b"from the successor\n"
    finally:
        server.server_close()
