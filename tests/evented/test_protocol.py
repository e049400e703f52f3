"""Event-driven handlers shaped like ``asyncio.Protocol`` (docs/ARCHITECTURE.md, Two handler paths).

Differential tests: every scenario runs the same protocol class on two backends,

* ``asyncio``: a plain asyncio event loop (``loop.create_server`` /
  ``create_unix_server`` / ``create_datagram_endpoint``) running in a thread of
  its own; this is the reference and must pass today;
* ``fast``: ``fastsocketserver`` server classes given the protocol class in place
  of a handler class, ``serve_forever()`` in a thread,

drives it with the same blocking (or selector-driven non-blocking) socket
clients, and checks that both give the same client transcript and the same
callback sequence.  Chunking is normalized: consecutive ``data_received`` calls
count as one and their data is compared concatenated.

Tests with no asyncio counterpart (``verify_request``, ``handle_error``,
``idle_timeout``, ``ForkingTCPServer`` refusal, the context manager, thread
placement with ``ThreadingTCPServer``) run on ``fastsocketserver`` only.

Rules: loopback only, port 0 or a short Unix path in a fresh temp dir under
/tmp, every client socket has a timeout, every loop is bounded by a deadline,
every server is shut down and closed in ``finally``.  The file is self-contained
(no helpers from conftest).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import hashlib
import os
import resource
import selectors
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time
import weakref

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

CLIENT_TIMEOUT = 5.0
WAIT_TIMEOUT = 10.0
JOIN_TIMEOUT = 10.0
POLL_INTERVAL = 0.05

BACKENDS = ["asyncio", "fast"]

DEFAULT_SERVER_CLASS = {
    "tcp": "TCPServer",
    "unix": "UnixStreamServer",
    "udp": "UDPServer",
    "unix_dgram": "UnixDatagramServer",
}
STREAM_KINDS = ["tcp", "unix"]


# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------

def fast_module():
    """Import fastsocketserver; a failing import fails the test."""
    import fastsocketserver

    return fastsocketserver


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def fd_targets() -> list:
    out = []
    for name in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{name}"))
        except OSError:
            pass
    return sorted(out)


def settled_fd_count() -> int:
    gc.collect()
    return fd_count()


def wait_until(predicate, timeout=WAIT_TIMEOUT, interval=0.002):
    """Poll ``predicate`` until it is true or ``timeout`` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def call_with_timeout(fn, timeout=JOIN_TIMEOUT):
    """Run ``fn()`` in a daemon thread; returns (finished, result, exception)."""
    box = {}

    def run():
        try:
            box["result"] = fn()
        except BaseException as exc:  # reported to the caller
            box["exc"] = exc

    t = threading.Thread(target=run, daemon=True, name="call_with_timeout")
    t.start()
    t.join(timeout)
    return (not t.is_alive()), box.get("result"), box.get("exc")


def raise_nofile(needed: int):
    """Raise RLIMIT_NOFILE's soft limit (up to the hard limit) to ``needed``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        new = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    if soft != resource.RLIM_INFINITY and soft < needed:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below {needed}")


def exc_name(exc):
    return None if exc is None else type(exc).__name__


def recv_exactly(sock, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = sock.recv(min(1 << 20, n - len(buf)))
        if not data:
            break
        buf += data
    return bytes(buf)


def recv_until_eof(sock, limit=1 << 26) -> bytes:
    buf = bytearray()
    while True:
        data = sock.recv(1 << 20)
        if not data:
            return bytes(buf)
        buf += data
        if len(buf) > limit:
            raise AssertionError("peer sent more than expected")


def peer_end(sock) -> str:
    """Read until the peer ends the stream; 'eof' or 'reset' (data is ignored)."""
    try:
        while True:
            if not sock.recv(65536):
                return "eof"
    except ConnectionResetError:
        return "reset"


def assert_silent(sock, seconds=0.25):
    """The peer neither sends nor closes for ``seconds``."""
    old = sock.gettimeout()
    sock.settimeout(seconds)
    try:
        with pytest.raises(socket.timeout):
            got = sock.recv(65536)
            raise AssertionError(f"expected silence, got {got!r}")
    finally:
        sock.settimeout(old)


# ---------------------------------------------------------------------------
# recording protocols
# ---------------------------------------------------------------------------

class Log:
    """What one protocol class saw: one ``ConnRecord`` per instance, in creation order."""

    def __init__(self):
        self.lock = threading.Lock()
        self.conns: list[ConnRecord] = []
        self.init_args: list = []
        self.thread_ids: set = set()
        self.open = 0
        self.peak_open = 0
        self.notes: list = []  # free-form, appended by protocols

    def new(self, args, kwargs):
        with self.lock:
            rec = ConnRecord(self, len(self.conns))
            self.conns.append(rec)
            self.init_args.append((args, kwargs))
            return rec

    def count(self, name) -> int:
        with self.lock:
            return sum(1 for r in self.conns for e in r.events if e[0] == name)

    def snapshot(self):
        with self.lock:
            return list(self.conns)


class ConnRecord:
    def __init__(self, log: Log, index: int):
        self.log = log
        self.index = index
        self.events: list = []
        self.data = bytearray()
        self.datagrams: list = []
        self.data_types: set = set()
        self.transport = None
        self.proto = None
        self.lost_exc = None
        self.checks: dict = {}

    def add(self, *event):
        log = self.log
        with log.lock:
            self.events.append(event)
            log.thread_ids.add(threading.get_ident())
            if event[0] == "connection_made":
                log.open += 1
                log.peak_open = max(log.peak_open, log.open)
            elif event[0] == "connection_lost":
                log.open -= 1

    def names(self):
        with self.log.lock:
            return [e[0] for e in self.events]

    @property
    def lost(self) -> bool:
        return "connection_lost" in self.names()

    def seq(self, flow=False):
        """Normalized callback sequence: runs of data_received collapse to one,
        connection_lost shows the type name of its argument; pause_writing and
        resume_writing (timing-dependent unless a test provokes them) are left
        out unless ``flow``."""
        out = []
        with self.log.lock:
            events = list(self.events)
        for ev in events:
            name = ev[0]
            if not flow and name in ("pause_writing", "resume_writing"):
                continue
            if name == "data_received" and out and out[-1] == "data_received":
                continue
            if name in ("connection_lost", "error_received"):
                name = f"{name}({exc_name(ev[1])})"
            out.append(name)
        return out


class Recording:
    """Mixin recording every callback; put logic classes before it and a base
    (``asyncio.Protocol``, ``asyncio.DatagramProtocol`` or ``object``) after it."""

    log: Log  # set on the per-test subclass

    def __init__(self, *args, **kwargs):
        self.rec = type(self).log.new(args, kwargs)
        self.rec.proto = self
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        self.rec.transport = transport
        self.rec.add("connection_made")

    def data_received(self, data):
        self.rec.data += data
        self.rec.data_types.add(type(data))
        self.rec.add("data_received")

    def eof_received(self):
        self.rec.add("eof_received")
        return None

    def connection_lost(self, exc):
        self.rec.lost_exc = exc
        self.rec.add("connection_lost", exc)

    def pause_writing(self):
        self.rec.add("pause_writing")

    def resume_writing(self):
        self.rec.add("resume_writing")

    def datagram_received(self, data, addr):
        self.rec.datagrams.append((bytes(data), addr))
        self.rec.add("datagram_received")

    def error_received(self, exc):
        self.rec.add("error_received", exc)


def make_protocol(*logic, base=asyncio.Protocol, name="TestProtocol"):
    """A fresh protocol class (with a fresh ``log``) from logic mixins."""
    bases = tuple(logic) + (Recording,) + (() if base is object else (base,))
    return type(name, bases, {"log": Log()})


def make_dgram_protocol(*logic, base=asyncio.DatagramProtocol):
    return make_protocol(*logic, base=base, name="TestDatagramProtocol")


# -- logic mixins ------------------------------------------------------------

class Echo:
    def data_received(self, data):
        super().data_received(data)
        self.transport.write(data)


class ProbeTransport:
    """Records what the transport reports in connection_made."""

    def connection_made(self, transport):
        super().connection_made(transport)
        c = self.rec.checks
        c["can_write_eof"] = transport.can_write_eof()
        c["is_closing"] = transport.is_closing()
        c["is_reading"] = transport.is_reading()
        c["write_buffer_size"] = transport.get_write_buffer_size()
        c["peername"] = transport.get_extra_info("peername")
        c["sockname"] = transport.get_extra_info("sockname")
        sock = transport.get_extra_info("socket")
        c["socket"] = (sock is not None and sock.fileno() >= 0,
                       int(sock.family) if sock is not None else None,
                       int(sock.type) if sock is not None else None)
        del sock
        c["unknown_default"] = transport.get_extra_info("no-such-key", "dflt")
        c["unknown_none"] = transport.get_extra_info("no-such-key")
        try:
            transport.write("text is not bytes")
        except TypeError:
            c["write_str"] = "TypeError"
        else:
            c["write_str"] = None


# ---------------------------------------------------------------------------
# backends
# ---------------------------------------------------------------------------

class Runner:
    """A server running ``proto`` in a background thread on one backend."""

    def __init__(self, proto, kind):
        self.proto = proto
        self.kind = kind
        self.address = None
        self.exception: BaseException | None = None  # raised by the serve loop
        self.finished = threading.Event()
        self.thread = None
        self.stopped = False
        self.tmpdir = None
        self.server = None  # the fastsocketserver server, if any

    # client side ------------------------------------------------------------
    @property
    def family(self):
        return socket.AF_UNIX if self.kind in ("unix", "unix_dgram") else socket.AF_INET

    def connect(self, timeout=CLIENT_TIMEOUT) -> socket.socket:
        s = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            s.settimeout(timeout)
            s.connect(self.address)
        except BaseException:
            s.close()
            raise
        return s

    def dgram_client(self, timeout=CLIENT_TIMEOUT) -> socket.socket:
        s = socket.socket(self.family, socket.SOCK_DGRAM)
        try:
            s.settimeout(timeout)
            if self.family == socket.AF_UNIX:
                s.bind(self.new_path("c"))
            else:
                s.bind(("127.0.0.1", 0))
        except BaseException:
            s.close()
            raise
        return s

    _n = 0

    def new_path(self, stem="s"):
        if self.tmpdir is None:
            self.tmpdir = tempfile.mkdtemp(prefix="fssp", dir="/tmp")
        Runner._n += 1
        return os.path.join(self.tmpdir, f"{stem}{Runner._n}")

    def cleanup_dir(self):
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None


class AsyncioRunner(Runner):
    backend = "asyncio"

    def __init__(self, proto, kind, *, backlog=None, **_ignored):
        super().__init__(proto, kind)
        self.backlog = backlog or 100
        self.loop = asyncio.new_event_loop()
        self.loop_errors: list = []
        self.loop.set_exception_handler(lambda loop, ctx: self.loop_errors.append(ctx))
        self.srv = None
        self.start_error = None
        self.ready = threading.Event()

    async def _create(self):
        loop = self.loop
        if self.kind == "tcp":
            srv = await loop.create_server(self.proto, "127.0.0.1", 0, backlog=self.backlog)
            return srv, srv.sockets[0].getsockname()
        if self.kind == "unix":
            path = self.new_path()
            srv = await loop.create_unix_server(self.proto, path, backlog=self.backlog)
            return srv, path
        if self.kind == "udp":
            tr, _ = await loop.create_datagram_endpoint(self.proto, local_addr=("127.0.0.1", 0))
            return tr, tr.get_extra_info("sockname")
        if self.kind == "unix_dgram":
            path = self.new_path()
            tr, _ = await loop.create_datagram_endpoint(
                self.proto, local_addr=path, family=socket.AF_UNIX)
            return tr, path
        raise ValueError(self.kind)

    def _run(self):
        try:
            self.srv, self.address = self.loop.run_until_complete(self._create())
        except BaseException as exc:
            self.start_error = exc
            self.ready.set()
            self.finished.set()
            return
        self.ready.set()
        try:
            self.loop.run_forever()
        except BaseException as exc:  # KeyboardInterrupt/SystemExit tests
            self.exception = exc
        finally:
            self.finished.set()

    def restart(self):
        """Run the loop again after run_forever() raised."""
        assert self.finished.is_set()
        self.thread.join(JOIN_TIMEOUT)
        self.finished.clear()
        self.exception = None

        def run():
            try:
                self.loop.run_forever()
            except BaseException as exc:
                self.exception = exc
            finally:
                self.finished.set()

        self.thread = threading.Thread(target=run, daemon=True, name="asyncio-loop")
        self.thread.start()

    def start(self):
        self.thread = threading.Thread(target=self._run, daemon=True, name="asyncio-loop")
        self.thread.start()
        assert self.ready.wait(JOIN_TIMEOUT), "asyncio server did not start"
        if self.start_error is not None:
            raise self.start_error

    async def _close_all(self):
        """The asyncio counterpart of shutdown() + server_close(): stop listening,
        close every open transport and wait for the connection_lost calls."""
        if self.srv is not None:
            self.srv.close()
        recs = self.proto.log.snapshot()
        for rec in recs:
            t = rec.transport
            if t is not None and not t.is_closing():
                t.close()
        deadline = self.loop.time() + 3.0
        while self.loop.time() < deadline:
            if all(rec.lost for rec in recs if rec.transport is not None):
                break
            await asyncio.sleep(0.005)
        for rec in recs:
            if rec.transport is not None and not rec.lost:
                rec.transport.abort()
        for _ in range(5):
            await asyncio.sleep(0)

    def stop(self):
        """Returns (seconds to stop serving, seconds to close)."""
        self.stopped = True
        t0 = time.monotonic()
        ok = True
        if not self.finished.is_set():
            fut = asyncio.run_coroutine_threadsafe(self._close_all(), self.loop)
            try:
                fut.result(JOIN_TIMEOUT)
            except Exception:
                ok = False
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(JOIN_TIMEOUT)
        else:
            self.thread.join(JOIN_TIMEOUT)
            if not self.thread.is_alive() and not self.loop.is_closed():
                # run_forever() ended with an exception: clean up from here
                self.loop.run_until_complete(self._close_all())
        elapsed = time.monotonic() - t0
        if not self.thread.is_alive():
            self.loop.close()
        self.cleanup_dir()
        return ok and not self.thread.is_alive(), elapsed, 0.0


class FastRunner(Runner):
    backend = "fast"

    def __init__(self, proto, kind, *, server_cls=None, attrs=None, backlog=None,
                 poll_interval=POLL_INTERVAL):
        super().__init__(proto, kind)
        mod = fast_module()
        base = getattr(mod, server_cls or DEFAULT_SERVER_CLASS[kind])
        attrs = dict(attrs or {})
        if backlog is not None:
            attrs["request_queue_size"] = backlog
        self.cls = type("Test" + base.__name__, (base,), attrs) if attrs else base
        self.poll_interval = poll_interval

    def _run(self):
        try:
            self.server.serve_forever(self.poll_interval)
        except BaseException as exc:  # recorded; tests check it
            self.exception = exc
        finally:
            self.finished.set()

    def restart(self):
        """serve_forever() again after it raised."""
        assert self.finished.is_set()
        self.thread.join(JOIN_TIMEOUT)
        self.finished.clear()
        self.exception = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="serve_forever")
        self.thread.start()

    def start(self):
        if self.kind in ("tcp", "udp"):
            addr = ("127.0.0.1", 0)
        else:
            addr = self.new_path()
        try:
            self.server = self.cls(addr, self.proto)
        except BaseException:
            self.cleanup_dir()
            raise
        self.address = self.server.server_address
        self.thread = threading.Thread(target=self._run, daemon=True, name="serve_forever")
        self.thread.start()

    def stop(self):
        """shutdown() (bounded), then server_close(); returns (ok, t_shutdown, t_close)."""
        self.stopped = True
        t0 = time.monotonic()
        shut_ok, _, shut_exc = call_with_timeout(self.server.shutdown)
        t1 = time.monotonic()
        close_exc = None
        try:
            self.server.server_close()
        except Exception as exc:
            close_exc = exc
        t2 = time.monotonic()
        self.thread.join(JOIN_TIMEOUT)
        self.cleanup_dir()
        if close_exc is not None:
            raise close_exc
        ok = shut_ok and shut_exc is None and not self.thread.is_alive()
        return ok, t1 - t0, t2 - t1


#: listen backlog for both backends (request_queue_size for fastsocketserver):
#: the stdlib default of 5 makes the kernel drop SYNs when a test connects many
#: clients at once, and each drop costs a 1 s retransmission on either backend
BACKLOG = 1024


def make_runner(backend, proto, kind="tcp", **kwargs):
    if kwargs.get("backlog") is None and kind in ("tcp", "unix"):
        kwargs["backlog"] = BACKLOG
    if backend == "asyncio":
        return AsyncioRunner(proto, kind, **kwargs)
    return FastRunner(proto, kind, **kwargs)


@contextlib.contextmanager
def running(backend, proto, kind="tcp", *, allow_exception=False, **kwargs):
    """Start ``proto`` on ``backend``; always stop it (bounded) on exit."""
    r = make_runner(backend, proto, kind, **kwargs)
    r.start()
    failed = False
    try:
        yield r
    except BaseException:
        failed = True
        raise
    finally:
        ok = True
        if not r.stopped:
            ok, _, _ = r.stop()
        if not failed:
            assert ok, f"{backend} server did not stop within the timeout"
            if r.exception is not None and not allow_exception:
                raise AssertionError(f"serve loop raised {r.exception!r}") from r.exception


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "fast":
        fast_module()
    return request.param


def wait_lost(log, n=1, timeout=WAIT_TIMEOUT):
    ok = wait_until(lambda: log.count("connection_lost") >= n, timeout)
    assert ok, f"connection_lost called {log.count('connection_lost')} time(s), expected {n}: " \
               f"{[r.seq() for r in log.snapshot()]}"


def wait_conns(log, n, timeout=WAIT_TIMEOUT):
    ok = wait_until(lambda: log.count("connection_made") >= n, timeout)
    assert ok, f"connection_made called {log.count('connection_made')} time(s), expected {n}"


def only_conn(log):
    recs = log.snapshot()
    assert len(recs) == 1, f"expected one protocol instance, got {len(recs)}"
    return recs[0]


# ---------------------------------------------------------------------------
# echo, transport surface
# ---------------------------------------------------------------------------

ECHO_MESSAGES = [b"hello", b"x" * 100_000, bytes(range(256)) * 3, b"\n"]


@pytest.mark.parametrize("kind", STREAM_KINDS)
@pytest.mark.parametrize("base", ["subclass", "duck-typed"])
def test_echo(backend, kind, base):
    P = make_protocol(ProbeTransport, Echo,
                      base=asyncio.Protocol if base == "subclass" else object)
    with running(backend, P, kind) as r:
        with r.connect() as c:
            client_name = c.getsockname()
            transcript = []
            for msg in ECHO_MESSAGES:
                c.sendall(msg)
                transcript.append(recv_exactly(c, len(msg)))
            c.shutdown(socket.SHUT_WR)
            tail = recv_until_eof(c)
        wait_lost(P.log)
        server_address = r.address
    rec = only_conn(P.log)
    assert transcript == ECHO_MESSAGES
    assert tail == b""
    assert bytes(rec.data) == b"".join(ECHO_MESSAGES)
    assert rec.seq() == ["connection_made", "data_received", "eof_received",
                         "connection_lost(None)"]
    assert P.log.init_args == [((), {})], "the protocol class is called with no arguments"
    assert rec.data_types == {bytes}
    family = socket.AF_INET if kind == "tcp" else socket.AF_UNIX
    assert rec.checks == {
        "can_write_eof": True,
        "is_closing": False,
        "is_reading": True,
        "write_buffer_size": 0,
        "peername": client_name,
        "sockname": server_address,
        "socket": (True, int(family), int(socket.SOCK_STREAM)),
        "unknown_default": "dflt",
        "unknown_none": None,
        "write_str": "TypeError",
    }


def test_echo_many_sequential_and_interleaved(backend):
    P = make_protocol(Echo)
    with running(backend, P) as r:
        for i in range(5):
            with r.connect() as c:
                c.sendall(b"seq%d" % i)
                assert recv_exactly(c, 4) == b"seq%d" % i
        clients = [r.connect() for _ in range(5)]
        try:
            for rnd in range(3):
                for i, c in enumerate(clients):
                    c.sendall(b"<%d:%d>" % (i, rnd))
                for i, c in enumerate(clients):
                    want = b"<%d:%d>" % (i, rnd)
                    assert recv_exactly(c, len(want)) == want
        finally:
            for c in clients:
                c.close()
        wait_lost(P.log, 10)
    recs = P.log.snapshot()
    assert len(recs) == 10
    for rec in recs:
        assert rec.seq() == ["connection_made", "data_received", "eof_received",
                             "connection_lost(None)"]
    assert [bytes(r.data) for r in recs[5:]] == [
        b"".join(b"<%d:%d>" % (i, rnd) for rnd in range(3)) for i in range(5)]


# ---------------------------------------------------------------------------
# half-close
# ---------------------------------------------------------------------------

class EofReturns:
    """eof_received writes a trailer, then returns ``eof_result`` (falsy)."""
    eof_result = None

    def eof_received(self):
        super().eof_received()
        self.transport.write(b"[bye after %d]" % len(self.rec.data))
        return self.eof_result


@pytest.mark.parametrize("kind", STREAM_KINDS)
@pytest.mark.parametrize("result", [None, False])
def test_half_close_eof_received_false_closes(backend, kind, result):
    P = make_protocol(EofReturns, Echo)
    P.eof_result = result
    with running(backend, P, kind) as r:
        with r.connect() as c:
            c.sendall(b"abc")
            assert recv_exactly(c, 3) == b"abc"
            c.sendall(b"defg")
            assert recv_exactly(c, 4) == b"defg"
            c.shutdown(socket.SHUT_WR)
            rest = recv_until_eof(c)
        wait_lost(P.log)
    rec = only_conn(P.log)
    assert rest == b"[bye after 7]", "data written in eof_received reaches the peer before EOF"
    assert rec.seq() == ["connection_made", "data_received", "eof_received",
                         "connection_lost(None)"]


class KeepOpenOnEof:
    """eof_received returns True; the connection stays half-open until another
    connection says b"finish", which writes a late reply and closes it."""

    def eof_received(self):
        super().eof_received()
        if self.rec.index == 0:
            self.rec.checks["is_closing_after_eof"] = self.transport.is_closing()
        if self.rec.index != 0:
            return None
        self.transport.write(b"[eof seen]")
        return True

    def data_received(self, data):
        super().data_received(data)
        if self.rec.index == 0:
            self.transport.write(data.upper())
        elif b"finish" in bytes(self.rec.data):
            first = self.rec.log.conns[0].proto
            first.rec.checks["is_closing_before_close"] = first.transport.is_closing()
            first.transport.write(b"[late reply]")
            first.transport.close()
            self.transport.write(b"done")


@pytest.mark.parametrize("kind", STREAM_KINDS)
def test_half_close_eof_received_true_keeps_open(backend, kind):
    P = make_protocol(KeepOpenOnEof)
    with running(backend, P, kind) as r:
        with r.connect() as c:
            c.sendall(b"half")
            assert recv_exactly(c, 4) == b"HALF"
            c.shutdown(socket.SHUT_WR)
            assert recv_exactly(c, 10) == b"[eof seen]"
            wait_until(lambda: "eof_received" in P.log.conns[0].names())
            assert_silent(c)  # half-open: no EOF from the server yet
            assert not P.log.conns[0].lost
            with r.connect() as ctl:
                ctl.sendall(b"finish")
                assert recv_exactly(ctl, 4) == b"done"
            assert recv_until_eof(c) == b"[late reply]"
        wait_lost(P.log, 2)
    first = P.log.conns[0]
    assert first.seq() == ["connection_made", "data_received", "eof_received",
                           "connection_lost(None)"]
    assert first.checks == {"is_closing_after_eof": False, "is_closing_before_close": False}


class WriteEofOnRequest:
    """On b"EOF-PLEASE": write b"ack", write_eof(), then go on receiving."""

    def data_received(self, data):
        super().data_received(data)
        if b"EOF-PLEASE" in data:
            t = self.transport
            t.write(b"ack")
            t.write_eof()
            c = self.rec.checks
            c["is_closing_after_write_eof"] = t.is_closing()
            try:
                t.write(b"too late")
            except RuntimeError:
                c["write_after_write_eof"] = "RuntimeError"
            else:
                c["write_after_write_eof"] = None


@pytest.mark.parametrize("kind", STREAM_KINDS)
def test_write_eof_half_close_from_server(backend, kind):
    P = make_protocol(WriteEofOnRequest)
    with running(backend, P, kind) as r:
        with r.connect() as c:
            c.sendall(b"EOF-PLEASE")
            assert recv_until_eof(c) == b"ack"
            # the server half-closed its side; ours is still open
            c.sendall(b"more data")
            assert wait_until(lambda: bytes(P.log.conns[0].data).endswith(b"more data"))
            c.shutdown(socket.SHUT_WR)
            wait_lost(P.log)
    rec = only_conn(P.log)
    assert bytes(rec.data) == b"EOF-PLEASEmore data"
    assert rec.seq() == ["connection_made", "data_received", "eof_received",
                         "connection_lost(None)"]
    assert rec.checks == {"is_closing_after_write_eof": False,
                          "write_after_write_eof": "RuntimeError"}


# ---------------------------------------------------------------------------
# close, abort, reset
# ---------------------------------------------------------------------------

class CloseOrAbort:
    def data_received(self, data):
        super().data_received(data)
        t = self.transport
        c = self.rec.checks
        if b"close" in data:
            t.write(b"bye")
            c["before"] = t.is_closing()
            t.close()
            c["after"] = t.is_closing()
            t.close()  # idempotent
        elif b"abort" in data:
            c["before"] = t.is_closing()
            t.abort()
            c["after"] = t.is_closing()
            try:
                t.write(b"ignored")  # asyncio drops writes after abort silently
            except Exception as exc:
                c["write_after_abort"] = type(exc).__name__
            else:
                c["write_after_abort"] = None
        else:
            t.write(data)


@pytest.mark.parametrize("kind", STREAM_KINDS)
@pytest.mark.parametrize("action", ["close", "abort"])
def test_close_and_abort(backend, kind, action):
    P = make_protocol(CloseOrAbort)
    with running(backend, P, kind) as r:
        with r.connect() as c:
            c.sendall(b"ping")
            assert recv_exactly(c, 4) == b"ping"
            c.sendall(action.encode())
            if action == "close":
                assert recv_until_eof(c) == b"bye"
            else:
                assert peer_end(c) in ("eof", "reset")
            wait_lost(P.log)
        # the server keeps serving
        with r.connect() as c2:
            c2.sendall(b"again")
            assert recv_exactly(c2, 5) == b"again"
    rec = P.log.conns[0]
    assert rec.seq() == ["connection_made", "data_received", "connection_lost(None)"]
    expected = {"before": False, "after": True}
    if action == "abort":
        expected["write_after_abort"] = None
    assert rec.checks == expected


class CloseAtOnce:
    def connection_made(self, transport):
        super().connection_made(transport)
        transport.write(b"go away")
        transport.close()


@pytest.mark.parametrize("kind", STREAM_KINDS)
def test_close_in_connection_made(backend, kind):
    P = make_protocol(CloseAtOnce)
    with running(backend, P, kind) as r:
        with r.connect() as c:
            assert recv_until_eof(c) == b"go away"
        wait_lost(P.log)
    assert only_conn(P.log).seq() == ["connection_made", "connection_lost(None)"]


def test_peer_reset_reports_connection_lost_with_exception(backend):
    P = make_protocol(Echo)
    with running(backend, P) as r:
        c = r.connect()
        try:
            c.sendall(b"hi")
            assert recv_exactly(c, 2) == b"hi"
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        finally:
            c.close()  # RST
        wait_lost(P.log)
        with r.connect() as c2:
            c2.sendall(b"still")
            assert recv_exactly(c2, 5) == b"still"
    rec = P.log.conns[0]
    assert rec.seq() == ["connection_made", "data_received",
                         "connection_lost(ConnectionResetError)"]
    assert isinstance(rec.lost_exc, ConnectionResetError)


# ---------------------------------------------------------------------------
# flow control
# ---------------------------------------------------------------------------

HIGH = 64 * 1024
LOW = 16 * 1024
CHUNK = 16 * 1024
TOTAL = 16 * 1024 * 1024
_PATTERN = bytes(range(251)) * ((CHUNK // 251) + 2)


def pattern(offset, n):
    start = offset % 251
    return _PATTERN[start:start + n]


def pattern_digest(total):
    h = hashlib.sha256()
    off = 0
    while off < total:
        n = min(CHUNK, total - off)
        h.update(pattern(off, n))
        off += n
    return h.hexdigest()


class Producer:
    """On b"go": write TOTAL bytes in CHUNKs, stop while paused, go on at
    resume_writing, close at the end."""

    def connection_made(self, transport):
        super().connection_made(transport)
        transport.set_write_buffer_limits(high=HIGH, low=LOW)
        self.rec.checks["limits"] = transport.get_write_buffer_limits()
        self.paused = False
        self.sent = 0
        self.max_buffer = 0
        self.buffer_at_pause = []

    def data_received(self, data):
        super().data_received(data)
        if b"go" in data:
            self.produce()

    def produce(self):
        t = self.transport
        while not self.paused and self.sent < TOTAL:
            n = min(CHUNK, TOTAL - self.sent)
            t.write(pattern(self.sent, n))
            self.sent += n
            self.max_buffer = max(self.max_buffer, t.get_write_buffer_size())
        if self.sent >= TOTAL and not t.is_closing():
            t.close()

    def pause_writing(self):
        super().pause_writing()
        self.paused = True
        self.buffer_at_pause.append(self.transport.get_write_buffer_size())

    def resume_writing(self):
        super().resume_writing()
        self.paused = False
        self.rec.checks.setdefault("buffer_at_resume", []).append(
            self.transport.get_write_buffer_size())
        self.produce()


def test_flow_control_pause_and_resume_writing(backend):
    P = make_protocol(Producer)
    expected_digest = pattern_digest(TOTAL)
    with running(backend, P) as r:
        c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            c.settimeout(CLIENT_TIMEOUT)
            c.connect(r.address)
            c.sendall(b"go")
            # the client does not read: the server must pause and stay paused
            assert wait_until(lambda: "pause_writing" in P.log.conns[0].names()
                              if P.log.conns else False), "pause_writing was never called"
            time.sleep(0.3)
            proto = P.log.conns[0].proto
            assert proto.paused, "resumed although the peer reads nothing"
            assert proto.sent < TOTAL
            names_while_stalled = P.log.conns[0].names()
            # now read everything
            h = hashlib.sha256()
            got = 0
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                data = c.recv(1 << 20)
                if not data:
                    break
                h.update(data)
                got += len(data)
            assert got == TOTAL
            assert h.hexdigest() == expected_digest
        finally:
            c.close()
        wait_lost(P.log)
    rec = P.log.conns[0]
    names = rec.seq(flow=True)
    assert names[:3] == ["connection_made", "data_received", "pause_writing"]
    assert names[-1] == "connection_lost(None)"
    flow = names[2:-1]
    assert flow and all(n in ("pause_writing", "resume_writing") for n in flow), names
    # strictly alternating, starting with pause, ending with resume
    assert flow == ["pause_writing", "resume_writing"] * (len(flow) // 2), names
    assert names_while_stalled[-1] == "pause_writing"
    assert rec.checks["limits"] == (LOW, HIGH)
    # bounded memory: the protocol stops at pause_writing, so the buffer never
    # holds much more than the high-water mark
    assert proto.max_buffer <= HIGH + CHUNK, proto.max_buffer
    assert all(HIGH < b <= HIGH + CHUNK for b in proto.buffer_at_pause), proto.buffer_at_pause
    assert all(b <= LOW for b in rec.checks["buffer_at_resume"])


class LimitsProbe:
    def connection_made(self, transport):
        super().connection_made(transport)
        c = self.rec.checks
        transport.set_write_buffer_limits()
        c["default"] = transport.get_write_buffer_limits()
        transport.set_write_buffer_limits(high=1000)
        c["high_only"] = transport.get_write_buffer_limits()
        transport.set_write_buffer_limits(high=100, low=10)
        c["both"] = transport.get_write_buffer_limits()
        transport.set_write_buffer_limits(low=8)
        c["low_only"] = transport.get_write_buffer_limits()
        try:
            transport.set_write_buffer_limits(high=10, low=100)
        except ValueError:
            c["low_above_high"] = "ValueError"
        else:
            c["low_above_high"] = None
        transport.write(b"ok")
        transport.close()


def test_write_buffer_limits(backend):
    P = make_protocol(LimitsProbe)
    with running(backend, P) as r:
        with r.connect() as c:
            assert recv_until_eof(c) == b"ok"
        wait_lost(P.log)
    assert P.log.conns[0].checks == {
        "default": (16 * 1024, 64 * 1024),
        "high_only": (250, 1000),
        "both": (10, 100),
        "low_only": (8, 32),
        "low_above_high": "ValueError",
    }


class PauseReading:
    """Connection 0 pauses reading on b"pause"; another connection sending
    b"resume" resumes it."""

    def data_received(self, data):
        super().data_received(data)
        log = self.rec.log
        if self.rec.index == 0:
            if data.startswith(b"pause"):
                self.transport.pause_reading()
                self.rec.checks["is_reading_paused"] = self.transport.is_reading()
                self.transport.write(b"paused")
            else:
                self.transport.write(data.upper())
        elif b"resume" in data:
            first = log.conns[0]
            log.notes.append(("resume", len(first.data)))
            first.transport.resume_reading()
            first.checks["is_reading_resumed"] = first.transport.is_reading()
            self.transport.write(b"resumed")


def test_pause_and_resume_reading(backend):
    P = make_protocol(PauseReading)
    with running(backend, P) as r:
        with r.connect() as c:
            c.sendall(b"pause")
            assert recv_exactly(c, 6) == b"paused"
            c.sendall(b"held back")
            assert_silent(c, 0.3)
            assert bytes(P.log.conns[0].data) == b"pause", "data delivered while paused"
            with r.connect() as ctl:
                ctl.sendall(b"resume")
                assert recv_exactly(ctl, 7) == b"resumed"
            assert recv_exactly(c, 9) == b"HELD BACK"
        wait_lost(P.log, 2)
    first = P.log.conns[0]
    assert P.log.notes == [("resume", 5)]
    assert bytes(first.data) == b"pauseheld back"
    assert first.checks == {"is_reading_paused": False, "is_reading_resumed": True}
    assert first.seq() == ["connection_made", "data_received", "eof_received",
                           "connection_lost(None)"]


# ---------------------------------------------------------------------------
# many connections
# ---------------------------------------------------------------------------

def open_many(r, log, n, batch=500, timeout=20.0):
    """Open ``n`` non-blocking connections in batches (each batch waits until
    the server made its protocols); returns the sockets (blocking flag off)."""
    socks = []
    deadline = time.monotonic() + timeout
    try:
        while len(socks) < n:
            new = []
            for _ in range(min(batch, n - len(socks))):
                s = socket.socket(r.family, socket.SOCK_STREAM)
                s.setblocking(False)
                socks.append(s)
                new.append(s)
                err = s.connect_ex(r.address)
                assert err in (0, errno.EINPROGRESS, errno.EAGAIN), os.strerror(err)
            with selectors.DefaultSelector() as sel:
                for s in new:
                    sel.register(s, selectors.EVENT_WRITE)
                pending = len(new)
                while pending:
                    left = deadline - time.monotonic()
                    assert left > 0, "connections did not complete in time"
                    for key, _ in sel.select(min(left, 1.0)):
                        err = key.fileobj.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        assert err == 0, os.strerror(err)
                        sel.unregister(key.fileobj)
                        pending -= 1
            wait_conns(log, len(socks), timeout=max(0.1, deadline - time.monotonic()))
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def exchange_many(socks, messages, timeout=20.0):
    """Send messages[i] on socks[i] (non-blocking) and read back as many bytes;
    returns the replies."""
    replies = [bytearray() for _ in socks]
    out = [memoryview(m) for m in messages]
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        for i, s in enumerate(socks):
            sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE, i)
        pending = len(socks)
        while pending:
            left = deadline - time.monotonic()
            assert left > 0, f"{pending} connections did not get their reply in time"
            for key, ev in sel.select(min(left, 1.0)):
                i = key.data
                s = key.fileobj
                if ev & selectors.EVENT_WRITE and out[i]:
                    sent = s.send(out[i])
                    out[i] = out[i][sent:]
                    if not out[i]:
                        sel.modify(s, selectors.EVENT_READ, i)
                if ev & selectors.EVENT_READ:
                    try:
                        data = s.recv(65536)
                    except BlockingIOError:
                        continue
                    assert data, f"connection {i} closed early"
                    replies[i] += data
                    if len(replies[i]) >= len(messages[i]) and not out[i]:
                        sel.unregister(s)
                        pending -= 1
    return [bytes(x) for x in replies]


def test_1000_concurrent_connections(backend):
    n = 1000
    raise_nofile(2 * n + 256)
    P = make_protocol(Echo)
    with running(backend, P) as r:
        socks = open_many(r, P.log, n)
        try:
            assert P.log.peak_open == n
            messages = [b"connection %04d says hello\n" % i * (1 + i % 3) for i in range(n)]
            replies = exchange_many(socks, messages)
            assert replies == messages
            assert P.log.open == n, "a connection ended before its client closed it"
        finally:
            for s in socks:
                s.close()
        wait_lost(P.log, n, timeout=20)
    recs = P.log.snapshot()
    assert len(recs) == n
    assert sorted(bytes(rec.data) for rec in recs) == sorted(messages)
    seqs = {tuple(rec.seq()) for rec in recs}
    assert seqs == {("connection_made", "data_received", "eof_received",
                     "connection_lost(None)")}


def test_shutdown_with_2000_open_connections(backend):
    n = 2000
    raise_nofile(2 * n + 256)
    gc.collect()
    fd0 = settled_fd_count()
    P = make_protocol(Echo)
    r = make_runner(backend, P)
    r.start()
    socks = []
    try:
        socks = open_many(r, P.log, n, timeout=30)
        assert P.log.open == n
        # a little traffic on some of them first
        sample = socks[:: n // 20]
        assert exchange_many(sample, [b"x%d" % i for i in range(len(sample))]) == \
            [b"x%d" % i for i in range(len(sample))]
        ok, t_shutdown, t_close = r.stop()
        assert ok, "the server did not stop"
        assert t_shutdown < 2.0, f"shutdown() took {t_shutdown:.2f}s"
        assert t_close < 5.0, f"closing took {t_close:.2f}s"
        assert r.exception is None, repr(r.exception)
        wait_lost(P.log, n, timeout=5)
        # every client sees its connection end
        ends = set()
        with selectors.DefaultSelector() as sel:
            for s in socks:
                sel.register(s, selectors.EVENT_READ)
            pending = len(socks)
            deadline = time.monotonic() + 10
            while pending and time.monotonic() < deadline:
                for key, _ in sel.select(0.5):
                    try:
                        data = key.fileobj.recv(65536)
                    except BlockingIOError:
                        continue
                    except ConnectionResetError:
                        data = None
                    if data:
                        continue
                    ends.add("eof" if data == b"" else "reset")
                    sel.unregister(key.fileobj)
                    pending -= 1
            assert pending == 0, f"{pending} clients still see an open connection"
    finally:
        for s in socks:
            s.close()
        if not r.stopped:
            r.stop()
    del socks
    assert ends <= {"eof", "reset"}
    # the protocols (and so their transports) are still referenced, as they
    # commonly are in user code: a closed transport must not hold a descriptor
    assert wait_until(lambda: settled_fd_count() <= fd0, timeout=5), \
        f"fd count {fd_count()} after shutdown, {fd0} before; open: {fd_targets()}"
    assert settled_fd_count() == fd0
    seqs = {tuple(rec.seq()) for rec in P.log.snapshot()}
    # lost exactly once each, with None (a clean close by the server)
    for s in seqs:
        assert s[0] == "connection_made" and s[-1] == "connection_lost(None)", s
        assert s.count("connection_lost(None)") == 1, s


def test_closed_connections_leave_nothing_behind(backend):
    """After the connections end and the server is closed, dropping our own
    references frees every protocol (which, like most real protocols, keeps
    ``self.transport``) and every descriptor: no uncollectable
    protocol <-> transport cycle, no descriptor kept by a dead transport."""
    gc.collect()
    fd0 = settled_fd_count()
    P = make_protocol(Echo)
    n = 50
    with running(backend, P) as r:
        clients = [r.connect() for _ in range(n)]
        try:
            for i, c in enumerate(clients):
                c.sendall(b"m%d" % i)
                assert recv_exactly(c, len(b"m%d" % i)) == b"m%d" % i
            for c in clients[: n // 2]:
                c.close()  # half end from the client side ...
            wait_lost(P.log, n // 2)
        except BaseException:
            for c in clients:
                c.close()
            raise
    # ... and half by server_close()
    for c in clients:
        c.close()
    wait_lost(P.log, n)
    refs = [weakref.ref(rec.proto) for rec in P.log.snapshot()]
    for rec in P.log.snapshot():
        rec.proto = None
        rec.transport = None
    del clients, r, rec
    gc.collect()
    alive = sum(ref() is not None for ref in refs)
    assert alive == 0, f"{alive} of {n} protocol instances are never freed"
    assert wait_until(lambda: settled_fd_count() <= fd0, timeout=5), \
        f"fd count {fd_count()} after close, {fd0} before; open: {fd_targets()}"


# ---------------------------------------------------------------------------
# hypothesis: segmentation and write sizes
# ---------------------------------------------------------------------------

class SegmentedEcho:
    """First line: comma-separated write sizes.  Then echoes everything after
    it, cut into pieces of those sizes (cycling), using write / bytearray
    write / writelines in turn; flushes the remainder at EOF and closes."""

    def connection_made(self, transport):
        super().connection_made(transport)
        self.buf = bytearray()
        self.sizes = None
        self.i = 0

    def data_received(self, data):
        super().data_received(data)
        self.buf += data
        if self.sizes is None:
            if b"\n" not in self.buf:
                return
            head, _, rest = bytes(self.buf).partition(b"\n")
            self.sizes = [int(x) for x in head.split(b",")]
            self.buf = bytearray(rest)
        self.flush(final=False)

    def flush(self, final):
        t = self.transport
        while self.buf:
            n = self.sizes[self.i % len(self.sizes)]
            if len(self.buf) < n and not final:
                break
            piece = bytes(self.buf[:n])
            del self.buf[:n]
            how = self.i % 3
            if how == 0:
                t.write(piece)
            elif how == 1:
                t.write(bytearray(piece))
            else:
                t.writelines([piece[: len(piece) // 2], memoryview(piece)[len(piece) // 2:]])
            self.i += 1

    def eof_received(self):
        super().eof_received()
        self.flush(final=True)
        return None  # closes after the buffered writes are sent


def send_segments_and_read(r, segments):
    """Send each segment with its own sendall (TCP_NODELAY) from a helper
    thread, half-close, read until EOF."""
    with r.connect() as c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        errors = []

        def sender():
            try:
                for seg in segments:
                    c.sendall(seg)
                c.shutdown(socket.SHUT_WR)
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=sender, daemon=True)
        t.start()
        try:
            got = recv_until_eof(c)
        finally:
            t.join(JOIN_TIMEOUT)
        assert not t.is_alive()
        if errors:
            raise errors[0]
        return got


@st.composite
def segmented_payloads(draw):
    payload = draw(st.binary(max_size=30_000))
    cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=12)))
    segments = []
    prev = 0
    for cut in cuts + [len(payload)]:
        if cut > prev:
            segments.append(payload[prev:cut])
        prev = cut
    sizes = draw(st.lists(st.integers(1, 5000), min_size=1, max_size=6))
    return payload, segments, sizes


def test_hypothesis_segmentation_and_write_sizes(backend):
    P = make_protocol(SegmentedEcho)
    with running(backend, P) as r:
        done = []

        @settings(max_examples=25, deadline=None, derandomize=False,
                  suppress_health_check=list(HealthCheck))
        @given(segmented_payloads())
        def check(case):
            payload, segments, sizes = case
            header = b",".join(b"%d" % s for s in sizes) + b"\n"
            # the header may be split from the payload or glued to its first part
            first = [header + segments[0]] + segments[1:] if segments and len(sizes) % 2 \
                else [header] + segments
            before = len(P.log.snapshot())
            got = send_segments_and_read(r, first)
            assert got == payload
            assert wait_until(lambda: len(P.log.snapshot()) > before
                              and P.log.snapshot()[before].lost)
            rec = P.log.snapshot()[before]
            assert bytes(rec.data) == header + payload
            assert rec.seq() == ["connection_made", "data_received", "eof_received",
                                 "connection_lost(None)"]
            done.append(len(payload))

        check()
        assert len(done) >= 10, done


# ---------------------------------------------------------------------------
# exceptions in callbacks
# ---------------------------------------------------------------------------

class Boom:
    """Raises ValueError in the callback named by ``where`` on connection 1."""
    where = "data_received"

    def data_received(self, data):
        super().data_received(data)
        if self.where == "data_received" and b"boom" in data:
            self.raised = ValueError("boom in data_received")
            raise self.raised
        self.transport.write(data)

    def eof_received(self):
        super().eof_received()
        if self.where == "eof_received" and b"boom" in self.rec.data:
            self.raised = ValueError("boom in eof_received")
            raise self.raised
        return None


class ErrorRecordingServer:
    """Mixin for fastsocketserver servers: records handle_error calls."""
    errors: list

    def handle_error(self, request, client_address):
        self.errors.append((request, client_address, sys.exc_info()[1]))


@pytest.mark.parametrize("where", ["data_received", "eof_received"])
def test_exception_in_callback_aborts_only_that_connection(backend, where):
    P = make_protocol(Boom)
    P.where = where
    errors = []
    kwargs = {}
    if backend == "fast":
        kwargs["attrs"] = {"handle_error": ErrorRecordingServer.handle_error,
                           "errors": errors}
    with running(backend, P, **kwargs) as r:
        with r.connect() as a:
            a.sendall(b"a1")
            assert recv_exactly(a, 2) == b"a1"
            with r.connect() as b:
                b_name = b.getsockname()
                b.sendall(b"boom")
                if where == "eof_received":
                    assert recv_exactly(b, 4) == b"boom"
                    b.shutdown(socket.SHUT_WR)
                assert peer_end(b) in ("eof", "reset")
            wait_lost(P.log)
            a.sendall(b"a2")
            assert recv_exactly(a, 2) == b"a2"
            with r.connect() as c:
                c.sendall(b"c1")
                assert recv_exactly(c, 2) == b"c1"
            assert not P.log.conns[0].lost
        wait_lost(P.log, 3)
        if backend == "asyncio":
            assert len(r.loop_errors) == 1
            assert r.loop_errors[0]["exception"] is P.log.conns[1].proto.raised
    boom = P.log.conns[1]
    expected = ["connection_made", "data_received"]
    if where == "eof_received":
        expected.append("eof_received")
    assert boom.seq() == expected + ["connection_lost(ValueError)"]
    assert boom.lost_exc is boom.proto.raised
    if backend == "fast":
        assert len(errors) == 1, errors
        _request, client_address, exc = errors[0]
        assert client_address == b_name
        assert exc is boom.proto.raised


class RaiseBase:
    to_raise = KeyboardInterrupt

    def data_received(self, data):
        super().data_received(data)
        if b"stop" in data:
            raise self.to_raise()
        self.transport.write(data)


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_keyboardinterrupt_and_systemexit_propagate(backend, exc_type):
    P = make_protocol(RaiseBase)
    P.to_raise = exc_type
    with running(backend, P, allow_exception=True) as r:
        with r.connect() as c:
            c.sendall(b"x")
            assert recv_exactly(c, 1) == b"x"
            c.sendall(b"stop")
            assert r.finished.wait(WAIT_TIMEOUT), "the serve loop did not stop"
            assert type(r.exception) is exc_type
            # serving again resumes the same connections, as after a
            # KeyboardInterrupt in the stdlib or in loop.run_forever()
            r.restart()
            c.sendall(b"again")
            assert recv_exactly(c, 5) == b"again"
            with r.connect() as c2:
                c2.sendall(b"new")
                assert recv_exactly(c2, 3) == b"new"
        wait_lost(P.log, 2)
    rec = P.log.conns[0]
    assert bytes(rec.data) == b"xstopagain"
    assert rec.seq() == ["connection_made", "data_received", "eof_received",
                         "connection_lost(None)"]


# ---------------------------------------------------------------------------
# datagrams
# ---------------------------------------------------------------------------

class DgramUpper:
    def connection_made(self, transport):
        super().connection_made(transport)
        c = self.rec.checks
        c["sockname"] = transport.get_extra_info("sockname")
        sock = transport.get_extra_info("socket")
        c["socket"] = (sock.fileno() >= 0, int(sock.family), int(sock.type))
        del sock
        c["is_closing"] = transport.is_closing()
        c["write_buffer_size"] = transport.get_write_buffer_size()
        c["unknown_default"] = transport.get_extra_info("no-such-key", "dflt")

    def datagram_received(self, data, addr):
        super().datagram_received(data, addr)
        if data == b"bad" and isinstance(addr, str):
            # a path nobody is bound to: asyncio reports error_received
            self.transport.sendto(b"x", addr + "-nobody")
        # (asyncio's sendto() drops an empty datagram: always reply with something)
        self.transport.sendto(data.upper() + b"!", addr)


DGRAM_MESSAGES = [b"one", b"", b"two words", bytes(range(256)) * 31]


@pytest.mark.parametrize("kind", ["udp", "unix_dgram"])
def test_datagrams_with_addresses(backend, kind):
    P = make_dgram_protocol(DgramUpper)
    with running(backend, P, kind) as r:
        wait_conns(P.log, 1)
        a, b = r.dgram_client(), r.dgram_client()
        try:
            expected = []
            for msg in DGRAM_MESSAGES:
                for cl in (a, b):
                    cl.sendto(msg, r.address)
                    data, src = cl.recvfrom(65536)
                    assert data == msg.upper() + b"!"
                    assert src == r.address
                    expected.append((msg, cl.getsockname()))
        finally:
            a.close()
            b.close()
        server_address = r.address
    rec = only_conn(P.log)
    assert rec.datagrams == expected
    assert rec.seq() == ["connection_made"] + ["datagram_received"] * len(expected) + [
        "connection_lost(None)"]
    family = socket.AF_INET if kind == "udp" else socket.AF_UNIX
    assert rec.checks == {
        "sockname": server_address,
        "socket": (True, int(family), int(socket.SOCK_DGRAM)),
        "is_closing": False,
        "write_buffer_size": 0,
        "unknown_default": "dflt",
    }
    assert P.log.init_args == [((), {})]


def test_unix_datagram_error_received(backend):
    P = make_dgram_protocol(DgramUpper)
    with running(backend, P, "unix_dgram") as r:
        wait_conns(P.log, 1)
        with r.dgram_client() as c:
            c.sendto(b"bad", r.address)
            data, _ = c.recvfrom(100)
            assert data == b"BAD!", "the server keeps serving after the error"
            assert wait_until(lambda: P.log.count("error_received") == 1)
    rec = only_conn(P.log)
    assert rec.seq() == ["connection_made", "datagram_received",
                         "error_received(FileNotFoundError)", "connection_lost(None)"]


def test_duck_typed_datagram_protocol(backend):
    P = make_dgram_protocol(DgramUpper, base=object)
    with running(backend, P, "udp") as r:
        wait_conns(P.log, 1)
        with r.dgram_client() as c:
            c.sendto(b"duck", r.address)
            assert c.recvfrom(100)[0] == b"DUCK!"
    assert only_conn(P.log).seq() == ["connection_made", "datagram_received",
                                      "connection_lost(None)"]


# ---------------------------------------------------------------------------
# fastsocketserver only: server API around protocols
# ---------------------------------------------------------------------------

@pytest.fixture
def fss():
    return fast_module()


def test_fast_forking_server_refuses_protocol(fss):
    P = make_protocol(Echo)
    gc.collect()
    before = settled_fd_count()
    with pytest.raises(TypeError):
        fss.ForkingTCPServer(("127.0.0.1", 0), P)
    assert settled_fd_count() == before, "a descriptor leaked"
    assert P.log.conns == []


@pytest.mark.parametrize("server_cls", ["TCPServer", "ThreadingTCPServer"])
def test_fast_callbacks_run_on_one_reactor_thread(fss, server_cls):
    P = make_protocol(Echo)
    threads_before = threading.active_count()
    with running("fast", P, server_cls=server_cls) as r:
        clients = [r.connect() for _ in range(30)]
        try:
            wait_conns(P.log, 30)
            for i, c in enumerate(clients):
                c.sendall(b"m%d" % i)
            for i, c in enumerate(clients):
                assert recv_exactly(c, len(b"m%d" % i)) == b"m%d" % i
            assert threading.active_count() <= threads_before + 2, \
                "a Python thread per connection"
        finally:
            for c in clients:
                c.close()
        wait_lost(P.log, 30)
    assert len(P.log.thread_ids) == 1, "callbacks ran on more than one thread"
    for rec in P.log.snapshot():
        assert rec.seq() == ["connection_made", "data_received", "eof_received",
                             "connection_lost(None)"]


def test_fast_threading_server_unix_echo(fss):
    P = make_protocol(Echo)
    with running("fast", P, "unix", server_cls="ThreadingUnixStreamServer") as r:
        with r.connect() as c:
            c.sendall(b"threaded unix")
            assert recv_exactly(c, 13) == b"threaded unix"
        wait_lost(P.log)


def test_fast_verify_request_false_creates_no_protocol(fss):
    P = make_protocol(Echo)
    seen = []
    peers = []

    def verify_request(self, request, client_address):
        # the request is the connection's transport
        seen.append(client_address)
        peers.append(request.get_extra_info("peername"))
        return len(seen) > 1  # refuse the first connection only

    with running("fast", P, attrs={"verify_request": verify_request}) as r:
        with r.connect() as c:
            name = c.getsockname()
            assert peer_end(c) in ("eof", "reset")
        assert P.log.conns == [], "a protocol was created for a refused connection"
        with r.connect() as c2:
            c2.sendall(b"ok")
            assert recv_exactly(c2, 2) == b"ok"
        wait_lost(P.log)
    assert seen[0] == name
    assert peers == seen
    assert len(P.log.conns) == 1


def test_fast_shutdown_is_prompt_with_long_poll_interval(fss):
    P = make_protocol(Echo)
    r = make_runner("fast", P, poll_interval=5.0)
    r.start()
    try:
        with r.connect() as c:
            c.sendall(b"x")
            assert recv_exactly(c, 1) == b"x"
            ok, t_shutdown, _ = r.stop()
            assert ok and t_shutdown < 1.0, t_shutdown
            assert peer_end(c) in ("eof", "reset"), "server_close() closes open connections"
    finally:
        if not r.stopped:
            r.stop()
    wait_lost(P.log)
    assert P.log.conns[0].seq() == ["connection_made", "data_received",
                                    "connection_lost(None)"]


def test_fast_context_manager_closes_connections(fss):
    P = make_protocol(Echo)
    with fss.TCPServer(("127.0.0.1", 0), P) as server:
        t = threading.Thread(target=server.serve_forever, args=(POLL_INTERVAL,), daemon=True)
        t.start()
        c = socket.create_connection(server.server_address, timeout=CLIENT_TIMEOUT)
        try:
            c.sendall(b"cm")
            assert recv_exactly(c, 2) == b"cm"
            finished, _, exc = call_with_timeout(server.shutdown)
            assert finished and exc is None
            t.join(JOIN_TIMEOUT)
            assert not t.is_alive()
            assert not P.log.conns[0].lost, "shutdown() alone closed the connection"
        except BaseException:
            call_with_timeout(server.shutdown)
            raise
    try:
        # __exit__ -> server_close(): connection_lost(None), peer sees the end
        wait_lost(P.log, timeout=5)
        assert peer_end(c) in ("eof", "reset")
    finally:
        c.close()
    assert P.log.conns[0].seq() == ["connection_made", "data_received",
                                    "connection_lost(None)"]


def test_fast_idle_timeout(fss):
    P = make_protocol(Echo)
    assert fss.TCPServer.idle_timeout is None
    with running("fast", P, attrs={"idle_timeout": 0.3}) as r:
        assert r.server.idle_timeout == 0.3
        with r.connect() as quiet, r.connect() as chatty:
            quiet.sendall(b"q")
            assert recv_exactly(quiet, 1) == b"q"
            t0 = time.monotonic()
            # the chatty one talks every 0.1 s for 0.9 s and survives
            while time.monotonic() - t0 < 0.9:
                chatty.sendall(b"c")
                assert recv_exactly(chatty, 1) == b"c"
                time.sleep(0.1)
            assert peer_end(quiet) in ("eof", "reset")
            elapsed = time.monotonic() - t0
            assert elapsed < 3.0
            quiet_rec = P.log.conns[0]
            assert quiet_rec.lost
            assert isinstance(quiet_rec.lost_exc, TimeoutError), quiet_rec.lost_exc
            assert not P.log.conns[1].lost
            chatty.sendall(b"still")
            assert recv_exactly(chatty, 5) == b"still"
    assert P.log.conns[0].seq() == ["connection_made", "data_received",
                                    "connection_lost(TimeoutError)"]


class RaiseIn:
    """Raises RuntimeError in ``where`` for the first connection only."""
    where = "connection_made"

    def connection_made(self, transport):
        super().connection_made(transport)
        if self.where == "connection_made" and self.rec.index == 0:
            self.raised = RuntimeError("boom in connection_made")
            raise self.raised

    def data_received(self, data):
        super().data_received(data)
        self.transport.write(data)

    def connection_lost(self, exc):
        super().connection_lost(exc)
        if self.where == "connection_lost" and self.rec.index == 0:
            self.raised = RuntimeError("boom in connection_lost")
            raise self.raised


@pytest.mark.parametrize("where", ["connection_made", "connection_lost"])
def test_fast_exception_in_connection_made_or_lost(fss, where):
    P = make_protocol(RaiseIn)
    P.where = where
    errors = []
    attrs = {"handle_error": ErrorRecordingServer.handle_error, "errors": errors}
    with running("fast", P, attrs=attrs) as r:
        with r.connect() as c:
            name = c.getsockname()
            if where == "connection_made":
                # that connection is aborted
                assert peer_end(c) in ("eof", "reset")
            else:
                c.sendall(b"hi")
                assert recv_exactly(c, 2) == b"hi"
        wait_lost(P.log)
        assert wait_until(lambda: len(errors) == 1), errors
        # the server keeps serving
        with r.connect() as c2:
            c2.sendall(b"next")
            assert recv_exactly(c2, 4) == b"next"
        wait_lost(P.log, 2)
    first = P.log.conns[0]
    _request, client_address, exc = errors[0]
    assert client_address == name
    assert exc is first.proto.raised
    if where == "connection_made":
        assert first.seq() == ["connection_made", "connection_lost(RuntimeError)"]
        assert first.lost_exc is first.proto.raised
    else:
        assert first.seq() == ["connection_made", "data_received", "eof_received",
                               "connection_lost(None)"]
    assert len(errors) == 1

