"""The listening socket is the user's object: the engine takes the fast path only for a
plain ``socket.socket``, leaves its blocking flag as it found it, notices a replaced
socket by identity (not by descriptor number) and a forked child."""

from __future__ import annotations

import http.server
import os
import shutil
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time

import pytest

import fastsocketserver as fss

MODULES = [socketserver, fss]


class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"hello over " + (b"tls" if isinstance(self.request, ssl.SSLSocket) else b"plain")
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def cert(tmp_path_factory):  # type: ignore[no-untyped-def]
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the test certificate (.ci/run installs it)")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem"),
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )
    return d / "cert.pem", d / "key.pem"


def _server_context(cert) -> ssl.SSLContext:  # type: ignore[no-untyped-def]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*map(str, cert))
    return ctx


def _serving(server):  # type: ignore[no-untyped-def]
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    return t


def _stop(server, thread) -> None:  # type: ignore[no-untyped-def]
    stopper = threading.Thread(target=server.shutdown, daemon=True)
    stopper.start()
    stopper.join(10)
    thread.join(10)
    server.server_close()
    assert not thread.is_alive() and not stopper.is_alive(), "server did not stop"


def _curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-s", "--max-time", "5", *args], capture_output=True, timeout=30)


def _wrap_after_construction(mod, cls_name, cert):  # type: ignore[no-untyped-def]
    server = getattr(mod, cls_name)(("127.0.0.1", 0), Hello)
    server.socket = _server_context(cert).wrap_socket(server.socket, server_side=True)
    return server


def _wrap_in_server_activate(mod, cls_name, cert):  # type: ignore[no-untyped-def]
    base = getattr(mod, cls_name)

    class HTTPSServer(base):  # type: ignore[misc, valid-type]
        def server_activate(self) -> None:
            super().server_activate()
            self.socket = _server_context(cert).wrap_socket(self.socket, server_side=True)

    return HTTPSServer(("127.0.0.1", 0), Hello)


@pytest.mark.parametrize("recipe", [_wrap_after_construction, _wrap_in_server_activate])
@pytest.mark.parametrize("cls_name", ["TCPServer", "ThreadingTCPServer"])
@pytest.mark.parametrize("mod", MODULES, ids=lambda m: m.__name__)
def test_tls_recipes_serve_tls_and_never_plaintext(mod, cls_name, recipe, cert) -> None:  # type: ignore[no-untyped-def]
    server = recipe(mod, cls_name, cert)
    thread = _serving(server)
    try:
        url = f"127.0.0.1:{server.server_address[1]}/"
        got = _curl("--cacert", str(cert[0]), "https://" + url)
        assert got.returncode == 0 and got.stdout == b"hello over tls", got
        plain = _curl("http://" + url)
        assert plain.returncode != 0 and b"hello" not in plain.stdout, plain
        # Python's own client, checking the certificate and the host's address.
        client_ctx = ssl.create_default_context(cafile=str(cert[0]))
        with socket.create_connection(server.server_address, timeout=5) as raw:
            with client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                assert tls.version() in ("TLSv1.2", "TLSv1.3")
                tls.sendall(b"GET / HTTP/1.0\r\n\r\n")
                reply = b""
                while chunk := tls.recv(4096):
                    reply += chunk
        assert reply.startswith(b"HTTP/1.0 200") and reply.endswith(b"hello over tls")
    finally:
        _stop(server, thread)


def test_protocol_handler_refuses_a_tls_listener(cert) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    class Echo(asyncio.Protocol):
        def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            self.transport.write(data)

    server = fss.TCPServer(("127.0.0.1", 0), Echo)
    try:
        server.socket = _server_context(cert).wrap_socket(server.socket, server_side=True)
        with pytest.raises(TypeError, match="SSLSocket"):
            server.handle_request()
        with pytest.raises(TypeError, match="plaintext"):
            server.serve_forever()
    finally:
        server.server_close()


@pytest.mark.parametrize("mod", MODULES, ids=lambda m: m.__name__)
def test_socket_subclass_accept_is_called(mod) -> None:  # type: ignore[no-untyped-def]
    accepted = []

    class Counting(socket.socket):
        def accept(self):  # type: ignore[no-untyped-def]
            conn, addr = super().accept()
            accepted.append(addr)
            return conn, addr

    class Reply(mod.BaseRequestHandler):
        def handle(self) -> None:
            self.request.sendall(b"ok")

    server = mod.TCPServer(("127.0.0.1", 0), Reply)
    sock = server.socket
    server.socket = Counting(sock.family, sock.type, fileno=sock.detach())
    try:
        with socket.create_connection(server.server_address, timeout=5) as c:
            server.timeout = 5
            server.handle_request()
            assert c.recv(10) == b"ok"
        assert len(accepted) == 1
    finally:
        server.server_close()


@pytest.mark.parametrize("mod", MODULES, ids=lambda m: m.__name__)
def test_listener_blocking_flag_is_left_as_found(mod) -> None:  # type: ignore[no-untyped-def]
    class Reply(mod.BaseRequestHandler):
        def handle(self) -> None:
            self.request.sendall(b"ok")

    server = mod.TCPServer(("127.0.0.1", 0), Reply)
    try:
        thread = _serving(server)
        with socket.create_connection(server.server_address, timeout=5) as c:
            assert c.recv(10) == b"ok"
        stopper = threading.Thread(target=server.shutdown)
        stopper.start()
        stopper.join(10)
        thread.join(10)
        assert os.get_blocking(server.socket.fileno())
        assert server.socket.getblocking()
        server.timeout = 0.01
        server.handle_request()  # times out
        assert os.get_blocking(server.socket.fileno())
        # A plain blocking accept works after the engine is done with the socket...
        with socket.create_connection(server.server_address, timeout=5):
            conn, _ = server.socket.accept()
            conn.close()
        # ...and so does one in a process the descriptor is handed to.
        code = (
            "import socket, sys; s = socket.socket(fileno=int(sys.argv[1])); "
            "s.settimeout(None); import signal; signal.alarm(10); c, _ = s.accept(); print('accepted')"
        )
        fd = server.socket.fileno()
        child = subprocess.Popen([sys.executable, "-c", code, str(fd)], pass_fds=[fd], stdout=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 10
            with socket.create_connection(server.server_address, timeout=5):
                out, _ = child.communicate(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            child.kill()
            child.wait()
        assert out.strip() == b"accepted"
    finally:
        server.server_close()


@pytest.mark.parametrize("mod", MODULES, ids=lambda m: m.__name__)
def test_replaced_listener_with_the_same_number_is_a_new_socket(mod) -> None:  # type: ignore[no-untyped-def]
    server = mod.TCPServer(("127.0.0.1", 0), mod.BaseRequestHandler)
    try:
        server.timeout = 0.01
        server.handle_request()  # the engine now knows the first socket
        old = server.socket
        number = old.fileno()
        old.close()
        new = socket.socket()
        new.bind(("127.0.0.1", 0))
        new.listen()
        assert new.fileno() == number  # the kernel gave the number out again
        server.socket = new
        server.timeout = 0.2
        started = time.monotonic()
        server.handle_request()
        assert time.monotonic() - started < 5, "handle_request ignored its timeout"
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": None}, daemon=True)
        thread.start()
        time.sleep(0.05)
        stopper = threading.Thread(target=server.shutdown, daemon=True)
        stopper.start()
        stopper.join(5)
        thread.join(5)
        if mod is fss:
            # The stdlib's loop, with no poll interval, only notices shutdown() at the next request.
            assert not thread.is_alive(), "shutdown() could not stop the loop"
        else:
            with socket.create_connection(new.getsockname(), timeout=5):
                pass
            thread.join(5)
            stopper.join(5)
    finally:
        server.server_close()


@pytest.mark.parametrize("mod", MODULES, ids=lambda m: m.__name__)
def test_forked_child_serves_on_the_inherited_server(mod) -> None:  # type: ignore[no-untyped-def]
    class Forking(mod.StreamRequestHandler):
        def handle(self) -> None:
            if self.rfile.readline() != b"fork\n":
                self.wfile.write(b"child %d\n" % os.getpid())
                return
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    self.server.timeout = 10
                    self.server.handle_request()
                    code = 0
                finally:
                    os._exit(code)
            self.server.child = pid
            self.wfile.write(b"forked\n")

    server = mod.TCPServer(("127.0.0.1", 0), Forking)
    try:
        server.timeout = 5
        with socket.create_connection(server.server_address, timeout=5) as c:
            c.sendall(b"fork\n")
            server.handle_request()
            assert c.recv(100) == b"forked\n"
        with socket.create_connection(server.server_address, timeout=5) as c:
            c.sendall(b"hi\n")
            reply = c.recv(100)
        pid = server.child
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.02)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the child hung in handle_request()")
        assert os.waitstatus_to_exitcode(status) == 0
        assert reply == b"child %d\n" % pid
    finally:
        server.server_close()


def test_server_close_during_a_wait_restores_the_flag_through_the_owner() -> None:
    """``server_close()`` while another thread waits in ``serve_forever()``: the blocking
    flag of the listener's open file description (still used by a process it was handed
    to, here a duplicate) is put back, and a new file that got the closed listener's
    number is left alone."""
    for _ in range(20):
        server = fss.TCPServer(("127.0.0.1", 0), fss.BaseRequestHandler)
        handed = os.dup(server.socket.fileno())
        try:
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": None}, daemon=True)
            thread.start()
            deadline = time.monotonic() + 5
            while os.get_blocking(handed) and time.monotonic() < deadline:
                time.sleep(0.001)  # until the wait has begun (the engine made it non-blocking)
            assert not os.get_blocking(handed)
            number = server.socket.fileno()
            server.server_close()
            newcomer = socket.socket()
            try:
                newcomer.setblocking(False)
                thread.join(5)
                assert not thread.is_alive()
                assert os.get_blocking(handed), "the handed-off listener was left non-blocking"
                if newcomer.fileno() == number:
                    assert not os.get_blocking(newcomer.fileno()), "a stranger's flag was changed"
            finally:
                newcomer.close()
        finally:
            os.close(handed)
