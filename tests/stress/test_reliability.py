"""Reliability under faults, floods and bad input (issue 5).

Every case of the issue is a test here, bounded in time and count, loopback only
(port 0 or a Unix path in a fresh temp dir), servers always closed in ``finally``
(``conftest.serving`` does it for threaded serving).  Most tests are parametrized
over the stdlib ``socketserver`` and ``fastsocketserver`` (fixture ``mod``): the
stdlib run pins the expected client-visible behaviour, the fast run must match it.
Tests that only make sense for the engine (descriptor exhaustion without spinning,
Rust panics) run against ``fastsocketserver`` only.

Cases:

* faults and hostile clients: reset (RST) before accept, mid-request and
  mid-response; half-closed connections both ways; a client that sends nothing
  (handler ``timeout``); a slow client (per-operation timeout semantics, then
  ``TimeoutError`` in ``handle_error`` while other clients are served); a client
  that never reads (only its handler blocks); garbage/binary bytes; lines far
  longer than ``rbufsize``;
* datagrams: larger than ``max_packet_size`` (truncated like the stdlib), empty,
  a flood of 20,000;
* handler exceptions of many kinds in ``setup``/``handle``/``finish``,
  ``handle_error`` raising, BaseExceptions; exceptions raised by a Python signal
  handler during a blocked read and a blocked write (main thread,
  ``handle_request``); a handler that closes or detaches its own connection;
* descriptor exhaustion (EMFILE) in a subprocess: no spinning, serves again;
* ``shutdown()``/``server_close()`` with ~200 requests in flight, from another
  thread and from a signal handler; SIGINT and SIGTERM during load in a
  subprocess;
* a Rust panic (``_core._panic``) becomes ``PanicException`` and reaches
  ``handle_error``; the server keeps serving.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import selectors
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from conftest import (
    CLIENT_TIMEOUT, JOIN_TIMEOUT, STDLIB, call_with_timeout,
    recv_exactly, recv_line, recv_until_eof, serving, settled_fd_count,
    stream_exchange, wait_for,
)

LOOPBACK = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

class Rec:
    """Server mix-in: records ``handle_error`` calls (exception type names,
    never the exception itself, which would keep the request's descriptor alive
    through its traceback) and free-form notes from handlers."""

    def __init__(self, *args, **kwargs):
        self.errors = []
        self.contexts = []
        self.log = []
        self.lock = threading.Lock()
        self.error_event = threading.Event()
        super().__init__(*args, **kwargs)

    def note(self, *entry):
        with self.lock:
            self.log.append(entry)

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        with self.lock:
            self.errors.append(type(exc).__name__ if exc is not None else None)
            ctx = getattr(exc, "__context__", None)
            self.contexts.append(type(ctx).__name__ if ctx is not None else None)
        del exc
        self.error_event.set()


def build(m, base, handler, paths=None, **attrs):
    """An instance of ``Rec`` + ``m.<base>`` bound to port 0 / a temp Unix path."""
    if "Unix" not in base:
        # the machine is shared with load generators that can leave tens of
        # thousands of TIME_WAIT sockets; bind(port 0) must not fail on them
        attrs.setdefault("allow_reuse_address", True)
    cls = type("Rel" + base, (Rec, getattr(m, base)), attrs)
    if "Unix" in base:
        assert paths is not None
        address = paths("srv")
    else:
        address = (LOOPBACK, 0)
    return cls(address, handler)


def connect(server, timeout=CLIENT_TIMEOUT, rcvbuf=None):
    s = socket.socket(server.socket.family, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        if rcvbuf is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.connect(server.server_address)
    except BaseException:
        s.close()
        raise
    return s


def rst_close(sock):
    """Close with SO_LINGER 0: the kernel sends RST instead of FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def line_request(server, line, timeout=CLIENT_TIMEOUT):
    """One connection: send ``line``, return the reply line."""
    with connect(server, timeout) as c:
        c.sendall(line)
        return recv_line(c)


def dgram_client(server, paths=None, timeout=CLIENT_TIMEOUT):
    s = socket.socket(server.socket.family, socket.SOCK_DGRAM)
    try:
        s.settimeout(timeout)
        if server.socket.family == socket.AF_UNIX:
            s.bind(paths("cli"))
    except BaseException:
        s.close()
        raise
    return s


def assert_fds_back(before, slack=0):
    """The process's descriptor count returns to ``before`` (bounded wait)."""
    ok = wait_for(lambda: settled_fd_count() <= before + slack, timeout=5.0,
                  interval=0.05)
    assert ok, f"descriptor leak: {before} before, {settled_fd_count()} after"


def proc_cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


STREAM_BASES = ["TCPServer", "ThreadingTCPServer"]


# ---------------------------------------------------------------------------
# client resets
# ---------------------------------------------------------------------------

def reset_before_accept_scenario(m):
    """Connect, send part of a line, RST, and only then ``handle_request()``."""
    got = []

    class H(m.StreamRequestHandler):
        def handle(self):
            try:
                got.append(("line", self.rfile.readline()))
            except OSError as exc:
                got.append(("raised", type(exc).__name__))
                raise

    srv = build(m, "TCPServer", H)
    try:
        srv.timeout = 5.0
        c = connect(srv)
        c.sendall(b"partial line")
        time.sleep(0.05)
        rst_close(c)
        time.sleep(0.05)
        srv.handle_request()
        # the server still serves the next client
        with connect(srv) as c2:
            c2.sendall(b"next\n")
            srv.handle_request()
        return got, list(srv.errors)
    finally:
        srv.server_close()


def test_reset_before_accept(mod):
    before = settled_fd_count()
    got = reset_before_accept_scenario(mod)
    ref = got if mod is STDLIB else reset_before_accept_scenario(STDLIB)
    assert got == ref
    assert got[0][-1] == ("line", b"next\n")
    assert_fds_back(before)


@pytest.mark.parametrize("base", STREAM_BASES)
def test_reset_mid_request(mod, base):
    """The handler is blocked in readline() with part of a line buffered when
    the client resets: ConnectionResetError reaches handle_error, the next
    client is served, nothing leaks."""
    before = settled_fd_count()
    entered = threading.Event()

    class H(mod.StreamRequestHandler):
        def handle(self):
            head = self.rfile.read(4)
            if head == b"PART":
                entered.set()
                self.server.note("line", self.rfile.readline())
                return
            self.wfile.write(head + self.rfile.readline())

    srv = build(mod, base, H)
    with serving(srv):
        c = connect(srv)
        c.sendall(b"PART of a line that never ends")
        assert entered.wait(JOIN_TIMEOUT)
        time.sleep(0.2)  # let the handler block in recv
        rst_close(c)
        assert srv.error_event.wait(JOIN_TIMEOUT), f"no handle_error; log={srv.log}"
        assert srv.errors == ["ConnectionResetError"]
        assert srv.log == []
        for i in range(3):
            assert line_request(srv, b"ECHO %d\n" % i) == b"ECHO %d\n" % i
    assert_fds_back(before)


@pytest.mark.parametrize("writer", ["wfile", "sendall"])
@pytest.mark.parametrize("base", STREAM_BASES)
def test_reset_mid_response(mod, base, writer):
    """The client reads 64 KiB of a 64 MiB response, then resets: the
    handler's write fails with ECONNRESET/EPIPE into handle_error, the process
    gets no SIGPIPE, the next client is served."""
    before = settled_fd_count()
    chunk = b"x" * 65536

    class H(mod.StreamRequestHandler):
        def handle(self):
            line = self.rfile.readline()
            if line == b"BIG\n":
                for _ in range(1024):
                    if writer == "wfile":
                        self.wfile.write(chunk)
                    else:
                        self.request.sendall(chunk)
                self.server.note("big finished")
                return
            self.wfile.write(line)

    srv = build(mod, base, H)
    with serving(srv):
        c = connect(srv)
        c.sendall(b"BIG\n")
        assert len(recv_exactly(c, 65536)) == 65536
        rst_close(c)
        assert srv.error_event.wait(JOIN_TIMEOUT), f"no handle_error; log={srv.log}"
        assert srv.errors[0] in ("ConnectionResetError", "BrokenPipeError"), srv.errors
        assert len(srv.errors) == 1
        assert srv.log == []
        assert line_request(srv, b"after\n") == b"after\n"
    assert_fds_back(before)


# ---------------------------------------------------------------------------
# half-closed connections
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("base", ["TCPServer", "ThreadingTCPServer",
                                  "UnixStreamServer"])
def test_client_half_close_then_reply(mod, base, unix_path):
    """The client sends, shuts down its write side and only then reads: the
    handler reads to EOF and its reply (written after EOF) arrives in full."""
    class H(mod.StreamRequestHandler):
        def handle(self):
            data = self.rfile.read()
            self.wfile.write(b"%d\n" % len(data))
            self.wfile.write(data[::-1])

    srv = build(mod, base, H, unix_path)
    payload = [b"line %d\n" % i for i in range(200)]
    joined = b"".join(payload)
    with serving(srv):
        reply = stream_exchange(connect(srv), payload, half_close=True)
        assert reply == b"%d\n" % len(joined) + joined[::-1]
        # a client that half-closes at once, having sent nothing
        c = connect(srv)
        c.shutdown(socket.SHUT_WR)
        assert recv_until_eof(c) == b"0\n"
        c.close()
        assert srv.errors == []


@pytest.mark.parametrize("base", ["TCPServer", "ThreadingTCPServer",
                                  "UnixStreamServer"])
def test_server_half_close_then_read(mod, base, unix_path):
    """The handler shuts down its own write side, then keeps reading: the
    client sees EOF and can still send."""
    class H(mod.StreamRequestHandler):
        def handle(self):
            self.wfile.write(b"hello\n")
            self.request.shutdown(socket.SHUT_WR)
            self.server.note("read", self.rfile.readline())
            self.server.note("eof", self.rfile.read())

    srv = build(mod, base, H, unix_path)
    with serving(srv):
        c = connect(srv)
        try:
            assert recv_until_eof(c) == b"hello\n"
            c.sendall(b"after half close\n")
            c.sendall(b"tail")
            c.shutdown(socket.SHUT_WR)
            assert wait_for(lambda: len(srv.log) == 2)
        finally:
            c.close()
        assert srv.log == [("read", b"after half close\n"), ("eof", b"tail")]
        assert srv.errors == []


# ---------------------------------------------------------------------------
# silent and slow clients
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("base", ["TCPServer", "ThreadingTCPServer",
                                  "UnixStreamServer"])
def test_silent_client_times_out(mod, base, unix_path):
    """A client that connects and sends nothing: the handler ``timeout`` ends
    it with socket.timeout (TimeoutError) in handle_error; the client sees EOF;
    the next client (already waiting, for a synchronous server) is served."""
    class H(mod.StreamRequestHandler):
        timeout = 0.3

        def handle(self):
            self.wfile.write(self.rfile.readline())

    srv = build(mod, base, H, unix_path)
    with serving(srv):
        silent = connect(srv)
        try:
            waiting = connect(srv)   # queued behind it on a synchronous server
            with waiting:
                waiting.sendall(b"waiting\n")
                assert recv_line(waiting) == b"waiting\n"
            assert recv_until_eof(silent) == b""
        finally:
            silent.close()
        assert wait_for(lambda: srv.errors)
        assert srv.errors == ["TimeoutError"]
        assert socket.timeout is TimeoutError


def slow_sender(sock, stop, interval, progress, max_bytes=60):
    """Send one byte every ``interval`` seconds until ``stop`` is set."""
    while not stop.is_set() and progress[0] < max_bytes:
        sock.sendall(b"s")
        progress[0] += 1
        stop.wait(interval)


@pytest.mark.parametrize("base", ["ThreadingTCPServer", "ThreadingUnixStreamServer"])
def test_slow_client(mod, base, unix_path):
    """A client sending one byte every 0.3 s with handler timeout = 0.5.

    The timeout is per socket operation (stdlib semantics): while bytes keep
    coming the handler is not timed out and other clients are served
    meanwhile; once the client goes quiet (slower than the timeout),
    TimeoutError reaches handle_error and the other clients are still served.
    """
    class H(mod.StreamRequestHandler):
        timeout = 0.5

        def handle(self):
            line = self.rfile.readline()
            if line.startswith(b"s"):
                self.server.note("slow line", line)
            self.wfile.write(line)

    srv = build(mod, base, H, unix_path)
    with serving(srv):
        slow = connect(srv)
        stop = threading.Event()
        progress = [0]
        t = threading.Thread(target=slow_sender, args=(slow, stop, 0.3, progress),
                             daemon=True)
        t.start()
        try:
            # other clients are served while the slow one trickles, for ~1.5 s
            i = 0
            while progress[0] < 6 and t.is_alive() and i < 2000:
                assert line_request(srv, b"fast %d\n" % i) == b"fast %d\n" % i
                i += 1
                time.sleep(0.01)
            assert progress[0] >= 6
            # the trickle kept the slow handler alive: per-operation timeout
            assert srv.errors == [], "timed out although a byte came every 0.3 s"
            assert t.is_alive()
            stop.set()
            t.join(JOIN_TIMEOUT)
            assert not t.is_alive()
            # now the client is silent: the 0.5 s timeout fires
            assert srv.error_event.wait(JOIN_TIMEOUT)
            assert srv.errors == ["TimeoutError"]
            assert recv_until_eof(slow) == b""
            for i in range(5):
                assert line_request(srv, b"after %d\n" % i) == b"after %d\n" % i
        finally:
            stop.set()
            t.join(JOIN_TIMEOUT)
            slow.close()
        assert srv.log == []


@pytest.mark.parametrize("timeout", [None, 0.5])
def test_client_never_reads(mod, timeout):
    """A client that sends a request and never reads the 64 MiB response: its
    handler's write blocks, every other client is served meanwhile; the write
    fails (timeout, or the client's reset) into handle_error."""
    chunk = b"y" * (1 << 20)
    big_started = threading.Event()

    class H(mod.StreamRequestHandler):
        def handle(self):
            line = self.rfile.readline()
            if line == b"BIG\n":
                big_started.set()
                for _ in range(64):
                    self.wfile.write(chunk)
                self.server.note("big finished")
                return
            self.wfile.write(line)

    H.timeout = timeout
    srv = build(mod, "ThreadingTCPServer", H)
    with serving(srv):
        lazy = connect(srv, rcvbuf=65536)
        try:
            lazy.sendall(b"BIG\n")
            assert big_started.wait(JOIN_TIMEOUT)
            for i in range(10):
                assert line_request(srv, b"other %d\n" % i) == b"other %d\n" % i
            if timeout is None:
                assert srv.log == [] and srv.errors == []
                rst_close(lazy)
                assert srv.error_event.wait(JOIN_TIMEOUT)
                assert srv.errors[0] in ("ConnectionResetError", "BrokenPipeError")
            else:
                assert srv.error_event.wait(JOIN_TIMEOUT)
                assert srv.errors == ["TimeoutError"]
        finally:
            lazy.close()
        assert srv.log == []
        assert line_request(srv, b"last\n") == b"last\n"


# ---------------------------------------------------------------------------
# garbage and long lines
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("handler_kind", ["rfile_lines", "recv"])
@pytest.mark.parametrize("base", ["TCPServer", "ThreadingUnixStreamServer"])
def test_garbage_bytes_echo_exactly(mod, base, handler_kind, unix_path):
    rng = random.Random(5)
    payload = rng.randbytes(300_000) + b"\x00\xff\r\n\r\r\n\x00" * 100 + rng.randbytes(777)

    class Lines(mod.StreamRequestHandler):
        def handle(self):
            for line in self.rfile:
                self.wfile.write(line)

    class Recv(mod.BaseRequestHandler):
        def handle(self):
            while True:
                data = self.request.recv(4096)
                if not data:
                    break
                self.request.sendall(data)

    srv = build(mod, base, Lines if handler_kind == "rfile_lines" else Recv, unix_path)
    with serving(srv):
        cuts = sorted(rng.sample(range(1, len(payload)), 50))
        pieces = [payload[a:b] for a, b in zip([0] + cuts, cuts + [len(payload)])]
        assert stream_exchange(connect(srv), pieces) == payload
        assert srv.errors == []


def test_invalid_utf8_in_text_mode_reaches_handle_error(mod):
    class H(mod.StreamRequestHandler):
        def handle(self):
            text = self.connection.makefile("r", encoding="utf-8")
            try:
                self.wfile.write(text.readline().encode())
            finally:
                text.close()

    srv = build(mod, "TCPServer", H)
    with serving(srv):
        assert stream_exchange(connect(srv), [b"\xff\xfe garbage\n"]) == b""
        assert srv.errors == ["UnicodeDecodeError"]
        assert stream_exchange(connect(srv), ["héllo\n".encode()]) == "héllo\n".encode()


@pytest.mark.parametrize("rbufsize", [-1, 16, 8192])
def test_lines_far_longer_than_rbufsize(mod, rbufsize):
    size = 1 << 20 if rbufsize != 16 else 200_000

    class H(mod.StreamRequestHandler):
        def handle(self):
            line = self.rfile.readline()
            self.wfile.write(b"%d %s\n" % (len(line), hashlib.sha256(line).hexdigest().encode()))
            # readline(limit) on a long line returns at most ``limit`` bytes
            while True:
                part = self.rfile.readline(1000)
                if not part:
                    break
                self.wfile.write(b"%d\n" % len(part))

    H.rbufsize = rbufsize
    srv = build(mod, "ThreadingTCPServer", H)
    table = bytes(b"abcdefgh"[i % 8] for i in range(256))
    line = random.Random(1).randbytes(size).translate(table) + b"\n"
    with serving(srv):
        reply = stream_exchange(connect(srv), [line, b"z" * 2500 + b"\n", b"tail"])
        first, *rest = reply.split(b"\n")
        assert first == b"%d %s" % (len(line), hashlib.sha256(line).hexdigest().encode())
        assert rest == [b"1000", b"1000", b"501", b"4", b""]
        assert srv.errors == []


# ---------------------------------------------------------------------------
# datagrams
# ---------------------------------------------------------------------------

DGRAM_BASES = ["UDPServer", "UnixDatagramServer"]


class DigestLogic:
    def handle(self):
        data, sock = self.request
        sock.sendto(b"%d %s" % (len(data), hashlib.sha256(data).hexdigest().encode()),
                    self.client_address)


def digest(data):
    return b"%d %s" % (len(data), hashlib.sha256(data).hexdigest().encode())


@pytest.mark.parametrize("max_packet_size", [None, 100])
@pytest.mark.parametrize("base", DGRAM_BASES)
def test_oversized_datagram_truncated(mod, base, max_packet_size, unix_path):
    H = type("H", (DigestLogic, mod.BaseRequestHandler), {})
    attrs = {} if max_packet_size is None else {"max_packet_size": max_packet_size}
    srv = build(mod, base, H, unix_path, **attrs)
    limit = srv.max_packet_size
    assert limit == (8192 if max_packet_size is None else 100)
    big = bytes(random.Random(2).randbytes(20000))
    with serving(srv), dgram_client(srv, unix_path) as c:
        c.sendto(big, srv.server_address)
        assert c.recv(1000) == digest(big[:limit])
        small = b"s" * min(50, limit)
        c.sendto(small, srv.server_address)
        assert c.recv(1000) == digest(small)
        exact = b"e" * limit
        c.sendto(exact, srv.server_address)
        assert c.recv(1000) == digest(exact)
        assert srv.errors == []


@pytest.mark.parametrize("base", DGRAM_BASES + ["ThreadingUDPServer"])
def test_empty_datagrams(mod, base, unix_path):
    H = type("H", (DigestLogic, mod.BaseRequestHandler), {})
    srv = build(mod, base, H, unix_path)
    with serving(srv), dgram_client(srv, unix_path) as c:
        for _ in range(3):
            c.sendto(b"", srv.server_address)
            assert c.recv(1000) == digest(b"")
        c.sendto(b"x", srv.server_address)
        assert c.recv(1000) == digest(b"x")


@pytest.mark.parametrize("base", ["UDPServer", "ThreadingUDPServer", "UnixDatagramServer"])
def test_datagram_flood(mod, base, unix_path):
    """20,000 datagrams as fast as the client can send them (drops allowed):
    the server stays alive, handles at most what was sent, and answers a PING
    afterwards."""
    class H(mod.BaseRequestHandler):
        def handle(self):
            data, sock = self.request
            if data == b"PING":
                sock.sendto(b"PONG", self.client_address)
            else:
                with self.server.lock:
                    self.server.count += 1

    srv = build(mod, base, H, unix_path, worker_idle_timeout=0.2)
    srv.count = 0
    with serving(srv), dgram_client(srv, unix_path) as c:
        c.setblocking(False)
        sent = 0
        payload = b"f" * 32
        for i in range(20000):
            try:
                c.sendto(payload, srv.server_address)
                sent += 1
            except (BlockingIOError, OSError) as exc:
                if getattr(exc, "errno", None) not in (errno.EAGAIN, errno.ENOBUFS):
                    raise
        c.settimeout(0.5)
        pong = False
        for _ in range(30):
            c.sendto(b"PING", srv.server_address)
            try:
                if c.recv(100) == b"PONG":
                    pong = True
                    break
            except TimeoutError:
                pass
        assert pong, "server did not answer after the flood"
        assert sent > 0
        assert 1 <= srv.count <= sent
        assert srv.errors == []
        print(f"\n{base}: sent {sent}, handled {srv.count}")


# ---------------------------------------------------------------------------
# handler exceptions
# ---------------------------------------------------------------------------

class CustomError(Exception):
    pass


class FinishError(Exception):
    pass


def _recurse():
    return _recurse()


def raise_kind(kind):
    if kind == "ValueError":
        raise ValueError("bad value")
    if kind == "OSError":
        raise OSError(errno.EIO, "i/o")
    if kind == "KeyError":
        return {}["missing"]
    if kind == "ZeroDivisionError":
        return 1 / 0
    if kind == "AttributeError":
        return None.missing  # noqa
    if kind == "MemoryError":
        raise MemoryError
    if kind == "RecursionError":
        return _recurse()
    if kind == "UnicodeDecodeError":
        return b"\xff".decode("utf-8")
    if kind == "StopIteration":
        return next(iter(()))
    if kind == "CustomError":
        raise CustomError("custom")
    if kind == "ExceptionGroup":
        raise ExceptionGroup("group", [ValueError(1), CustomError(2)])
    if kind == "TimeoutError":
        raise TimeoutError("timed out")
    raise AssertionError(kind)


EXC_KINDS = ["ValueError", "OSError", "KeyError", "ZeroDivisionError",
             "AttributeError", "MemoryError", "RecursionError",
             "UnicodeDecodeError", "StopIteration", "CustomError",
             "ExceptionGroup", "TimeoutError"]


def stream_raising_handler(m, where):
    class H(m.StreamRequestHandler):
        def setup(self):
            super().setup()
            self.kind = self.rfile.readline().strip().decode()
            self.server.note("setup")
            if where == "setup" and self.kind != "GOOD":
                raise_kind(self.kind)

        def handle(self):
            self.server.note("handle")
            self.wfile.write(b"handled\n")
            if where in ("handle", "both") and self.kind != "GOOD":
                raise_kind(self.kind)

        def finish(self):
            self.server.note("finish")
            if self.kind != "GOOD":
                if where == "finish":
                    raise_kind(self.kind)
                if where == "both":
                    raise FinishError("in finish")
            super().finish()
    return H


def expected_for(where, kind):
    reply = b"" if where == "setup" else b"handled\n"
    log = [("setup",)] if where == "setup" else [("setup",), ("handle",), ("finish",)]
    error = "FinishError" if where == "both" else kind
    return reply, log, error


@pytest.mark.parametrize("where", ["setup", "handle", "finish", "both"])
@pytest.mark.parametrize("base", ["TCPServer", "ThreadingTCPServer",
                                  "ThreadingUnixStreamServer"])
def test_handler_exceptions_stream(mod, base, where, unix_path):
    """Every kind of Exception, raised in setup, handle, finish (or handle and
    then finish): handle_error gets it, finish runs unless setup raised, the
    connection is closed, the server serves the next client."""
    before = settled_fd_count()
    srv = build(mod, base, stream_raising_handler(mod, where), unix_path)
    with serving(srv):
        for kind in EXC_KINDS:
            with srv.lock:
                srv.log.clear()
            reply = stream_exchange(connect(srv), [kind.encode() + b"\n"])
            exp_reply, exp_log, exp_error = expected_for(where, kind)
            assert reply == exp_reply, kind
            assert wait_for(lambda: len(srv.errors) >= 1)
            assert srv.errors == [exp_error], kind
            if where == "both":
                assert srv.contexts == [kind]
            assert srv.log == exp_log, kind
            srv.errors.clear()
            srv.contexts.clear()
            with srv.lock:
                srv.log.clear()
            assert stream_exchange(connect(srv), [b"GOOD\n"]) == b"handled\n"
            assert srv.errors == []
    assert_fds_back(before)


@pytest.mark.parametrize("where", ["setup", "handle", "finish", "both"])
def test_handler_exceptions_datagram(mod, where, unix_path):
    class H(mod.DatagramRequestHandler):
        def setup(self):
            super().setup()
            self.kind = self.packet.decode()
            if where == "setup" and self.kind != "GOOD":
                raise_kind(self.kind)

        def handle(self):
            self.wfile.write(b"good" if self.kind == "GOOD" else b"handled")
            if where in ("handle", "both") and self.kind != "GOOD":
                raise_kind(self.kind)

        def finish(self):
            if self.kind != "GOOD":
                if where == "finish":
                    raise_kind(self.kind)
                if where == "both":
                    raise FinishError("in finish")
            super().finish()

    srv = build(mod, "UDPServer", H)
    with serving(srv), dgram_client(srv) as c:
        for kind in EXC_KINDS:
            c.sendto(kind.encode(), srv.server_address)
            c.sendto(b"GOOD", srv.server_address)
            replies = []
            while True:
                r = c.recv(100)
                if r == b"good":
                    break
                replies.append(r)
            assert replies == ([b"handled"] if where == "handle" else []), kind
        exp = ["FinishError" if where == "both" else k for k in EXC_KINDS]
        assert srv.errors == exp


@pytest.mark.parametrize("base", ["TCPServer", "ThreadingTCPServer"])
def test_handle_error_raising(mod, base):
    """handle_error itself raises: a synchronous server's serve_forever
    propagates it (stdlib); a threading server sends it to
    threading.excepthook and keeps serving."""
    hooked = []

    class H(mod.StreamRequestHandler):
        def handle(self):
            line = self.rfile.readline()
            if line == b"boom\n":
                raise ValueError("boom")
            self.wfile.write(line)

    class S(getattr(mod, base)):
        allow_reuse_address = True

        def handle_error(self, request, client_address):
            raise CustomError("from handle_error")

    old_hook = threading.excepthook
    threading.excepthook = lambda args: hooked.append(args.exc_type.__name__)
    srv = S((LOOPBACK, 0), H)
    try:
        sync = base == "TCPServer"
        with serving(srv, allow_exception=sync) as st:
            if sync:
                # the stdlib does not shut the request down when handle_error
                # raises (it propagates at once); only the loop's exit is checked
                with connect(srv) as c:
                    c.sendall(b"boom\n")
                    assert st.returned.wait(JOIN_TIMEOUT)
                assert type(st.exception) is CustomError
                assert type(st.exception.__context__) is ValueError
                st.exception = None
            else:
                assert stream_exchange(connect(srv), [b"boom\n"]) == b""
                assert wait_for(lambda: hooked)
                assert hooked == ["CustomError"]
                assert line_request(srv, b"still\n") == b"still\n"
    finally:
        threading.excepthook = old_hook


class StopServing(BaseException):
    pass


@pytest.mark.parametrize("exc_type", [SystemExit, KeyboardInterrupt, StopServing])
@pytest.mark.parametrize("base", ["TCPServer", "ThreadingTCPServer"])
def test_base_exceptions_in_handler(mod, base, exc_type):
    """BaseExceptions: out of handle_request (synchronous; the connection is
    closed) or to threading.excepthook (threading; the server keeps
    serving)."""
    hooked = []

    class H(mod.StreamRequestHandler):
        def handle(self):
            line = self.rfile.readline()
            if line == b"raise\n":
                raise exc_type("bye")
            self.wfile.write(line)

    srv = build(mod, base, H)
    srv.timeout = 5.0
    old_hook = threading.excepthook
    threading.excepthook = lambda args: hooked.append(args.exc_type)
    try:
        c = connect(srv)
        c.sendall(b"raise\n")
        if base == "TCPServer":
            with pytest.raises(exc_type):
                srv.handle_request()
        else:
            srv.handle_request()
            assert wait_for(lambda: hooked)
            assert hooked == [exc_type]
        assert recv_until_eof(c) == b""
        c.close()
        c = connect(srv)
        c.sendall(b"ok\n")
        srv.handle_request()
        assert recv_line(c) == b"ok\n"
        c.close()
        assert srv.errors == []
    finally:
        threading.excepthook = old_hook
        srv.server_close()


def test_default_handle_error_survives_unprintable_exception(mod, capfd):
    class Unprintable(Exception):
        def __str__(self):
            raise RuntimeError("no str for you")

    class H(mod.StreamRequestHandler):
        def handle(self):
            line = self.rfile.readline()
            if line == b"bad\n":
                raise Unprintable()
            self.wfile.write(line)

    srv = type("S", (mod.ThreadingTCPServer,), {"allow_reuse_address": True})(
        (LOOPBACK, 0), H)
    with serving(srv):
        assert stream_exchange(connect(srv), [b"bad\n"]) == b""
        assert line_request(srv, b"fine\n") == b"fine\n"
    err = capfd.readouterr().err
    assert "Exception occurred during processing of request from" in err
    assert "Unprintable" in err


# ---------------------------------------------------------------------------
# signal handlers raising during a blocked read / write (main thread)
# ---------------------------------------------------------------------------

class Alarm(BaseException):
    pass


class AlarmError(Exception):
    pass


BIG_WRITE = 16 << 20


@pytest.mark.parametrize("behaviour", ["raise_exception", "raise_base", "no_raise"])
@pytest.mark.parametrize("op", ["readline", "recv", "wfile.write", "sendall"])
def test_signal_during_blocked_io(mod, op, behaviour, main_thread):
    """``handle_request()`` on the main thread; the handler blocks reading (the
    client sends nothing) or writing (the client does not read 16 MiB).  A
    signal arrives: a handler raising an Exception ends the request in
    handle_error, one raising a BaseException propagates out of
    handle_request, one that returns lets the operation resume (PEP 475)."""
    blocking = threading.Event()
    fired = threading.Event()
    result = {}

    class H(mod.StreamRequestHandler):
        def handle(self):
            if self.server.second:
                self.wfile.write(self.rfile.readline())
                return
            blocking.set()
            if op == "readline":
                result["data"] = self.rfile.readline()
            elif op == "recv":
                result["data"] = self.request.recv(100)
            elif op == "wfile.write":
                result["n"] = self.wfile.write(b"w" * BIG_WRITE)
            else:
                self.request.sendall(b"w" * BIG_WRITE)
                result["n"] = BIG_WRITE
            self.server.note("completed")

    def on_signal(signum, frame):
        fired.set()
        if behaviour == "raise_exception":
            raise AlarmError("signal")
        if behaviour == "raise_base":
            raise Alarm("signal")

    srv = build(mod, "TCPServer", H)
    srv.timeout = 5.0
    srv.second = False
    old = signal.signal(signal.SIGUSR1, on_signal)
    client = connect(srv, rcvbuf=65536)
    main_ident = threading.main_thread().ident
    client_box = {}

    def helper():
        if not blocking.wait(JOIN_TIMEOUT):
            return
        time.sleep(0.2)
        signal.pthread_kill(main_ident, signal.SIGUSR1)
        if not fired.wait(3.0):
            # the Python handler did not run while the operation was blocked:
            # unblock it (feed the read / drain the write) so the test ends
            client_box["late"] = True
            try:
                if op in ("readline", "recv"):
                    client.sendall(b"unblocked\n")
                else:
                    recv_exactly(client, BIG_WRITE)
            except OSError:
                pass
            return
        if behaviour == "no_raise":
            if op in ("readline", "recv"):
                client.sendall(b"after signal\n")
            else:
                client_box["got"] = len(recv_exactly(client, BIG_WRITE))

    t = threading.Thread(target=helper, daemon=True)
    t.start()
    try:
        if behaviour == "raise_base":
            with pytest.raises(Alarm):
                srv.handle_request()
        else:
            srv.handle_request()
        t.join(JOIN_TIMEOUT)
        assert not t.is_alive()
        assert not client_box.get("late"), (
            f"the signal handler did not run while the handler was blocked in {op};"
            " it ran only once the operation completed")
        assert fired.is_set()
        if behaviour == "no_raise":
            assert srv.log == [("completed",)]
            assert srv.errors == []
            if op in ("readline", "recv"):
                assert result["data"] == b"after signal\n"
            else:
                assert result["n"] == BIG_WRITE
                assert client_box["got"] == BIG_WRITE
        else:
            assert srv.log == []
            assert srv.errors == (["AlarmError"] if behaviour == "raise_exception" else [])
            # the request was closed: the client reaches EOF
            client.settimeout(CLIENT_TIMEOUT)
            if op in ("readline", "recv"):
                assert recv_until_eof(client) == b""
            else:
                assert len(recv_until_eof(client)) < BIG_WRITE
        # the server serves the next request
        srv.second = True
        with connect(srv) as c2:
            c2.sendall(b"next\n")
            srv.handle_request()
            assert recv_line(c2) == b"next\n"
    finally:
        signal.signal(signal.SIGUSR1, old)
        client.close()
        srv.server_close()


# ---------------------------------------------------------------------------
# a handler that closes or detaches its own connection
# ---------------------------------------------------------------------------

DEVNULL_ID = (os.stat("/dev/null").st_dev, os.stat("/dev/null").st_ino)


@pytest.mark.parametrize("action", ["close", "detach_close", "detach_keep"])
@pytest.mark.parametrize("handler_base", ["BaseRequestHandler", "StreamRequestHandler"])
@pytest.mark.parametrize("base", ["TCPServer", "ThreadingTCPServer"])
def test_handler_closes_or_detaches_connection(mod, base, handler_base, action):
    """The handler closes its connection, or detaches it
    (``socket.socket(fileno=request.detach())``) and closes or keeps the new
    socket.  The server must never touch the descriptor again: a file opened
    on the freed number stays valid; a kept socket stays open and usable."""
    before = settled_fd_count()
    done = threading.Event()

    class H(getattr(mod, handler_base)):
        def handle(self):
            if action == "close":
                self.request.sendall(b"bye\n")
                self.request.close()
                return
            fd = self.request.detach()
            s = socket.socket(fileno=fd)
            s.sendall(b"detached\n")
            if action == "detach_close":
                s.close()
                # take the freed number (likely the same) for an unrelated file
                self.server.reused = open("/dev/null", "rb")
            else:
                self.server.kept = s

    class S(Rec, getattr(mod, base)):
        allow_reuse_address = True

        def shutdown_request(self, request):
            try:
                super().shutdown_request(request)
            finally:
                done.set()

    srv = S((LOOPBACK, 0), H)
    srv.reused = srv.kept = None
    with serving(srv):
        c = connect(srv)
        try:
            if action == "detach_keep":
                assert recv_line(c) == b"detached\n"
                assert done.wait(JOIN_TIMEOUT)
                time.sleep(0.1)
                c.settimeout(0.3)
                with pytest.raises(TimeoutError):
                    data = c.recv(100)
                    pytest.fail(f"kept connection was closed by the server: {data!r}")
                c.settimeout(CLIENT_TIMEOUT)
                srv.kept.sendall(b"late\n")
                assert recv_line(c) == b"late\n"
                c.sendall(b"to kept\n")
                srv.kept.settimeout(CLIENT_TIMEOUT)
                assert recv_line(srv.kept) == b"to kept\n"
                srv.kept.close()
                assert recv_until_eof(c) == b""
            else:
                expected = b"bye\n" if action == "close" else b"detached\n"
                assert recv_until_eof(c) == expected
                assert done.wait(JOIN_TIMEOUT)
        finally:
            c.close()
        time.sleep(0.05)
        if srv.reused is not None:
            st = os.fstat(srv.reused.fileno())
            assert (st.st_dev, st.st_ino) == DEVNULL_ID, "descriptor closed/reused by the server"
            assert srv.reused.read(1) == b""
            srv.reused.close()
        assert srv.errors == []
        # the server goes on serving (the same handler runs again)
        done.clear()
        with connect(srv) as c:
            assert recv_line(c) == (b"bye\n" if action == "close" else b"detached\n")
            assert done.wait(JOIN_TIMEOUT)
        if srv.kept is not None:
            srv.kept.close()
        if srv.reused is not None:
            srv.reused.close()
    assert_fds_back(before)


# ---------------------------------------------------------------------------
# descriptor exhaustion
# ---------------------------------------------------------------------------

EXHAUST_SCRIPT = textwrap.dedent(r"""
    import json, os, resource, signal, sys
    modname, mode = sys.argv[1], sys.argv[2]
    m = __import__(modname)

    class H(m.StreamRequestHandler):
        def handle(self):
            for line in self.rfile:
                self.wfile.write(line)

    base = m.ThreadingTCPServer if mode == "threading" else m.TCPServer

    class S(base):
        allow_reuse_address = True
        request_queue_size = 256
        daemon_threads = True
        block_on_close = False
        worker_idle_timeout = 0.2
        errors = 0

        def handle_error(self, request, client_address):
            type(self).errors += 1

    srv = S(("127.0.0.1", 0), H)
    srv.timeout = 0.01
    srv.handle_request()            # creates the engine's poller before the limit
    srv.timeout = None
    fillers = []

    def release(signum, frame):
        while fillers:
            os.close(fillers.pop())

    signal.signal(signal.SIGUSR1, release)
    nfd = len(os.listdir("/proc/self/fd"))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = nfd + 16
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    if mode == "sync":
        try:
            while True:
                fillers.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
    print(json.dumps({"port": srv.server_address[1], "limit": limit,
                      "fillers": len(fillers)}), flush=True)
    try:
        srv.serve_forever(0.5)
    finally:
        srv.server_close()
""")


def start_script(script, *args, sigint_default=False, env=None):
    preexec = None
    if sigint_default:
        def preexec():
            signal.signal(signal.SIGINT, signal.SIG_DFL)
    e = dict(os.environ)
    e["PYTHONUNBUFFERED"] = "1"
    if env:
        e.update(env)
    return subprocess.Popen([sys.executable, "-c", script, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=preexec, env=e)


def read_json_line(proc, timeout=JOIN_TIMEOUT):
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            raise AssertionError("subprocess did not report its address")
    finally:
        sel.close()
    line = proc.stdout.readline()
    if not line:
        proc.wait(5)
        raise AssertionError("subprocess failed: " + proc.stderr.read().decode())
    return json.loads(line)


def stop_process(proc):
    if proc.poll() is None:
        proc.kill()
    try:
        out, err = proc.communicate(timeout=JOIN_TIMEOUT)
    except subprocess.TimeoutExpired:
        return b"", b""
    return out, err


def collect_echoes(socks, expected, pending, timeout, settle=None):
    """Read from ``pending`` clients until each has its full echo line or the
    timeout (or, with ``settle``, until ``settle`` seconds after the first one
    is served); returns the set of clients served now."""
    sel = selectors.DefaultSelector()
    bufs = {}
    for s in pending:
        sel.register(s, selectors.EVENT_READ)
        bufs[s] = b""
    served = set()
    deadline = time.monotonic() + timeout
    try:
        while len(served) < len(pending):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for key, _ in sel.select(left):
                s = key.fileobj
                data = s.recv(4096)
                if not data:
                    sel.unregister(s)
                    bufs[s] += b"<EOF>"
                    continue
                bufs[s] += data
                if bufs[s] == expected[s]:
                    served.add(s)
                    sel.unregister(s)
                    if settle is not None:
                        deadline = min(deadline, time.monotonic() + settle)
    finally:
        sel.close()
    for s in served:
        assert bufs[s] == expected[s]
    for s in pending:
        if s not in served:
            assert b"<EOF>" not in bufs[s], "a pending client was dropped"
    return served


@pytest.mark.parametrize("mode", ["threading", "sync"])
def test_descriptor_exhaustion(fast_mod, mode):
    """RLIMIT_NOFILE lowered in a server subprocess; an accept flood runs it
    out of descriptors (EMFILE).  Over ~2 s of exhaustion the server must not
    spin (< 0.5 s CPU) and must keep running; once descriptors free up, every
    waiting client is served and a new one too."""
    proc = start_script(EXHAUST_SCRIPT, fast_mod.__name__, mode)
    clients = []
    try:
        info = read_json_line(proc)
        address = (LOOPBACK, info["port"])
        n = 40 if mode == "threading" else 3
        expected = {}
        for i in range(n):
            c = socket.create_connection(address, timeout=CLIENT_TIMEOUT)
            line = b"client %d\n" % i
            c.sendall(line)
            expected[c] = line
            clients.append(c)
        served = collect_echoes(clients, expected, clients, timeout=1.5)
        assert len(served) < n, "the descriptor limit was never reached"
        # ~2 s of exhaustion: the server must wait, not spin
        cpu0 = proc_cpu_seconds(proc.pid)
        time.sleep(2.0)
        cpu = proc_cpu_seconds(proc.pid) - cpu0
        print(f"\n{mode}: served {len(served)}/{n} before release; "
              f"CPU over 2 s of exhaustion: {cpu:.3f} s")
        assert proc.poll() is None, proc.stderr.read().decode()
        assert cpu < 0.5, f"server spins while out of descriptors: {cpu:.2f} s CPU in 2 s"
        pending = [c for c in clients if c not in served]
        if mode == "sync":
            os.kill(proc.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 20
        while pending and time.monotonic() < deadline:
            # free descriptors: the served clients leave
            for c in served:
                c.close()
            served = collect_echoes(clients, expected, pending, timeout=5.0, settle=0.3)
            pending = [c for c in pending if c not in served]
        assert not pending, f"{len(pending)} clients never served after descriptors freed"
        for c in served:
            c.close()
        with socket.create_connection(address, timeout=CLIENT_TIMEOUT) as c:
            c.sendall(b"fresh\n")
            assert recv_line(c) == b"fresh\n"
        assert proc.poll() is None
    finally:
        for c in clients:
            c.close()
        out, err = stop_process(proc)
    assert b"panicked" not in err, err.decode()


# ---------------------------------------------------------------------------
# shutdown() / server_close() with ~200 requests in flight
# ---------------------------------------------------------------------------

INFLIGHT = 200


def inflight_setup(m, daemon=False):
    state = {"entered": 0, "finished": 0}
    all_in = threading.Event()
    release = threading.Event()
    lock = threading.Lock()

    class H(m.StreamRequestHandler):
        def handle(self):
            line = self.rfile.readline()
            with lock:
                state["entered"] += 1
                if state["entered"] == INFLIGHT:
                    all_in.set()
            release.wait(30)
            self.wfile.write(line.upper())
            with lock:
                state["finished"] += 1

    srv = build(m, "ThreadingTCPServer", H, request_queue_size=512,
                daemon_threads=daemon, block_on_close=not daemon,
                worker_idle_timeout=0.2)
    return srv, state, all_in, release


def open_inflight_clients(srv):
    clients = []
    try:
        for i in range(INFLIGHT):
            c = connect(srv, timeout=30)
            c.sendall(b"req %d\n" % i)
            clients.append(c)
    except BaseException:
        for c in clients:
            c.close()
        raise
    return clients


def check_replies(clients):
    try:
        for i, c in enumerate(clients):
            assert recv_line(c) == b"REQ %d\n" % i
    finally:
        for c in clients:
            c.close()


@pytest.mark.parametrize("how", ["shutdown_from_thread", "close_from_thread",
                                 "close_from_signal_handler",
                                 "signal_raises_in_serve_forever",
                                 "daemon_close"])
def test_shutdown_and_close_with_requests_in_flight(mod, how, main_thread):
    srv, state, all_in, release = inflight_setup(mod, daemon=(how == "daemon_close"))
    clients = []
    old = signal.getsignal(signal.SIGUSR1)
    try:
        if how == "signal_raises_in_serve_forever":
            def on_signal(signum, frame):
                raise StopServing()

            signal.signal(signal.SIGUSR1, on_signal)
            main_ident = threading.main_thread().ident

            def client_side():
                try:
                    clients.extend(open_inflight_clients(srv))
                    if all_in.wait(30):
                        # let the loop get back to its wait: a signal raising
                        # inside process_request (the stdlib's Thread.start())
                        # shuts that request down under its running handler
                        time.sleep(0.2)
                        signal.pthread_kill(main_ident, signal.SIGUSR1)
                finally:
                    all_in.set()

            t = threading.Thread(target=client_side, daemon=True)
            t.start()
            with pytest.raises(StopServing):
                srv.serve_forever(0.05)
            t.join(JOIN_TIMEOUT)
            assert state["entered"] == INFLIGHT
            threading.Timer(0.3, release.set).start()
            srv.server_close()
            assert state["finished"] == INFLIGHT
            check_replies(clients)
            return

        with serving(srv, poll_interval=0.05, close=False):
            clients.extend(open_inflight_clients(srv))
            assert all_in.wait(30), f"only {state['entered']} handlers started"
            if how == "shutdown_from_thread":
                ok, _, exc = call_with_timeout(srv.shutdown)
                assert ok and exc is None
                assert state["finished"] == 0  # shutdown does not wait for handlers
                release.set()
                srv.server_close()
                assert state["finished"] == INFLIGHT
            elif how == "close_from_thread":
                box = {}

                def closer():
                    srv.shutdown()
                    srv.server_close()
                    box["finished"] = state["finished"]

                t = threading.Thread(target=closer, daemon=True)
                t.start()
                t.join(0.5)
                assert t.is_alive(), "server_close() returned with requests in flight"
                release.set()
                t.join(JOIN_TIMEOUT * 2)
                assert not t.is_alive()
                assert box["finished"] == INFLIGHT
            elif how == "close_from_signal_handler":
                box = {}

                class Done(Exception):
                    pass

                def on_signal(signum, frame):
                    srv.shutdown()
                    srv.server_close()
                    box["finished"] = state["finished"]
                    raise Done()

                signal.signal(signal.SIGUSR1, on_signal)
                main_ident = threading.main_thread().ident

                def kicker():
                    time.sleep(0.05)
                    signal.pthread_kill(main_ident, signal.SIGUSR1)
                    time.sleep(0.3)
                    release.set()

                threading.Thread(target=kicker, daemon=True).start()
                with pytest.raises(Done):
                    time.sleep(30)
                assert box["finished"] == INFLIGHT
            elif how == "daemon_close":
                ok, _, exc = call_with_timeout(srv.shutdown)
                assert ok and exc is None
                ok, _, exc = call_with_timeout(srv.server_close)
                assert ok and exc is None, "server_close() waited for daemon requests"
                assert state["finished"] == 0
                release.set()
                assert wait_for(lambda: state["finished"] == INFLIGHT, timeout=20)
            check_replies(clients)
    finally:
        release.set()
        signal.signal(signal.SIGUSR1, old)
        for c in clients:
            c.close()
        srv.server_close()


@pytest.mark.parametrize("base", ["TCPServer", "ThreadingTCPServer"])
def test_signal_received_by_another_thread_stops_serve_forever(mod, base, main_thread):
    """A process-directed signal (Ctrl-C from a terminal, kill) may be taken by
    any thread that does not block it, e.g. a user's own Python thread.  Its
    Python handler then runs on the main thread at the next chance: the stdlib
    loop gets one every ``poll_interval``.  serve_forever (idle, main thread)
    must raise the handler's exception within a few poll intervals."""
    srv = build(mod, base, mod.StreamRequestHandler)
    raised = threading.Event()
    box = {}

    def on_signal(signum, frame):
        raise StopServing()

    def helper():
        time.sleep(0.3)
        signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)  # to this thread
        if not raised.wait(5.0):
            # still serving: wake the loop with a client so the test ends
            box["stuck"] = True
            try:
                with connect(srv) as c:
                    c.sendall(b"wake\n")
                    c.shutdown(socket.SHUT_WR)
                    c.recv(10)
            except OSError:
                pass

    old = signal.signal(signal.SIGUSR1, on_signal)
    t = threading.Thread(target=helper, daemon=True)
    try:
        t.start()
        with pytest.raises(StopServing):
            try:
                srv.serve_forever(0.1)
            finally:
                raised.set()
        t.join(JOIN_TIMEOUT)
        assert not box.get("stuck"), (
            "serve_forever() ran the signal handler only when a client arrived, "
            "not within its poll interval")
    finally:
        raised.set()
        signal.signal(signal.SIGUSR1, old)
        t.join(JOIN_TIMEOUT)
        srv.server_close()


def test_signal_while_dispatch_waits_at_thread_cap(fast_mod, main_thread):
    """``max_threads=1`` (an engine extension): with the only worker busy, the
    loop waits in dispatch for a free worker.  A signal whose handler raises
    must end serve_forever promptly (docs/ARCHITECTURE.md, Signals: every wait runs the signal
    handlers), not when the busy handler finishes; and a request that was
    handed to a worker must not be shut down under its running handler."""
    release = threading.Event()
    entered = []
    started = []
    lock = threading.Lock()

    class H(fast_mod.StreamRequestHandler):
        def handle(self):
            with lock:
                started.append(1)
            line = self.rfile.readline()
            with lock:
                entered.append(line)
            release.wait(8)
            self.wfile.write(line.upper())

    srv = build(fast_mod, "ThreadingTCPServer", H, max_threads=1)
    box = {}
    clients = []

    def on_signal(signum, frame):
        raise StopServing()

    main_ident = threading.main_thread().ident

    def helper():
        try:
            a = connect(srv)
            clients.append(a)
            a.sendall(b"a\n")
            if not wait_for(lambda: entered, timeout=5):
                return
            b = connect(srv)
            clients.append(b)
            b.sendall(b"b\n")
            time.sleep(0.3)              # the loop accepts b and waits for a worker
            signal.pthread_kill(main_ident, signal.SIGUSR1)
            if not box.get("raised_event").wait(3.0):
                box["late"] = True
        finally:
            release.set()              # the busy handler ends (at the latest now)

    box["raised_event"] = threading.Event()
    old = signal.signal(signal.SIGUSR1, on_signal)
    t = threading.Thread(target=helper, daemon=True)
    try:
        t.start()
        with pytest.raises(StopServing):
            try:
                srv.serve_forever(0.1)
            finally:
                box["raised_event"].set()
        t.join(JOIN_TIMEOUT)
        srv.server_close()
        replies = []
        for c in clients:
            c.settimeout(CLIENT_TIMEOUT)
            try:
                replies.append(recv_until_eof(c))
            except OSError as exc:
                replies.append(type(exc).__name__)
        assert replies[0] == b"A\n"
        problems = []
        if box.get("late"):
            problems.append("the signal handler ran only once the busy worker "
                            "finished: the wait for a free worker does not run "
                            "signal handlers")
        if len(started) == 2 and replies[1] != b"B\n":
            problems.append("request b was handed to a worker, then shut down under "
                            f"its running handler by the signal's exception: {replies[1]!r}")
        assert not problems, problems
    finally:
        release.set()
        signal.signal(signal.SIGUSR1, old)
        t.join(JOIN_TIMEOUT)
        for c in clients:
            c.close()
        srv.server_close()


# ---------------------------------------------------------------------------
# SIGINT / SIGTERM during load (subprocess)
# ---------------------------------------------------------------------------

LOAD_SCRIPT = textwrap.dedent(r"""
    import json, signal, sys, time
    modname, mode, duration = sys.argv[1], sys.argv[2], float(sys.argv[3])
    m = __import__(modname)

    class H(m.StreamRequestHandler):
        def handle(self):
            line = self.rfile.readline()
            sys.stdout.write("H")
            sys.stdout.flush()
            time.sleep(duration)
            self.wfile.write(line.upper())

    class S(m.ThreadingTCPServer):
        allow_reuse_address = True
        request_queue_size = 128
        daemon_threads = mode == "daemon"
        block_on_close = mode != "daemon"

    def on_term(signum, frame):
        sys.exit(3)

    signal.signal(signal.SIGTERM, on_term)
    with S(("127.0.0.1", 0), H) as srv:
        print(json.dumps({"port": srv.server_address[1]}), flush=True)
        srv.serve_forever(0.5)
""")


def read_marks(proc, count, timeout):
    """Read single-character marks from the subprocess's stdout."""
    got = 0
    deadline = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    try:
        while got < count:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                break
            data = os.read(fd, 4096)
            if not data:
                break
            got += data.count(b"H")
    finally:
        sel.close()
    return got


@pytest.mark.parametrize("mode", ["block", "daemon"])
@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_signal_stops_loaded_server_process(mod, signame, mode):
    """Ctrl-C (SIGINT at default: KeyboardInterrupt) or SIGTERM (a handler
    raising SystemExit(3)) while 20 requests are in their handlers: the
    process exits promptly; with block_on_close the in-flight requests
    complete first, with daemon threads it does not wait for them."""
    n = 20
    duration = 1.0 if mode == "block" else 8.0
    proc = start_script(LOAD_SCRIPT, mod.__name__, mode, str(duration),
                        sigint_default=True)
    clients = []
    try:
        info = read_json_line(proc)
        for i in range(n):
            c = socket.create_connection((LOOPBACK, info["port"]), timeout=15)
            c.sendall(b"load %d\n" % i)
            clients.append(c)
        assert read_marks(proc, n, 15) == n, "handlers did not all start"
        # Let the loop return from dispatching the last request: a KeyboardInterrupt
        # raised inside process_request (the stdlib's Thread.start() waits for the
        # thread) makes both modules shut that request down under its running handler.
        time.sleep(0.3)
        t0 = time.monotonic()
        os.kill(proc.pid, getattr(signal, signame))
        try:
            proc.wait(duration + 5 if mode == "block" else 4)
        except subprocess.TimeoutExpired:
            pytest.fail(f"process did not exit after {signame}")
        elapsed = time.monotonic() - t0
        err = proc.stderr.read().decode(errors="replace")
        expected_rc = -signal.SIGINT if signame == "SIGINT" else 3
        assert proc.returncode == expected_rc, (proc.returncode, err[-2000:])
        assert "panicked" not in err and "Fatal Python error" not in err, err[-2000:]
        replies = []
        for c in clients:
            try:
                replies.append(recv_until_eof(c))
            except OSError as exc:
                replies.append(type(exc).__name__)
        if mode == "block":
            assert replies == [b"LOAD %d\n" % i for i in range(n)]
        else:
            assert elapsed < duration - 2, f"waited {elapsed:.1f} s for daemon requests"
            assert all(r != b"LOAD %d\n" % i for i, r in enumerate(replies))
    finally:
        for c in clients:
            c.close()
        stop_process(proc)


# ---------------------------------------------------------------------------
# Rust panics
# ---------------------------------------------------------------------------

def test_panic_becomes_python_exception(fast_mod):
    core = fast_mod._core
    assert issubclass(core.PanicException, BaseException)
    assert not issubclass(core.PanicException, Exception)
    with pytest.raises(core.PanicException, match="test panic"):
        core._panic("test panic")
    # twice: nothing poisoned
    with pytest.raises(core.PanicException):
        core._panic("again")


@pytest.mark.parametrize("where", ["setup", "handle", "finish"])
@pytest.mark.parametrize("base", ["TCPServer", "ThreadingTCPServer", "UDPServer",
                                  "ThreadingUnixStreamServer"])
def test_handler_panic_reaches_handle_error(fast_mod, base, where, unix_path):
    core = fast_mod._core
    stream = "UDP" not in base
    H0 = fast_mod.StreamRequestHandler if stream else fast_mod.DatagramRequestHandler

    class H(H0):
        def setup(self):
            super().setup()
            if where == "setup" and self.payload() == b"panic":
                core._panic("boom in setup")

        def payload(self):
            if stream:
                if not hasattr(self, "_line"):
                    self._line = self.rfile.readline().strip()
                return self._line
            return self.packet

        def handle(self):
            if where == "handle" and self.payload() == b"panic":
                core._panic("boom in handle")
            self.wfile.write(b"ok:" + self.payload() + (b"\n" if stream else b""))

        def finish(self):
            if where == "finish" and self.payload() == b"panic":
                core._panic("boom in finish")
            super().finish()

    srv = build(fast_mod, base, H, unix_path)
    with serving(srv):
        for i in range(3):
            if stream:
                stream_exchange(connect(srv), [b"panic\n"])
                assert wait_for(lambda: len(srv.errors) == i + 1)
                assert stream_exchange(connect(srv), [b"fine\n"]) == b"ok:fine\n"
            else:
                with dgram_client(srv) as c:
                    c.sendto(b"panic", srv.server_address)
                    c.sendto(b"fine", srv.server_address)
                    while c.recv(100) != b"ok:fine":
                        pass
        assert srv.errors == ["PanicException"] * 3


PANIC_SCRIPT = textwrap.dedent(r"""
    import socket, sys, threading
    import fastsocketserver as m
    from fastsocketserver import _core

    class H(m.StreamRequestHandler):
        def handle(self):
            line = self.rfile.readline()
            if line == b"panic\n":
                _core._panic("subprocess boom")
            self.wfile.write(line)

    for base in (m.TCPServer, m.ThreadingTCPServer):
        cls = type("S", (base,), {"allow_reuse_address": True})
        with cls(("127.0.0.1", 0), H) as srv:
            t = threading.Thread(target=srv.serve_forever, args=(0.05,))
            t.start()
            for line in (b"panic\n", b"ok\n", b"panic\n", b"ok\n"):
                with socket.create_connection(srv.server_address, timeout=10) as c:
                    c.sendall(line)
                    c.shutdown(socket.SHUT_WR)
                    got = b""
                    while True:
                        d = c.recv(100)
                        if not d:
                            break
                        got += d
                    assert got == (b"" if line == b"panic\n" else line), got
            srv.shutdown()
            t.join(10)
    print("survived", flush=True)
""")


def test_panic_does_not_abort_the_process(fast_mod):
    """The default handle_error prints the PanicException; the process is not
    aborted and keeps serving (checked in a subprocess so an abort cannot take
    the test session down)."""
    proc = start_script(PANIC_SCRIPT, env={"RUST_BACKTRACE": "0"})
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        stop_process(proc)
    text = err.decode(errors="replace")
    assert proc.returncode == 0, (proc.returncode, text[-3000:])
    assert out.strip() == b"survived"
    assert text.count("PanicException") >= 4
    assert "Exception occurred during processing of request from" in text
