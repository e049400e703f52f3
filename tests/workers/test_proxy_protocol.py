"""PROXY protocol (HAProxy's v1 text and v2 binary headers) on the blocking path.

Handcrafted headers over loopback: the handler sees the header's source as
``client_address`` and exactly the bytes the client sent after the header, however the
stream is cut; LOCAL/UNKNOWN keep the connection's own address; a stranger, a malformed
header, a missing one or a slow one closes that connection only. The bytes after the
header are checked against what the stdlib's server receives for the same payload sent
without a header (the reference). The last tests put a real HAProxy in front.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import socket
import socketserver as stdlib_socketserver
import struct
import subprocess
import tempfile
import threading
import time

import pytest

from conftest import CLIENT_TIMEOUT, recv_until_eof, serving, wait_for

import fastsocketserver as fss

SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def v1(src="192.0.2.10", dst="198.51.100.1", sport=40001, dport=443, family=None):
    family = family or ("TCP6" if ":" in src else "TCP4")
    return f"PROXY {family} {src} {dst} {sport} {dport}\r\n".encode()


def v2(src="192.0.2.10", dst="198.51.100.1", sport=40001, dport=443, *, command=1, tlvs=b""):
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    fam = 0x11 if s.version == 4 else 0x21
    body = s.packed + d.packed + struct.pack("!HH", sport, dport) + tlvs
    return SIG + bytes([0x20 | command, fam]) + struct.pack("!H", len(body)) + body


def v2_local(body=b""):
    return SIG + bytes([0x20, 0x00]) + struct.pack("!H", len(body)) + body


def v2_unix(src: bytes, dst: bytes):
    body = src.ljust(108, b"\0") + dst.ljust(108, b"\0")
    return SIG + bytes([0x21, 0x31]) + struct.pack("!H", len(body)) + body


class Seen:
    """What the handlers of one server saw."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = []  # (client_address, peername, data)
        self.errors = []

    def add(self, item):
        with self.lock:
            self.requests.append(item)


def echo_handler(mod, seen, reader):
    """A handler that records ``client_address`` and the bytes it reads to EOF, and
    echoes them back: through ``rfile`` or through ``request.recv``."""

    if reader == "rfile":

        class Handler(mod.StreamRequestHandler):
            def handle(self):
                data = self.rfile.read()
                seen.add((self.client_address, self.request.getpeername(), data))
                self.wfile.write(data)

    else:

        class Handler(mod.BaseRequestHandler):
            def handle(self):
                chunks = []
                while chunk := self.request.recv(7):
                    chunks.append(chunk)
                data = b"".join(chunks)
                seen.add((self.client_address, self.request.getpeername(), data))
                self.request.sendall(data)

    return Handler


def make(mod, kind, handler, seen, **attrs):
    """A loopback server of ``kind``, its handle_error recorded, attributes set."""
    bases = {
        "tcp": (mod.TCPServer,),
        "threading": (mod.ThreadingTCPServer,),
        # An overridden hook: the compatible path, where the Python loop reads the header.
        "verify": (mod.ThreadingTCPServer,),
        "forking": (mod.ForkingTCPServer,),
    }[kind]
    ns = dict(attrs)

    def handle_error(self, request, client_address):
        seen.errors.append(client_address)

    ns["handle_error"] = handle_error
    if kind == "verify":

        def verify_request(self, request, client_address):
            seen.add(("verify", client_address))
            return True

        ns["verify_request"] = verify_request
    cls = type("Server", bases, ns)
    return cls(("127.0.0.1", 0), handler)


def exchange(address, pieces, *, source=None, pause=0.0):
    """Connect, send ``pieces`` one by one (with ``pause`` between them), half-close,
    and return what came back until EOF (b"" when the server closed at once)."""
    with socket.create_connection(address, timeout=CLIENT_TIMEOUT, source_address=source) as c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        local = c.getsockname()
        try:
            for p in pieces:
                c.sendall(p)
                if pause:
                    time.sleep(pause)
            c.shutdown(socket.SHUT_WR)
            return local, recv_until_eof(c)
        except TimeoutError:
            raise
        except OSError:  # reset, or not connected any more: the server closed it
            return local, b""


def stdlib_reference(payload_pieces, reader):
    """What the stdlib's server receives for the payload sent without a header."""
    seen = Seen()
    server = stdlib_socketserver.TCPServer(("127.0.0.1", 0), echo_handler(stdlib_socketserver, seen, reader))
    with serving(server):
        _, echoed = exchange(server.server_address, payload_pieces)
    assert wait_for(lambda: seen.requests)
    return seen.requests[0][2], echoed


def cuts(blob, points):
    out, last = [], 0
    for p in sorted(set(points)):
        if 0 < p < len(blob):
            out.append(blob[last:p])
            last = p
    out.append(blob[last:])
    return out


PAYLOAD = b"GET / HTTP/1.0\r\nHost: x\r\n\r\n" + bytes(range(256)) * 3


@pytest.mark.parametrize("kind", ["tcp", "threading", "verify"])
@pytest.mark.parametrize("reader", ["rfile", "recv"])
@pytest.mark.parametrize(
    "header",
    [
        pytest.param(v1(), id="v1-tcp4"),
        pytest.param(v1("2001:db8::5", "2001:db8::1", 5555, 80), id="v1-tcp6"),
        pytest.param(v2(), id="v2-inet"),
        pytest.param(v2(tlvs=b"\x01\x00\x02h2\x04\x00\x00"), id="v2-tlvs"),
        pytest.param(v2("2001:db8::5", "2001:db8::1", 5555, 80), id="v2-inet6"),
    ],
)
def test_header_gives_the_original_client(kind, reader, header):
    version = "v1" if header.startswith(b"PROXY") else "v2"
    seen = Seen()
    server = make(fss, kind, echo_handler(fss, seen, reader), seen, proxy_protocol=version)
    src = header.split(b" ")[2].decode() if version == "v1" else None
    expect_host = src or ("192.0.2.10" if b"\x11" == header[13:14] else "2001:db8::5")
    expect_port = 40001 if expect_host == "192.0.2.10" else 5555
    wire = header + PAYLOAD
    # The header and the payload cut in several ways: inside the header, at its end,
    # and with the payload's start in the same segment as the header's end.
    splits = [
        [wire],
        cuts(wire, [1, 5, len(header) - 1]),
        cuts(wire, [len(header)]),
        cuts(wire, [len(header) - 2, len(header) + 3, len(header) + 100]),
        cuts(wire, range(0, len(header) + 4)),
    ]
    ref_data, ref_echo = stdlib_reference([PAYLOAD], reader)
    with serving(server):
        for pieces in splits:
            local, echoed = exchange(server.server_address, pieces, pause=0.002)
            assert echoed == ref_echo == PAYLOAD
    handled = [r for r in seen.requests if r[0] != "verify"]
    assert len(handled) == len(splits)
    for client_address, peer, data in handled:
        assert client_address[:2] == (expect_host, expect_port)
        assert peer[0] == "127.0.0.1"  # the socket's own peer is the proxy
        assert data == ref_data
    if kind == "verify":
        verified = [r[1] for r in seen.requests if r[0] == "verify"]
        assert [a[:2] for a in verified] == [(expect_host, expect_port)] * len(splits)
    assert seen.errors == []


@pytest.mark.parametrize("kind", ["tcp", "threading", "verify"])
@pytest.mark.parametrize(
    "version,header",
    [("v2", v2_local()), ("v2", v2_local(b"\x11" * 12)), ("v1", b"PROXY UNKNOWN\r\n"), ("v1", b"PROXY UNKNOWN ::1 ::1 1 2\r\n")],
)
def test_local_and_unknown_keep_the_connection_address(kind, version, header):
    seen = Seen()
    server = make(fss, kind, echo_handler(fss, seen, "rfile"), seen, proxy_protocol=version)
    with serving(server):
        local, echoed = exchange(server.server_address, [header + b"hello"])
    assert echoed == b"hello"
    handled = [r for r in seen.requests if r[0] != "verify"]
    assert [r[0] for r in handled] == [local]


def test_unix_server_v2_unix_addresses(unix_dir):
    seen = Seen()
    path = os.path.join(unix_dir, "s")

    class Server(fss.UnixStreamServer):
        proxy_protocol = "v2"

    server = Server(path, echo_handler(fss, seen, "recv"))
    with serving(server):
        with socket.socket(socket.AF_UNIX) as c:
            c.settimeout(CLIENT_TIMEOUT)
            c.connect(path)
            c.sendall(v2_unix(b"/run/client.sock", b"/run/front.sock") + b"data")
            c.shutdown(socket.SHUT_WR)
            assert recv_until_eof(c) == b"data"
    assert seen.requests[0][0] == "/run/client.sock"


def refused(server, seen, pieces, caplog, *, source=None, pause=0.0):
    """Send ``pieces``: the connection is closed with no handler and no handle_error,
    a warning is logged, and the next good connection is served."""
    with caplog.at_level(logging.WARNING, logger="fastsocketserver"):
        _, echoed = exchange(server.server_address, pieces, source=source, pause=pause)
        assert echoed == b""
        assert wait_for(lambda: any("PROXY protocol" in r.getMessage() for r in caplog.records))
    assert seen.requests == [] or all(r[0] == "verify" for r in seen.requests)
    assert seen.errors == []


GOOD = {"v1": v1(), "v2": v2()}


@pytest.mark.parametrize("kind", ["tcp", "threading", "verify"])
@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(b"GET / HTTP/1.0\r\n\r\n", id="no-header"),
        pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n", id="bad-v1"),
        pytest.param(b"PROXY TCP4 " + b"1" * 120 + b"\r\n", id="long-v1"),
        pytest.param(SIG + b"\x21\x11\x00\x05abcde", id="short-v2-addresses"),
        pytest.param(SIG + b"\x21\x11\xff\xff", id="v2-too-long"),
        pytest.param(SIG + b"\x2f\x11\x00\x00", id="v2-bad-command"),
        pytest.param(b"PROX", id="eof-inside"),
        pytest.param(b"", id="eof-at-once"),
    ],
)
def test_malformed_or_missing_header_closes_that_connection(kind, version, bad, caplog):
    seen = Seen()
    server = make(fss, kind, echo_handler(fss, seen, "rfile"), seen, proxy_protocol=version)
    with serving(server):
        refused(server, seen, [bad], caplog)
        _, echoed = exchange(server.server_address, [GOOD[version] + b"after"])
        assert echoed == b"after"


@pytest.mark.parametrize("kind", ["tcp", "threading", "verify"])
def test_untrusted_peer_is_closed_unread(kind, caplog):
    seen = Seen()
    server = make(
        fss, kind, echo_handler(fss, seen, "rfile"), seen, proxy_protocol="v1", proxy_trusted=("127.0.0.1/32",)
    )
    with serving(server):
        # 127.0.0.2 is loopback too, but outside the trusted network.
        refused(server, seen, [v1() + b"x"], caplog, source=("127.0.0.2", 0))
        assert any("proxy_trusted" in r.getMessage() for r in caplog.records)
        _, echoed = exchange(server.server_address, [v1() + b"ok"], source=("127.0.0.1", 0))
        assert echoed == b"ok"


@pytest.mark.parametrize("kind", ["tcp", "threading", "verify"])
def test_slow_header_times_out(kind, caplog):
    seen = Seen()
    server = make(
        fss, kind, echo_handler(fss, seen, "rfile"), seen, proxy_protocol="v2", proxy_header_timeout=0.2
    )
    with serving(server), caplog.at_level(logging.WARNING, logger="fastsocketserver"):
        with socket.create_connection(server.server_address, timeout=CLIENT_TIMEOUT) as c:
            c.sendall(v2()[:10])
            # The server gives up on its own (the client never finishes): EOF or reset.
            try:
                assert c.recv(10) == b""
            except ConnectionResetError:
                pass
        assert wait_for(lambda: any("in time" in r.getMessage() for r in caplog.records))
        _, echoed = exchange(server.server_address, [v2() + b"next"])
        assert echoed == b"next"
    assert seen.errors == []


def test_slow_header_does_not_block_threading_server():
    """On a ThreadingMixIn server the header is read on the worker: a client that
    never finishes its header does not keep the next one from being served."""
    seen = Seen()
    server = make(
        fss, "threading", echo_handler(fss, seen, "rfile"), seen, proxy_protocol="v1", proxy_header_timeout=60
    )
    with serving(server):
        with socket.create_connection(server.server_address, timeout=CLIENT_TIMEOUT) as slow:
            slow.sendall(b"PROXY TCP4 1.2")
            _, echoed = exchange(server.server_address, [v1() + b"fast"])
            assert echoed == b"fast"
            slow.sendall(b".3.4 5.6.7.8 1 2\r\nslow")
            slow.shutdown(socket.SHUT_WR)
            assert recv_until_eof(slow) == b"slow"
    assert sorted(r[0][0] for r in seen.requests) == ["1.2.3.4", "192.0.2.10"]


def test_handle_request_reads_the_header():
    seen = Seen()
    server = make(fss, "tcp", echo_handler(fss, seen, "rfile"), seen, proxy_protocol="v2")
    try:
        server.timeout = CLIENT_TIMEOUT
        box = {}
        t = threading.Thread(target=lambda: box.update(r=exchange(server.server_address, [v2() + b"one"])))
        t.start()
        server.handle_request()
        t.join(CLIENT_TIMEOUT)
        assert box["r"][1] == b"one"
        assert seen.requests[0][0] == ("192.0.2.10", 40001)
    finally:
        server.server_close()


def test_forking_server_reads_the_header():
    seen = Seen()
    server = make(fss, "forking", fss.StreamRequestHandler, seen, proxy_protocol="v1")

    class Handler(fss.StreamRequestHandler):
        def handle(self):
            self.wfile.write(repr(self.client_address).encode() + b"|" + self.rfile.read())

    server.RequestHandlerClass = Handler
    with serving(server):
        _, echoed = exchange(server.server_address, [v1("203.0.113.9", "10.0.0.1", 777, 80) + b"tail"])
    assert echoed == b"('203.0.113.9', 777)|tail"


def test_where_the_engine_cannot_read_headers_is_a_type_error():
    class OwnGetRequest(fss.TCPServer):
        proxy_protocol = "v1"

        def get_request(self):
            return self.socket.accept()

    class Datagrams(fss.UDPServer):
        proxy_protocol = "v2"

    for cls, handler in ((OwnGetRequest, fss.StreamRequestHandler), (Datagrams, fss.DatagramRequestHandler)):
        with cls(("127.0.0.1", 0), handler) as server:
            server.timeout = 0.01
            with pytest.raises(TypeError, match="proxy_protocol"):
                server.handle_request()


@pytest.mark.parametrize(
    "attrs,exc",
    [
        ({"proxy_protocol": "v3"}, ValueError),
        ({"proxy_protocol": 2}, TypeError),
        ({"proxy_protocol": "v1", "proxy_trusted": ("not a network",)}, ValueError),
        ({"proxy_protocol": "v1", "proxy_header_timeout": -1}, ValueError),
        ({"proxy_protocol": "v1", "proxy_header_timeout": 0}, ValueError),
    ],
)
def test_bad_settings(attrs, exc):
    seen = Seen()
    server = make(fss, "tcp", echo_handler(fss, seen, "rfile"), seen, **attrs)
    try:
        server.timeout = 0.01
        with pytest.raises(exc):
            server.handle_request()
    finally:
        server.server_close()


def test_no_descriptor_leak_on_refusals(caplog):
    from conftest import settled_fd_count

    seen = Seen()
    server = make(fss, "threading", echo_handler(fss, seen, "rfile"), seen, proxy_protocol="v2")
    with serving(server), caplog.at_level(logging.ERROR, logger="fastsocketserver"):
        exchange(server.server_address, [b"warm-up"])
        before = settled_fd_count()
        for _ in range(50):
            exchange(server.server_address, [b"garbage"])
        assert wait_for(lambda: settled_fd_count() <= before)


# ---------------------------------------------------------------------------
# protocol (asyncio.Protocol) handlers, on the event loop
# ---------------------------------------------------------------------------


def protocol_handler(seen):
    import asyncio

    class Echo(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport, self.buf = transport, b""

        def data_received(self, data):
            self.buf += data

        def eof_received(self):
            peer = self.transport.get_extra_info("peername")
            real = self.transport.get_extra_info("socket").getpeername()
            seen.add((peer, real, self.buf))
            self.transport.write(self.buf)
            self.transport.close()

    return Echo


def make_evented(kind, seen, **attrs):
    base = {"tcp": fss.TCPServer, "threading": fss.ThreadingTCPServer}[kind]
    cls = type("Server", (base,), attrs)
    return cls(("127.0.0.1", 0), protocol_handler(seen))


@pytest.mark.parametrize("kind", ["tcp", "threading"])
@pytest.mark.parametrize(
    "header",
    [
        pytest.param(v1(), id="v1-tcp4"),
        pytest.param(v1("2001:db8::5", "2001:db8::1", 5555, 80), id="v1-tcp6"),
        pytest.param(v2(tlvs=b"\x01\x00\x02h2"), id="v2-inet"),
        pytest.param(v2("2001:db8::5", "2001:db8::1", 5555, 80), id="v2-inet6"),
    ],
)
def test_protocol_peername_is_the_original_client(kind, header):
    version = "v1" if header.startswith(b"PROXY") else "v2"
    seen = Seen()
    server = make_evented(kind, seen, proxy_protocol=version)
    expect = ("192.0.2.10", 40001) if b"192.0.2.10" in header or header[13:14] == b"\x11" else ("2001:db8::5", 5555)
    wire = header + PAYLOAD
    splits = [
        [wire],
        cuts(wire, [len(header)]),
        cuts(wire, [3, len(header) - 1, len(header) + 1]),
        cuts(wire, range(0, len(header) + 3)),
    ]
    with serving(server):
        for pieces in splits:
            _, echoed = exchange(server.server_address, pieces, pause=0.002)
            assert echoed == PAYLOAD
    assert len(seen.requests) == len(splits)
    for peer, real, data in seen.requests:
        assert peer[:2] == expect
        assert real[0] == "127.0.0.1"
        assert data == PAYLOAD


@pytest.mark.parametrize("header", [v2_local(), b"PROXY UNKNOWN\r\n"])
def test_protocol_local_keeps_the_connection_address(header):
    seen = Seen()
    server = make_evented("tcp", seen, proxy_protocol="v2" if header.startswith(SIG) else "v1")
    with serving(server):
        local, echoed = exchange(server.server_address, [header + b"x"])
    assert echoed == b"x"
    assert seen.requests[0][0] == local


@pytest.mark.parametrize(
    "bad,attrs,source",
    [
        pytest.param(b"GET / HTTP/1.0\r\n\r\n", {}, None, id="no-header"),
        pytest.param(SIG + b"\x21\x11\x00\x05abcde", {}, None, id="short-v2"),
        pytest.param(b"", {}, None, id="eof"),
        pytest.param(v2(), {"proxy_trusted": ("127.0.0.1/32",)}, ("127.0.0.2", 0), id="untrusted"),
    ],
)
def test_protocol_refused_connections(bad, attrs, source, caplog):
    seen = Seen()
    server = make_evented("tcp", seen, proxy_protocol="v2", **attrs)
    with serving(server), caplog.at_level(logging.WARNING, logger="fastsocketserver"):
        _, echoed = exchange(server.server_address, [bad], source=source)
        assert echoed == b""
        assert wait_for(lambda: any("PROXY protocol" in r.getMessage() for r in caplog.records))
        _, echoed = exchange(server.server_address, [v2() + b"next"])
        assert echoed == b"next"
    assert [r[2] for r in seen.requests] == [b"next"]


def test_protocol_slow_header_times_out_without_blocking_others(caplog):
    seen = Seen()
    server = make_evented("tcp", seen, proxy_protocol="v1", proxy_header_timeout=0.3)
    with serving(server), caplog.at_level(logging.WARNING, logger="fastsocketserver"):
        with socket.create_connection(server.server_address, timeout=CLIENT_TIMEOUT) as slow:
            slow.sendall(b"PROXY TCP4 ")
            # Another client is served while the slow one has not finished its header.
            _, echoed = exchange(server.server_address, [v1() + b"fast"])
            assert echoed == b"fast"
            try:
                assert slow.recv(10) == b""
            except ConnectionResetError:
                pass
        assert wait_for(lambda: any("in time" in r.getMessage() for r in caplog.records))
    assert [r[2] for r in seen.requests] == [b"fast"]


def test_protocol_close_with_headers_pending_closes_them():
    """Connections still sending their header belong to the loop: server_close()
    closes them (the client sees the end of the stream), and none leaks."""
    from conftest import settled_fd_count

    seen = Seen()
    before = settled_fd_count()
    server = make_evented("tcp", seen, proxy_protocol="v2", proxy_header_timeout=None)
    clients = []
    try:
        with serving(server):
            for _ in range(5):
                c = socket.create_connection(server.server_address, timeout=CLIENT_TIMEOUT)
                c.sendall(SIG[:6])
                clients.append(c)
            _, echoed = exchange(server.server_address, [v2() + b"served"])
            assert echoed == b"served"
        for c in clients:
            try:
                assert c.recv(10) == b""
            except ConnectionResetError:
                pass
    finally:
        for c in clients:
            c.close()
    assert wait_for(lambda: settled_fd_count() <= before)
    assert [r[2] for r in seen.requests] == [b"served"]


# ---------------------------------------------------------------------------
# a real HAProxy in front
# ---------------------------------------------------------------------------

HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (.ci/run installs it)")
@pytest.mark.parametrize("send", ["send-proxy", "send-proxy-v2"])
@pytest.mark.parametrize("kind", ["tcp", "threading", "protocol"])
def test_behind_haproxy(send, kind):
    version = "v1" if send == "send-proxy" else "v2"
    seen = Seen()
    if kind == "protocol":
        server = make_evented("tcp", seen, proxy_protocol=version)
    else:
        server = make(fss, kind, echo_handler(fss, seen, "rfile"), seen, proxy_protocol=version)
    front = free_port()
    with serving(server), tempfile.TemporaryDirectory() as tmp:
        cfg = os.path.join(tmp, "haproxy.cfg")
        with open(cfg, "w") as f:
            f.write(
                "global\n"
                "  maxconn 64\n"
                "defaults\n"
                "  mode tcp\n"
                "  timeout connect 5s\n"
                "  timeout client 10s\n"
                "  timeout server 10s\n"
                "frontend front\n"
                f"  bind 127.0.0.1:{front}\n"
                "  default_backend back\n"
                "backend back\n"
                f"  server app 127.0.0.1:{server.server_address[1]} {send}\n"
            )
        proc = subprocess.Popen(
            [HAPROXY, "-db", "-f", cfg], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp
        )
        try:

            def listening():
                # A whole exchange, so that no half-open probe resets a handler.
                try:
                    with socket.create_connection(("127.0.0.1", front), timeout=1):
                        pass
                except OSError:
                    return False
                return exchange(("127.0.0.1", front), [b"probe"])[1] == b"probe"

            assert wait_for(listening), proc.stdout.read1(4096) if proc.poll() is not None else "no listener"
            # The probes (the first connect may have reached haproxy alone).
            wait_for(lambda: any(r[2] == b"probe" for r in seen.requests))
            seen.errors.clear()
            clients = []
            for source in ("127.0.0.1", "127.0.0.3"):
                local, echoed = exchange(("127.0.0.1", front), [b"through ", b"haproxy"], source=(source, 0))
                assert echoed == b"through haproxy"
                clients.append(local)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            proc.stdout.close()
    got = [r[0][:2] for r in seen.requests if r[2] == b"through haproxy"]
    assert sorted(got) == sorted(clients)
    # The socket's own peer is HAProxy's side of its connection to us.
    assert all(r[1][0] == "127.0.0.1" for r in seen.requests)
    assert seen.errors == []


# ---------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------

CLI_HANDLER = """
import fastsocketserver as socketserver

class Who(socketserver.StreamRequestHandler):
    def handle(self):
        self.wfile.write(repr(self.client_address).encode() + b"|" + self.rfile.readline())
"""


def test_cli_options_become_server_attributes():
    from fastsocketserver import __main__ as cli

    args = cli._parser().parse_args(
        ["--proxy-protocol", "v2", "--proxy-trusted", "10.0.0.0/8", "--proxy-trusted", "::1",
         "--proxy-header-timeout", "2.5"]
    )
    cls = cli._server_class(args)
    assert (cls.proxy_protocol, cls.proxy_trusted, cls.proxy_header_timeout) == ("v2", ("10.0.0.0/8", "::1/128"), 2.5)
    plain = cli._server_class(cli._parser().parse_args([]))
    assert plain.proxy_protocol is None
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["--proxy-protocol", "v3"])
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["--proxy-protocol", "v1", "--proxy-trusted", "nowhere"])
    assert cli.main(["--udp", "--proxy-protocol", "v1", "--port", "0"]) == 2
    assert cli.main(["--proxy-trusted", "10.0.0.0/8", "--port", "0"]) == 2


@pytest.mark.parametrize("extra", [["--threading"], ["--workers", "2", "--threading"], []], ids=["threading", "workers", "inline"])
def test_cli_serves_the_original_client(unix_dir, extra):
    from test_lifecycle import _cli, _find_address, _stop_cli, child_process

    with open(os.path.join(unix_dir, "proxy_cli_mod.py"), "w") as f:
        f.write(CLI_HANDLER)
    env = {"PYTHONPATH": unix_dir + os.pathsep + os.environ.get("PYTHONPATH", "")}
    args = _cli(["--port", "0", *extra, "--proxy-protocol", "v1", "proxy_cli_mod:Who"])
    with child_process(args, cwd=unix_dir, env_extra=env) as (proc, out, err):
        host, port = _find_address(out, err).group(2).rsplit(":", 1)
        _, echoed = exchange((host, int(port)), [v1("203.0.113.5", "10.0.0.1", 6000, 80) + b"hi\n"])
        assert echoed == b"('203.0.113.5', 6000)|hi\n"
        _, echoed = exchange((host, int(port)), [b"hi\n"])
        assert echoed == b""
        _stop_cli(proc, err)
    assert "PROXY protocol" in err.text()
