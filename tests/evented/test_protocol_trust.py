"""The event-driven path under the scenarios of issue 12 (trust).

Each test runs the same protocol on asyncio (the reference) and on fastsocketserver
where asyncio has a counterpart, with the helpers of ``test_protocol`` (the backends,
the recording protocols, bounded waits). The scenarios:

* descriptors are owned: no leak after close races (``server_close()`` while clients
  connect and send, a server collected without ``server_close()``);
* ``get_extra_info('socket')`` is a pseudo-socket that refuses I/O and never brings a
  closed descriptor number back;
* running the loop from inside one of its own callbacks raises ``RuntimeError``;
* datagrams of any size the socket allows are delivered whole;
* ``DatagramTransport.close()``/``abort()`` end the endpoint as in asyncio;
* ``pause_reading()`` holds every ``data_received``/``eof_received`` until
  ``resume_reading()``;
* ``pause_writing()`` is called as often as asyncio calls it for the same writer;
* ``asyncio.BufferedProtocol`` is served;
* ``serve_forever()`` racing ``shutdown()`` + ``server_close()`` and garbage collection
  never hangs.

Rules as in ``test_protocol``: loopback only, port 0 or a temp-dir Unix path, every
socket with a timeout, every loop bounded, every server stopped in ``finally``.
"""

from __future__ import annotations

import asyncio
import asyncio.trsock
import decimal
import fractions
import gc
import os
import socket
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import test_protocol as tp
from test_protocol import (
    CLIENT_TIMEOUT,
    Echo,
    backend,  # noqa: F401 -- the fixture
    make_dgram_protocol,
    make_protocol,
    recv_exactly,
    recv_until_eof,
    running,
    settled_fd_count,
    wait_conns,
    wait_lost,
    wait_until,
)

ROUND_TIMEOUT = 5.0


def fss():
    return tp.fast_module()


def send_in_background(c, payload):
    """sendall + SHUT_WR in a thread: a paused server may not read it all before the
    test resumes it."""
    def run():
        try:
            c.sendall(payload)
            c.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def call_soon(r, fn):
    """Run ``fn`` on the runner's loop thread (asyncio transports are not
    thread-safe) or, for fastsocketserver (whose transports are), right here."""
    if r.backend == "asyncio":
        done = threading.Event()
        box = {}

        def run():
            try:
                box["result"] = fn()
            finally:
                done.set()

        r.loop.call_soon_threadsafe(run)
        assert done.wait(ROUND_TIMEOUT), "the asyncio loop did not run the call"
        return box.get("result")
    return fn()


# ---------------------------------------------------------------------------
# 1. descriptors have owners: no leak after close races
# ---------------------------------------------------------------------------

def _hammer(address, stop, sent):
    """Connect, send, maybe read, close, until ``stop`` (each step bounded)."""
    deadline = time.monotonic() + 10
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            with socket.create_connection(address, timeout=0.5) as c:
                c.sendall(b"ping")
                sent.append(1)
                try:
                    c.recv(16)
                except OSError:
                    pass
        except OSError:
            pass


@pytest.mark.parametrize("how", ["shutdown_then_close", "close_while_serving", "collect_unclosed"])
def test_fd_count_back_to_start_after_close_races(how):
    mod = fss()
    P = make_protocol(Echo)
    gc.collect()
    before = settled_fd_count()
    for i in range(12):
        server = mod.TCPServer(("127.0.0.1", 0), P)
        stop = threading.Event()
        sent = []
        serve_exc = []

        def serve(server=server):
            try:
                server.serve_forever(0.05)
            except BaseException as exc:  # reported below
                serve_exc.append(exc)

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        clients = [threading.Thread(target=_hammer, args=(server.server_address, stop, sent),
                                    daemon=True) for _ in range(3)]
        for c in clients:
            c.start()
        try:
            assert wait_until(lambda: len(sent) >= 3 + i, ROUND_TIMEOUT)
            if how == "shutdown_then_close":
                server.shutdown()
                server.server_close()
            elif how == "close_while_serving":
                server.server_close()
                ok, _, exc = tp.call_with_timeout(server.shutdown, ROUND_TIMEOUT)
                assert ok and exc is None, "shutdown() after server_close() hung or failed"
            else:
                server.shutdown()
        finally:
            stop.set()
            for c in clients:
                c.join(ROUND_TIMEOUT)
            t.join(ROUND_TIMEOUT)
        assert not t.is_alive()
        assert not serve_exc, f"serve_forever() raised {serve_exc[0]!r}"
        del server, t, serve
        gc.collect()
    assert wait_until(lambda: settled_fd_count() <= before, ROUND_TIMEOUT), \
        f"{settled_fd_count() - before} descriptor(s) leaked"


# ---------------------------------------------------------------------------
# 2. get_extra_info('socket')
# ---------------------------------------------------------------------------

class SocketProbe:
    def connection_made(self, transport):
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        c = self.rec.checks
        c["type"] = type(sock).__module__ + "." + type(sock).__qualname__
        c["same"] = transport.get_extra_info("socket") is sock
        c["peer"] = sock.getpeername() == transport.get_extra_info("peername")
        c["family"] = int(sock.family)
        c["nodelay_set"] = sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c["nodelay"] = bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        for name in ("recv", "send", "close", "detach"):
            c[name] = hasattr(sock, name)
        try:
            sock.settimeout(1.0)
        except ValueError:
            c["settimeout"] = "ValueError"
        self.sock = sock
        transport.write(b"ok")
        transport.close()


def test_extra_info_socket_is_a_pseudo_socket(backend):
    P = make_protocol(SocketProbe)
    with running(backend, P) as r:
        with r.connect() as c:
            assert recv_until_eof(c) == b"ok"
        wait_lost(P.log)
    rec = tp.only_conn(P.log)
    assert rec.checks == {
        "type": "asyncio.trsock.TransportSocket",
        "same": True,
        "peer": True,
        "family": int(socket.AF_INET),
        "nodelay_set": None,
        "nodelay": True,
        "recv": False,
        "send": False,
        "close": False,
        "detach": False,
        "settimeout": "ValueError",
    }
    # after the connection's end the pseudo-socket is closed: it holds no number that
    # the kernel may have given to another socket since
    assert rec.proto.sock.fileno() == -1


class LateSocket:
    """Asks for the socket only in connection_lost (the connection's descriptor is
    closed by then on fastsocketserver) and from another thread after the end."""

    def connection_lost(self, exc):
        sock = self.transport.get_extra_info("socket")
        self.rec.checks["late"] = sock is None or sock.fileno() == -1 or \
            sock.getpeername() == self.transport.get_extra_info("peername")
        super().connection_lost(exc)


def test_extra_info_socket_never_resurrects_a_closed_descriptor():
    """Connections come and go while other threads keep asking closed and closing
    transports for their socket: every socket they get is either closed or the
    connection's own (same peer), never another connection that reused the number."""
    mod = fss()
    P = make_protocol(LateSocket, Echo)
    wrong = []
    stop = threading.Event()

    def probe():
        deadline = time.monotonic() + 20
        while not stop.is_set() and time.monotonic() < deadline:
            for rec in P.log.snapshot()[-20:]:
                t = rec.transport
                if t is None:
                    continue
                sock = t.get_extra_info("socket")
                if sock is None:
                    continue
                try:
                    if sock.fileno() != -1 and sock.getpeername() != t.get_extra_info("peername"):
                        wrong.append((sock.getpeername(), t.get_extra_info("peername")))
                except OSError:
                    pass

    with running("fast", P) as r:
        threads = [threading.Thread(target=probe, daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            for _ in range(150):
                with r.connect() as c:
                    c.sendall(b"x")
                    assert recv_exactly(c, 1) == b"x"
        finally:
            stop.set()
            for t in threads:
                t.join(ROUND_TIMEOUT)
        wait_lost(P.log, 150)
    assert not wrong, wrong[:3]
    assert all(rec.checks["late"] for rec in P.log.snapshot())


# ---------------------------------------------------------------------------
# 3. re-entrance
# ---------------------------------------------------------------------------

class Reenter:
    """Runs the loop again from data_received (``reenter`` is set per backend)."""

    reenter = None

    def data_received(self, data):
        super().data_received(data)
        try:
            type(self).reenter()
        except BaseException as exc:
            self.rec.checks["exc"] = type(exc).__name__
        else:
            self.rec.checks["exc"] = None
        self.transport.write(data)


@pytest.mark.parametrize("call", ["handle_request", "serve_forever"])
def test_running_the_loop_from_a_callback_raises_runtime_error(backend, call):
    P = make_protocol(Reenter, name="Reenter")
    r = tp.make_runner(backend, P, "tcp", backlog=tp.BACKLOG)
    r.start()
    try:
        if backend == "asyncio":
            P.reenter = staticmethod(r.loop.run_forever)
        else:
            P.reenter = staticmethod(getattr(r.server, call))
        for i in range(2):
            with r.connect() as c:
                c.sendall(b"hi")
                assert recv_exactly(c, 2) == b"hi", "the serving thread is stuck"
        wait_lost(P.log, 2)
    finally:
        ok, _, _ = tp.call_with_timeout(r.stop, ROUND_TIMEOUT * 2)
    assert ok, "the server did not stop"
    assert [rec.checks["exc"] for rec in P.log.snapshot()] == ["RuntimeError"] * 2


# ---------------------------------------------------------------------------
# 4. datagrams of any size the socket allows
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind,size", [("unix_dgram", 70_000), ("unix_dgram", 100_000),
                                       ("unix_dgram", 200_000), ("udp", 65_507)])
def test_large_datagrams_are_delivered_whole(backend, kind, size):
    P = make_dgram_protocol()
    payload = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
    with running(backend, P, kind) as r:
        wait_conns(P.log, 1)
        with r.dgram_client() as c:
            c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            c.sendto(payload, r.address)
            c.sendto(b"after", r.address)
            assert wait_until(lambda: len(tp.only_conn(P.log).datagrams) >= 2)
    got = [d for d, _ in tp.only_conn(P.log).datagrams]
    assert [len(d) for d in got] == [size, 5]
    assert got == [payload, b"after"]


# ---------------------------------------------------------------------------
# 5. DatagramTransport.close() / abort()
# ---------------------------------------------------------------------------

class DgramCloser:
    """On the first datagram: answer it, close (or abort) the transport, then send once
    more. asyncio sends both datagrams at once (its transport tries every sendto right
    away, and an unconnected endpoint accepts sendto until its connection_lost);
    fastsocketserver queues them and sends them before it ends the endpoint."""

    action = "close"

    def datagram_received(self, data, addr):
        super().datagram_received(data, addr)
        t = self.transport
        if self.rec.checks.get("closed"):
            return
        t.sendto(b"reply:" + data, addr)
        getattr(t, type(self).action)()
        self.rec.checks["closed"] = True
        self.rec.checks["is_closing"] = t.is_closing()
        try:
            t.sendto(b"after " + type(self).action.encode(), addr)
        except Exception as exc:
            self.rec.checks["sendto_after"] = type(exc).__name__
        else:
            self.rec.checks["sendto_after"] = None


@pytest.mark.parametrize("action", ["close", "abort"])
def test_datagram_transport_close_and_abort(backend, action):
    P = make_dgram_protocol(DgramCloser)
    P.action = action
    with running(backend, P, "udp") as r:
        wait_conns(P.log, 1)
        with r.dgram_client() as c:
            c.sendto(b"one", r.address)
            assert c.recvfrom(100)[0] == b"reply:one"
            assert c.recvfrom(100)[0] == b"after " + action.encode()
            wait_lost(P.log)
            for i in range(3):
                c.sendto(b"more%d" % i, r.address)
            c.settimeout(0.3)
            with pytest.raises(socket.timeout):
                got = c.recvfrom(100)
                raise AssertionError(f"the closed endpoint answered {got!r}")
        lost_before_stop = tp.only_conn(P.log).seq()
    rec = tp.only_conn(P.log)
    assert lost_before_stop == ["connection_made", "datagram_received", "connection_lost(None)"]
    assert rec.seq() == lost_before_stop, "callbacks after connection_lost"
    assert rec.checks == {"closed": True, "is_closing": True, "sendto_after": None}


def test_fast_datagram_close_leaves_the_server_socket_open():
    """Closing the transport ends the endpoint, not the user's socket: the server keeps
    its socket until server_close()."""
    P = make_dgram_protocol(DgramCloser)
    with running("fast", P, "udp") as r:
        wait_conns(P.log, 1)
        with r.dgram_client() as c:
            c.sendto(b"one", r.address)
            assert c.recvfrom(100)[0] == b"reply:one"
            wait_lost(P.log)
            assert c.recvfrom(100)[0] == b"after close"
            assert r.server.socket.fileno() >= 0
            c.sendto(b"for the user", r.address)
            # the engine no longer reads the socket: the datagram waits for its owner
            r.server.socket.settimeout(CLIENT_TIMEOUT)
            assert r.server.socket.recvfrom(100)[0] == b"for the user"
            r.server.socket.settimeout(None)


# ---------------------------------------------------------------------------
# 6. pause_reading() holds data_received and eof_received
# ---------------------------------------------------------------------------

class Settle:
    """Holds the loop in connection_made until the client has sent everything (data
    and FIN), so that the first read finds the data and the end of stream together."""

    def connection_made(self, transport):
        super().connection_made(transport)
        time.sleep(0.1)


class PauseAtFirstData(Settle):
    """A proxy's shape: the first data_received stops reading (downstream is full);
    the test resumes it later."""

    def data_received(self, data):
        super().data_received(data)
        if not self.rec.checks.get("paused"):
            self.rec.checks["paused"] = True
            self.transport.pause_reading()

    def eof_received(self):
        super().eof_received()
        self.transport.write(b"%d" % len(self.rec.data))
        return False


@pytest.mark.parametrize("size", [100, 300_000])
def test_pause_reading_holds_data_and_eof_until_resume(backend, size):
    P = make_protocol(PauseAtFirstData)
    payload = bytes(range(256)) * (size // 256 + 1)
    payload = payload[:size]
    with running(backend, P) as r:
        with r.connect() as c:
            # data and FIN together: the server may read both in one go
            sender = send_in_background(c, payload)
            assert wait_until(lambda: P.log.count("data_received") >= 1)
            time.sleep(0.3)
            rec = tp.only_conn(P.log)
            while_paused = rec.names()
            assert call_soon(r, rec.transport.is_reading) is False
            call_soon(r, rec.transport.resume_reading)
            assert recv_until_eof(c) == b"%d" % size
            sender.join(ROUND_TIMEOUT)
        wait_lost(P.log)
    assert while_paused == ["connection_made", "data_received"], while_paused
    assert bytes(rec.data) == payload
    assert rec.seq() == ["connection_made", "data_received", "eof_received",
                         "connection_lost(None)"]


class PauseEveryChunk(Settle):
    """Pauses after every data_received; the test resumes it each time, so every
    chunk must come alone, in order."""

    def data_received(self, data):
        super().data_received(data)
        self.transport.pause_reading()


def test_pause_reading_after_every_chunk_keeps_order(backend):
    P = make_protocol(PauseEveryChunk)
    payload = bytes(range(256)) * 4000
    with running(backend, P) as r:
        with r.connect() as c:
            sender = send_in_background(c, payload)
            assert wait_until(lambda: P.log.count("data_received") >= 1)
            rec = tp.only_conn(P.log)
            deadline = time.monotonic() + 20
            while not rec.lost and time.monotonic() < deadline:
                n = P.log.count("data_received")
                time.sleep(0.002)
                assert P.log.count("data_received") == n, "data_received while paused"
                call_soon(r, rec.transport.resume_reading)
                wait_until(lambda: P.log.count("data_received") > n or rec.lost, 2)
            sender.join(ROUND_TIMEOUT)
        wait_lost(P.log)
    assert bytes(rec.data) == payload
    assert rec.seq()[-2:] == ["eof_received", "connection_lost(None)"]




# ---------------------------------------------------------------------------
# 7. write flow control: pause_writing()/resume_writing() as asyncio calls them
# ---------------------------------------------------------------------------

FLOW_TOTAL = 8 * 1024 * 1024
FLOW_CHUNK = 16 * 1024


class FlowWriter:
    """On b"go": write FLOW_TOTAL bytes in FLOW_CHUNKs while not paused (with the
    transport's default limits unless ``limits``), go on at resume_writing, close at
    the end. Records the buffer size at each pause and resume."""

    limits = None
    fail_in = ()  # flow callbacks that raise (after recording)

    def connection_made(self, transport):
        super().connection_made(transport)
        if self.limits is not None:
            transport.set_write_buffer_limits(**self.limits)
        self.rec.checks["limits"] = transport.get_write_buffer_limits()
        self.rec.checks["at_pause"] = []
        self.rec.checks["at_resume"] = []
        self.paused = False
        self.sent = 0

    def data_received(self, data):
        super().data_received(data)
        if b"go" in data:
            self.produce()

    def produce(self):
        t = self.transport
        while not self.paused and self.sent < FLOW_TOTAL:
            n = min(FLOW_CHUNK, FLOW_TOTAL - self.sent)
            t.write(tp.pattern(self.sent, n))
            self.sent += n
        if self.sent >= FLOW_TOTAL and not t.is_closing():
            t.close()

    def pause_writing(self):
        super().pause_writing()
        self.paused = True
        self.rec.checks["at_pause"].append(self.transport.get_write_buffer_size())
        if "pause_writing" in self.fail_in:
            raise ValueError("boom in pause_writing")

    def resume_writing(self):
        super().resume_writing()
        self.paused = False
        self.rec.checks["at_resume"].append(self.transport.get_write_buffer_size())
        if "resume_writing" in self.fail_in:
            # produce first, as a protocol that fails late would
            self.transport.get_extra_info("peername")
            try:
                self.produce()
            finally:
                raise ValueError("boom in resume_writing")
        self.produce()


def run_flow_writer(backend, P, **kwargs):
    """The writer against a client that reads nothing for a while, then everything.
    Returns (callbacks while stalled, the record, the runner)."""
    with running(backend, P, **kwargs) as r:
        with r.connect() as c:
            c.sendall(b"go")
            assert wait_until(lambda: P.log.count("pause_writing") >= 1), \
                "pause_writing was never called"
            time.sleep(0.3)
            rec = tp.only_conn(P.log)
            stalled = rec.names()
            got = bytearray()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                data = c.recv(1 << 16)
                if not data:
                    break
                got += data
        wait_lost(P.log)
    assert len(got) == FLOW_TOTAL
    assert bytes(got) == b"".join(tp.pattern(o, min(FLOW_CHUNK, FLOW_TOTAL - o))
                                  for o in range(0, FLOW_TOTAL, FLOW_CHUNK))
    return stalled, rec, r


@pytest.mark.parametrize("limits", [None, {"high": 256 * 1024}, {"high": 4096, "low": 0},
                                    {"high": 4096.5, "low": 100.25}])
def test_pause_writing_called_as_often_as_asyncio(limits):
    """The same writer on both backends: while the peer reads nothing, exactly one
    pause_writing and no resume_writing (the kernel's buffers fill first, then the
    transport's); once the peer reads, as many pauses as asyncio, within a small
    tolerance (how often the writer outruns the reader depends on scheduling)."""
    fss()
    counts = {}
    for backend in ("asyncio", "fast"):
        P = make_protocol(FlowWriter)
        P.limits = limits
        stalled, rec, _ = run_flow_writer(backend, P)
        low, high = rec.checks["limits"]
        assert stalled.count("pause_writing") == 1, (backend, stalled)
        assert stalled.count("resume_writing") == 0, (backend, stalled)
        names = rec.seq(flow=True)
        flow = names[2:-1]
        assert flow == ["pause_writing", "resume_writing"] * (len(flow) // 2), (backend, names)
        assert names[-1] == "connection_lost(None)"
        assert all(high < b <= high + FLOW_CHUNK for b in rec.checks["at_pause"]), \
            (backend, rec.checks["at_pause"])
        assert all(b <= low for b in rec.checks["at_resume"]), (backend, rec.checks)
        counts[backend] = flow.count("pause_writing")
    assert abs(counts["fast"] - counts["asyncio"]) <= max(3, counts["asyncio"] // 2), counts


@pytest.mark.parametrize("where", ["pause_writing", "resume_writing"])
def test_flow_callback_exception_goes_to_the_error_handler(backend, where):
    """asyncio sends an exception from pause_writing()/resume_writing() to the loop's
    exception handler and leaves the connection open; here it goes to handle_error."""
    P = make_protocol(FlowWriter)
    P.fail_in = (where,)
    errors = []
    kwargs = {}
    if backend == "fast":
        kwargs["attrs"] = {"handle_error": tp.ErrorRecordingServer.handle_error,
                           "errors": errors}
    stalled, rec, r = run_flow_writer(backend, P, **kwargs)
    names = rec.seq(flow=True)
    assert names[-1] == "connection_lost(None)", names
    if backend == "asyncio":
        # (asyncio 3.11 also reports its own double _call_connection_lost when a
        # protocol closes from resume_writing: not the protocol's failure)
        ours = [ctx for ctx in r.loop_errors if ctx["message"].startswith("protocol.")]
        reported = [ctx["exception"] for ctx in ours]
        messages = {ctx["message"] for ctx in ours}
        assert messages == {f"protocol.{where}() failed"}, messages
    else:
        reported = [exc for _request, _addr, exc in errors]
        assert all(req is rec.transport for req, _a, _e in errors)
    assert reported and all(isinstance(e, ValueError) and where in str(e) for e in reported)
    assert len(reported) == names.count(where), (reported, names)


class BufferSizeProbe:
    """On b"small": write 1000 bytes and record the buffer size; on b"big": write
    16 MiB at once (the client reads nothing yet) and record it."""

    def data_received(self, data):
        super().data_received(data)
        t = self.transport
        if data == b"small":
            t.write(b"s" * 1000)
            self.rec.checks["small"] = t.get_write_buffer_size()
        elif data == b"big":
            t.write(b"b" * (16 << 20))
            self.rec.checks["big"] = t.get_write_buffer_size()
            self.rec.checks["big_paused"] = self.rec.names().count("pause_writing")
            t.close()


def test_write_buffer_size_is_what_the_socket_did_not_take(backend):
    """asyncio's write() sends at once, so its buffer holds only what the socket
    refused: 0 after a small write to an idle connection, the excess after a large
    one (with pause_writing called)."""
    P = make_protocol(BufferSizeProbe)
    with running(backend, P) as r:
        with r.connect() as c:
            c.sendall(b"small")
            assert recv_exactly(c, 1000) == b"s" * 1000
            c.sendall(b"big")
            assert wait_until(lambda: "big" in tp.only_conn(P.log).checks)
            assert len(recv_until_eof(c)) == 16 << 20
        wait_lost(P.log)
    checks = tp.only_conn(P.log).checks
    assert checks["small"] == 0
    assert 64 * 1024 < checks["big"] < 16 << 20
    assert checks["big_paused"] == 1


class LimitArgs:
    def connection_made(self, transport):
        super().connection_made(transport)
        c = self.rec.checks
        for args in [dict(high=-1), dict(low=-1), dict(high=10, low=11),
                     dict(high=-4, low=-1), dict(high=0), dict(high=0, low=0),
                     dict(low=0), dict(high=3), dict(low=5), dict(high=7, low=7)]:
            try:
                transport.set_write_buffer_limits(**args)
            except ValueError as exc:
                c[str(args)] = ("ValueError", str(exc))
            else:
                c[str(args)] = transport.get_write_buffer_limits()
        try:
            transport.set_write_buffer_limits("x")
        except TypeError:
            c["str"] = "TypeError"
        c["size"] = transport.get_write_buffer_size()
        transport.set_write_buffer_limits()
        c["default"] = transport.get_write_buffer_limits()
        transport.write(b"ok")
        transport.close()


def test_write_buffer_limit_arguments_as_asyncio(backend):
    P = make_protocol(LimitArgs)
    with running(backend, P) as r:
        with r.connect() as c:
            assert recv_until_eof(c) == b"ok"
        wait_lost(P.log)
    checks = tp.only_conn(P.log).checks
    assert checks == {
        "{'high': -1}": ("ValueError", "high (-1) must be >= low (-1) must be >= 0"),
        "{'low': -1}": ("ValueError", "high (-4) must be >= low (-1) must be >= 0"),
        "{'high': 10, 'low': 11}": ("ValueError", "high (10) must be >= low (11) must be >= 0"),
        "{'high': -4, 'low': -1}": ("ValueError", "high (-4) must be >= low (-1) must be >= 0"),
        "{'high': 0}": (0, 0),
        "{'high': 0, 'low': 0}": (0, 0),
        "{'low': 0}": (0, 0),
        "{'high': 3}": (0, 3),
        "{'low': 5}": (5, 20),
        "{'high': 7, 'low': 7}": (7, 7),
        "str": "TypeError",
        "size": 0,
        "default": (16 * 1024, 64 * 1024),
    }


class NumericLimitArgs:
    """set_write_buffer_limits() with floats and other numbers, None and bad types:
    records, for each call, what get_write_buffer_limits() then returns (with the
    types) or the exception (type and message)."""

    CASES = [
        ("high float", dict(high=1000.5)),
        ("low float", dict(low=10.5)),
        ("both float", dict(high=100.0, low=25.0)),
        ("float high, int low", dict(high=7.5, low=7)),
        ("int high, float low", dict(high=8, low=7.5)),
        ("low float above high", dict(high=10, low=10.5)),
        ("negative float", dict(high=-0.5)),
        ("inf", dict(high=float("inf"))),
        ("inf both", dict(high=float("inf"), low=float("inf"))),
        ("nan", dict(high=float("nan"))),
        ("nan low", dict(high=10, low=float("nan"))),
        ("None None", dict(high=None, low=None)),
        ("True", dict(high=True)),
        ("Fraction", dict(high=fractions.Fraction(9, 2))),
        ("Decimal", dict(high=decimal.Decimal("10.5"))),
        ("huge int", dict(high=2 ** 80)),
        ("str high", dict(high="x")),
        ("str low", dict(low="x")),
        ("bytes", dict(high=b"", low=b"")),
        ("lists, low above", dict(high=[0], low=[1])),
        ("lists", dict(high=[1], low=[0])),
        ("object", dict(high=object())),
        ("positional", (200.0, 50.0)),
    ]

    def connection_made(self, transport):
        super().connection_made(transport)
        c = self.rec.checks
        for name, args in self.CASES:
            try:
                if isinstance(args, tuple):
                    transport.set_write_buffer_limits(*args)
                else:
                    transport.set_write_buffer_limits(**args)
            except Exception as exc:
                c[name] = (type(exc).__name__, str(exc))
            else:
                c[name] = [(type(v).__name__, repr(v)) for v in transport.get_write_buffer_limits()]
        transport.set_write_buffer_limits()
        transport.write(b"ok")
        transport.close()


def test_write_buffer_limits_floats_and_bad_types_as_asyncio():
    """asyncio computes the limits with Python's operators: floats (and other numbers)
    are kept as given, inf // 4 is nan (refused), and a bad type raises whatever its
    operators raise. Both backends record the same for every call."""
    fss()
    results = {}
    for backend in ("asyncio", "fast"):
        P = make_protocol(NumericLimitArgs)
        with running(backend, P) as r:
            with r.connect() as c:
                assert recv_until_eof(c) == b"ok"
            wait_lost(P.log)
        results[backend] = tp.only_conn(P.log).checks
    assert results["fast"] == results["asyncio"]
    # and what the comparison is about, so that it cannot pass vacuously
    assert results["asyncio"]["high float"] == [("float", "250.0"), ("float", "1000.5")]
    assert results["asyncio"]["inf"][0] == "ValueError"


# ---------------------------------------------------------------------------
# 8. asyncio.BufferedProtocol on stream connections
# ---------------------------------------------------------------------------

class BufferedRecording:
    """A BufferedProtocol recording get_buffer/buffer_updated; ``size`` is the length
    of each buffer it hands out; data arrives in ``rec.data``."""

    size = 65536
    give = "bytearray"  # or "memoryview", "empty", "bytes", "raise"

    def connection_made(self, transport):
        super().connection_made(transport)
        self.buf = bytearray(self.size)

    def get_buffer(self, sizehint):
        self.rec.add("get_buffer", sizehint)
        if self.give == "raise":
            self.raised = ValueError("boom in get_buffer")
            raise self.raised
        if self.give == "empty":
            return bytearray()
        if self.give == "bytes":
            return bytes(self.size)
        if self.give == "memoryview":
            return memoryview(self.buf)[: self.size]
        return self.buf

    def buffer_updated(self, nbytes):
        assert 0 < nbytes <= self.size
        chunk = bytes(self.buf[:nbytes])
        self.rec.data += chunk
        self.rec.add("buffer_updated", nbytes)
        self.on_chunk(chunk)

    def on_chunk(self, chunk):
        self.transport.write(chunk)


def buffered_seq(rec):
    """The callback sequence with each get_buffer + buffer_updated pair as "data" and
    runs of those collapsed (their number depends on how the bytes arrive)."""
    events = list(rec.events)
    out = []
    i = 0
    while i < len(events):
        name = events[i][0]
        if (name == "get_buffer" and i + 1 < len(events)
                and events[i + 1][0] == "buffer_updated"):
            if not out or out[-1] != "data":
                out.append("data")
            i += 2
            continue
        if name == "connection_lost":
            name = f"{name}({tp.exc_name(events[i][1])})"
        out.append(name)
        i += 1
    return out


@pytest.mark.parametrize("kind", ["tcp", "unix"])
@pytest.mark.parametrize("give", ["bytearray", "memoryview"])
def test_buffered_protocol_echo(backend, kind, give):
    P = make_protocol(BufferedRecording, base=asyncio.BufferedProtocol)
    P.give = give
    payload = bytes(range(256)) * 1000
    with running(backend, P, kind) as r:
        with r.connect() as c:
            c.sendall(b"hello")
            assert recv_exactly(c, 5) == b"hello"
            c.sendall(payload)
            assert recv_exactly(c, len(payload)) == payload
            c.shutdown(socket.SHUT_WR)
            assert recv_until_eof(c) == b""
        wait_lost(P.log)
    rec = tp.only_conn(P.log)
    assert bytes(rec.data) == b"hello" + payload
    names = rec.names()
    assert "data_received" not in names
    assert all(ev[1] == -1 for ev in rec.events if ev[0] == "get_buffer")
    # every buffer_updated follows its own get_buffer; one more get_buffer finds the EOF
    assert names.count("get_buffer") == names.count("buffer_updated") + 1, names
    assert buffered_seq(rec) == ["connection_made", "data", "get_buffer", "eof_received",
                                 "connection_lost(None)"], names


class DuckBuffered:
    """Duck-typed: no asyncio base class, no data_received."""

    made: list = []

    def __init__(self):
        self.events = []
        DuckBuffered.made.append(self)

    def connection_made(self, transport):
        self.transport = transport
        self.buf = bytearray(3)
        self.events.append("connection_made")

    def get_buffer(self, sizehint):
        return self.buf

    def buffer_updated(self, nbytes):
        self.events.append(bytes(self.buf[:nbytes]))
        self.transport.write(self.buf[:nbytes])

    def eof_received(self):
        self.events.append("eof_received")

    def connection_lost(self, exc):
        self.events.append("connection_lost")


def test_fast_duck_typed_buffered_protocol():
    """A class with get_buffer/buffer_updated and no data_received is served as a
    buffered protocol (asyncio itself only checks isinstance BufferedProtocol)."""
    fss()
    made = DuckBuffered.made
    made.clear()
    assert fss()._engine.is_protocol_class(DuckBuffered)
    with running("fast", DuckBuffered) as r:
        with r.connect() as c:
            c.sendall(b"duck!")
            assert recv_exactly(c, 5) == b"duck!"
            c.shutdown(socket.SHUT_WR)
            assert recv_until_eof(c) == b""
        assert wait_until(lambda: made and "connection_lost" in made[0].events)
    events = made[0].events
    assert events[0] == "connection_made"
    assert b"".join(e for e in events if isinstance(e, bytes)) == b"duck!"
    assert events[-2:] == ["eof_received", "connection_lost"]


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.sampled_from([1, 3, 7, 100, 4096]),
       segments=st.lists(st.binary(min_size=1, max_size=3000), min_size=1, max_size=8))
def test_buffered_protocol_small_buffers_and_segmentation(backend, size, segments):
    """Any buffer size, any segmentation: the bytes arrive whole and in order, no
    buffer_updated larger than its buffer (checked in the protocol)."""
    P = make_protocol(BufferedRecording, base=asyncio.BufferedProtocol)
    P.size = size
    payload = b"".join(segments)
    with running(backend, P) as r:
        with r.connect() as c:
            for seg in segments:
                c.sendall(seg)
            assert recv_exactly(c, len(payload)) == payload
            c.shutdown(socket.SHUT_WR)
            assert recv_until_eof(c) == b""
        wait_lost(P.log)
    rec = tp.only_conn(P.log)
    assert bytes(rec.data) == payload
    assert buffered_seq(rec)[-3:] == ["get_buffer", "eof_received", "connection_lost(None)"]


@pytest.mark.parametrize("give,exc", [("raise", "ValueError"), ("empty", "RuntimeError"),
                                      ("bytes", "TypeError")])
def test_buffered_protocol_bad_get_buffer(backend, give, exc):
    """get_buffer() raising, or returning an empty or read-only buffer, fails that
    connection: connection_lost(exc), the error reported, other connections served."""
    P = make_protocol(BufferedRecording, base=asyncio.BufferedProtocol)
    errors = []
    kwargs = {}
    if backend == "fast":
        kwargs["attrs"] = {"handle_error": tp.ErrorRecordingServer.handle_error,
                           "errors": errors}
    with running(backend, P, **kwargs) as r:
        with r.connect() as good:
            good.sendall(b"one")
            assert recv_exactly(good, 3) == b"one"
            with r.connect() as bad:
                wait_conns(P.log, 2)
                P.log.conns[1].proto.give = give  # before its first get_buffer
                bad.sendall(b"two")
                assert tp.peer_end(bad) in ("eof", "reset")
            wait_lost(P.log)
            good.sendall(b"three")
            assert recv_exactly(good, 5) == b"three"
        wait_lost(P.log, 2)
    rec = P.log.conns[1]
    assert rec.names() == ["connection_made", "get_buffer", "connection_lost"], rec.names()
    assert type(rec.lost_exc).__name__ == exc
    if give == "empty":
        assert str(rec.lost_exc) == "get_buffer() returned an empty buffer"
    if give == "raise":
        assert rec.lost_exc is rec.proto.raised
    if backend == "asyncio":
        assert [type(ctx["exception"]).__name__ for ctx in r.loop_errors] == [exc]
    else:
        assert [type(e).__name__ for _r, _a, e in errors] == [exc]
        assert errors[0][2] is rec.lost_exc


class BufferedEmptyAtEof(BufferedRecording):
    """Gives a buffer for data, an empty one after the peer's b"!" (so the read that
    finds the end of stream fails)."""

    def get_buffer(self, sizehint):
        if self.rec.data.endswith(b"!"):
            self.give = "empty"
        return super().get_buffer(sizehint)


def test_buffered_protocol_empty_buffer_at_eof(backend):
    P = make_protocol(BufferedEmptyAtEof, base=asyncio.BufferedProtocol)
    with running(backend, P) as r:
        with r.connect() as c:
            c.sendall(b"data!")
            assert recv_exactly(c, 5) == b"data!"
            c.shutdown(socket.SHUT_WR)
            assert tp.peer_end(c) in ("eof", "reset")
        wait_lost(P.log)
    rec = tp.only_conn(P.log)
    names = rec.names()
    assert "eof_received" not in names, names
    assert names[-2:] == ["get_buffer", "connection_lost"], names
    assert isinstance(rec.lost_exc, RuntimeError)


class BufferedCloseAfterFirst(BufferedRecording):
    """A 4-byte buffer; closes the transport at the first buffer_updated."""
    size = 4

    def on_chunk(self, chunk):
        self.transport.write(chunk)
        self.transport.close()


def test_buffered_protocol_close_in_buffer_updated_stops_delivery(backend):
    P = make_protocol(BufferedCloseAfterFirst, base=asyncio.BufferedProtocol)
    with running(backend, P) as r:
        with r.connect() as c:
            c.sendall(b"abcdefghij")
            # (the rest unread at the close: asyncio then resets the connection)
            assert tp.peer_end(c) in ("eof", "reset")
        wait_lost(P.log)
    rec = tp.only_conn(P.log)
    assert bytes(rec.data) == b"abcd"
    assert rec.names() == ["connection_made", "get_buffer", "buffer_updated",
                           "connection_lost"], rec.names()


class BufferedPauseAtFirst(BufferedRecording):
    """A 4-byte buffer; pauses reading at the first buffer_updated."""
    size = 4

    def on_chunk(self, chunk):
        self.transport.write(chunk)
        if len(self.rec.data) == len(chunk):
            self.transport.pause_reading()


def test_buffered_protocol_pause_reading_in_buffer_updated(backend):
    P = make_protocol(BufferedPauseAtFirst, base=asyncio.BufferedProtocol)
    payload = bytes(range(256)) * 40
    with running(backend, P) as r:
        with r.connect() as c:
            c.sendall(payload)
            assert recv_exactly(c, 4) == payload[:4]
            time.sleep(0.2)
            rec = tp.only_conn(P.log)
            assert bytes(rec.data) == payload[:4]
            call_soon(r, rec.transport.resume_reading)
            assert recv_exactly(c, len(payload) - 4) == payload[4:]
            c.shutdown(socket.SHUT_WR)
            assert recv_until_eof(c) == b""
        wait_lost(P.log)
    assert bytes(rec.data) == payload
    assert buffered_seq(rec) == ["connection_made", "data", "get_buffer", "eof_received",
                                 "connection_lost(None)"]


# ---------------------------------------------------------------------------
# 9. the loop's end: datagram endpoints, the listener, forked children
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["server_close", "dropped"])
def test_fast_loop_end_ends_the_datagram_transport(how):
    """server_close(), or the server collected without it: the datagram protocol gets
    connection_lost(None) once and its transport is dead (no sendto, no socket made
    on what may by now be another descriptor's number)."""
    fss()
    P = make_dgram_protocol()
    holder = {"server": fss().UDPServer(("127.0.0.1", 0), P)}
    address = holder["server"].server_address
    t = threading.Thread(target=holder["server"].serve_forever, args=(0.05,), daemon=True)
    t.start()
    try:
        wait_conns(P.log, 1)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
            c.settimeout(CLIENT_TIMEOUT)
            c.sendto(b"ping", address)
            assert wait_until(lambda: P.log.count("datagram_received") == 1)
    finally:
        holder["server"].shutdown()
        t.join(ROUND_TIMEOUT)
    assert not t.is_alive()
    rec = tp.only_conn(P.log)
    transport = rec.transport
    assert not transport.is_closing()
    if how == "server_close":
        holder["server"].server_close()
    else:
        with pytest.warns(ResourceWarning):  # the server's socket, as the stdlib's
            holder.clear()
            gc.collect()
    assert rec.names().count("connection_lost") == 1, rec.names()
    assert rec.lost_exc is None
    assert transport.is_closing()
    # the descriptor number is free now: whatever gets it is not the transport's
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
        assert transport.get_extra_info("socket") is None
        transport.sendto(b"ignored", ("127.0.0.1", 9))  # dropped without a word
    gc.collect()
    assert rec.names().count("connection_lost") == 1, rec.names()


class SwitchToQ:
    """Echoes; on b"switch" first hands the transport to a new ``Q`` protocol."""

    Q: type

    def data_received(self, data):
        super().data_received(data)
        if data == b"switch":
            new = self.Q()
            new.transport = new.rec.transport = self.transport
            self.transport.set_protocol(new)
        self.transport.write(data)


@pytest.mark.parametrize("how", ["server_close", "dropped"])
def test_fast_loop_end_ends_the_stream_connections(how):
    """server_close(), or the server collected without it: every open connection's
    protocol (the current one, after set_protocol()) gets connection_lost(None) once,
    its transport is dead, the peer sees the end, and no descriptor is left."""
    mod = fss()
    Q = make_protocol(Echo)
    P = make_protocol(SwitchToQ)
    P.Q = Q
    gc.collect()
    fd0 = settled_fd_count()
    holder = {"server": mod.TCPServer(("127.0.0.1", 0), P)}
    address = holder["server"].server_address
    t = threading.Thread(target=holder["server"].serve_forever, args=(0.05,), daemon=True)
    t.start()
    clients = []
    try:
        for msg in (b"one", b"two", b"switch"):
            c = socket.create_connection(address, timeout=CLIENT_TIMEOUT)
            clients.append(c)
            c.sendall(msg)
            assert recv_exactly(c, len(msg)) == msg
        clients[2].sendall(b"more")
        assert recv_exactly(clients[2], 4) == b"more"
    finally:
        holder["server"].shutdown()
        t.join(ROUND_TIMEOUT)
    try:
        assert not t.is_alive()
        recs = P.log.snapshot() + Q.log.snapshot()
        assert len(recs) == 4
        assert all(r.names().count("connection_lost") == 0 for r in recs)
        if how == "server_close":
            holder["server"].server_close()
        else:
            with pytest.warns(ResourceWarning):  # the server's socket, as the stdlib's
                holder.clear()
                gc.collect()
        told = [r.names().count("connection_lost") for r in recs]
        # P's third protocol handed its connection to Q's: Q's is told, not it
        assert told == [1, 1, 0, 1], [r.names() for r in recs]
        assert all(r.lost_exc is None for r in recs)
        assert all(r.transport.is_closing() for r in recs)
        for c in clients:
            assert recv_until_eof(c) == b""
    finally:
        for c in clients:
            c.close()
    del c, clients, t
    gc.collect()
    assert [r.names().count("connection_lost") for r in recs] == [1, 1, 0, 1]
    assert wait_until(lambda: settled_fd_count() <= fd0, ROUND_TIMEOUT), \
        f"{settled_fd_count() - fd0} descriptor(s) left"


class ForkInCallback:
    """On b"fork": os.fork(). The parent answers b"forked"; the child ends its copy of
    the loop (``child_end``: server_close() in the callback, or it leaves the loop
    with SystemExit, then closes or drops it) and exits. Anything else is echoed."""

    holder: dict
    child_end = "server_close"

    def data_received(self, data):
        super().data_received(data)
        if data != b"fork":
            self.transport.write(data)
            return
        pid = os.fork()
        if pid:
            self.holder["children"].append(pid)
            self.transport.write(b"forked")
            return
        # the child
        self.holder["child"] = True
        if self.child_end == "server_close":
            self.holder["server"].server_close()  # finished when this round ends
        else:
            raise SystemExit("child")


def _wait_child(pid, timeout=ROUND_TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    raise AssertionError("the forked child did not exit")


@pytest.mark.parametrize("child_end", ["server_close", "close", "dropped"])
def test_fast_forked_child_leaves_the_parents_poller_alone(child_end):
    """A child forked in a callback shares the parent's epoll instance: when it closes
    (or drops) its copy of the loop, the parent's connections and listener stay
    registered; the parent goes on serving both."""
    fss()
    P = make_protocol(ForkInCallback)
    holder = {"children": []}
    P.holder = holder
    P.child_end = child_end
    holder["server"] = fss().TCPServer(("127.0.0.1", 0), P)
    address = holder["server"].server_address
    parent = os.getpid()

    def serve():
        try:
            holder["server"].serve_forever(0.05)
        except SystemExit:
            if os.getpid() == parent:
                raise
        finally:
            if os.getpid() != parent:
                # the child: drop its copy of the loop (or what close left), then go
                code = 0
                try:
                    server = holder.pop("server")
                    loop = server._BaseServer__reactor
                    if child_end == "server_close":
                        assert loop is None
                    else:
                        # (its stale flag says whose it is: exit code 5 if not)
                        code = 0 if getattr(loop, "stale", None) is True else 5
                        if child_end == "close":
                            loop.close()  # with the listener still open here
                        server._BaseServer__reactor = None
                        del loop, server
                        gc.collect()
                except BaseException:
                    code = 3
                os._exit(code)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with socket.create_connection(address, timeout=CLIENT_TIMEOUT) as a:
            with socket.create_connection(address, timeout=CLIENT_TIMEOUT) as b:
                a.sendall(b"one")
                assert recv_exactly(a, 3) == b"one"
                b.sendall(b"fork")
                assert recv_exactly(b, 6) == b"forked"
                assert len(holder["children"]) == 1
                child_code = _wait_child(holder["children"][0])
                # the parent's registrations are intact: the listener's (the child's
                # close does not deregister it by number) ...
                with socket.create_connection(address, timeout=CLIENT_TIMEOUT) as c:
                    c.sendall(b"new")
                    assert recv_exactly(c, 3) == b"new"
                # ... and the connections' (nor does it or its drop deregister those)
                a.sendall(b"two")
                assert recv_exactly(a, 3) == b"two"
                b.sendall(b"three")
                assert recv_exactly(b, 5) == b"three"
        assert child_code == 0
    finally:
        holder["server"].shutdown()
        t.join(ROUND_TIMEOUT)
        holder["server"].server_close()
    assert not t.is_alive()


class ForkAndReturn:
    """On b"fork": os.fork(); the parent answers b"forked", the child just returns
    from the callback (closing nothing). Anything else is answered with the pid of
    the process that handled it."""

    holder: dict

    def data_received(self, data):
        super().data_received(data)
        if data == b"fork":
            pid = os.fork()
            if pid:
                self.holder["children"].append(pid)
                self.transport.write(b"forked")
            return
        self.transport.write(b"%08d:" % os.getpid() + data)


def test_fast_forked_child_that_returns_stops_serving_and_leaves_the_parent_its_events():
    """A child forked in a callback that comes back from it without closing anything:
    its serve_forever() returns (the loop is the parent's, so it polls it no more),
    run_once() on that loop raises RuntimeError, and serving again there makes a
    fresh loop. Meanwhile the parent gets every event: every message on the old
    connections and a new one is answered by the parent."""
    mod = fss()
    P = make_protocol(ForkAndReturn)
    holder = {"children": []}
    P.holder = holder
    server = mod.TCPServer(("127.0.0.1", 0), P)
    address = server.server_address
    parent = os.getpid()
    go_r, go_w = os.pipe()

    def serve():
        try:
            server.serve_forever(0.05)
            how = 0
        except BaseException:
            how = 1
        if os.getpid() == parent:
            return
        # the child: exit code = 0 if all went as it should, else bits saying what not
        code = how
        try:
            old = server._BaseServer__reactor
            if not old.stale:
                code |= 2
            try:
                old.run_once(0)
            except RuntimeError:
                pass
            else:
                code |= 4
            # wait (bounded) until the parent has exchanged its messages
            import select
            select.select([go_r], [], [], 20)
            server.timeout = 0.01
            server.handle_request()  # serving again: a loop of the child's own
            fresh = server._BaseServer__reactor
            if fresh is old or fresh.stale:
                code |= 8
            server.server_close()
        except BaseException:
            code |= 16
        os._exit(code)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    me = b"%08d:" % parent
    child = None
    try:
        with socket.create_connection(address, timeout=CLIENT_TIMEOUT) as a, \
                socket.create_connection(address, timeout=CLIENT_TIMEOUT) as b:
            a.sendall(b"one")
            assert recv_exactly(a, 12) == me + b"one"
            b.sendall(b"fork")
            assert recv_exactly(b, 6) == b"forked"
            child = holder["children"][0]
            # the child lives (waiting on the pipe) while the parent serves
            for i in range(30):
                for s in (a, b):
                    msg = b"m%03d" % i
                    s.sendall(msg)
                    assert recv_exactly(s, 13) == me + msg
            with socket.create_connection(address, timeout=CLIENT_TIMEOUT) as c:
                c.sendall(b"new")
                assert recv_exactly(c, 12) == me + b"new"
            assert os.waitpid(child, os.WNOHANG) == (0, 0), "the child is gone early"
        os.write(go_w, b"x")
        code = _wait_child(child)
        child = None
        assert code == 0, f"the child's checks failed (bits {code:#x})"
        # the parent's own record has every message
        datas = [bytes(r.data) for r in P.log.snapshot()]
        assert datas[:2] == [b"one" + b"".join(b"m%03d" % i for i in range(30)),
                             b"fork" + b"".join(b"m%03d" % i for i in range(30))]
    finally:
        if child is not None:
            os.kill(child, 9)
            os.waitpid(child, 0)
        os.close(go_r)
        os.close(go_w)
        server.shutdown()
        t.join(ROUND_TIMEOUT)
        server.server_close()
    assert not t.is_alive()


# ---------------------------------------------------------------------------
# 10. transport.set_protocol(): every later callback goes to the new protocol
# ---------------------------------------------------------------------------

class SwitchLog:
    """The callbacks of the protocols of one connection, in order, each named
    ``"<protocol>.<callback>"``; get_buffer + buffer_updated pairs are "data"."""

    def __init__(self):
        self.events = []
        self.lost = threading.Event()

    def add(self, who, what, *args):
        self.events.append((who, what) + args)

    def snapshot(self):
        # (the asyncio runner's close-all: these tests end every connection first)
        return []


class SwitchBase:
    """Echoes with its name as prefix; on b"switch:<name>" hands the transport to a
    new protocol of that name (without connection_made, as asyncio)."""

    name = "?"
    log: SwitchLog
    kinds: dict  # name -> class

    def __init__(self, transport=None):
        self.transport = transport

    def connection_made(self, transport):
        self.transport = transport
        self.log.add(self.name, "connection_made")

    def on_data(self, data):
        if data.startswith(b"switch:"):
            new = self.kinds[data[7:].decode()](self.transport)
            self.transport.set_protocol(new)
            self.log.add(self.name, "switched", self.transport.get_protocol() is new)
            self.transport.write(b"switched")
        else:
            self.transport.write(self.name.encode() + b":" + data)

    def eof_received(self):
        self.log.add(self.name, "eof_received")

    def connection_lost(self, exc):
        self.log.add(self.name, "connection_lost", tp.exc_name(exc))
        self.log.lost.set()

    def pause_writing(self):
        self.log.add(self.name, "pause_writing")

    def resume_writing(self):
        self.log.add(self.name, "resume_writing")
        self.transport.close()


class SwitchPlain(SwitchBase, asyncio.Protocol):
    def data_received(self, data):
        self.log.add(self.name, "data")
        self.on_data(data)


class SwitchBuffered(SwitchBase, asyncio.BufferedProtocol):
    def __init__(self, transport=None):
        super().__init__(transport)
        self.buf = bytearray(1 << 16)

    def get_buffer(self, sizehint):
        return self.buf

    def buffer_updated(self, nbytes):
        self.log.add(self.name, "data")
        self.on_data(bytes(self.buf[:nbytes]))


def switch_protocols():
    """Protocols A (plain), B (buffered), C (plain) sharing one fresh SwitchLog."""
    log = SwitchLog()
    kinds = {}
    for name, base in [("A", SwitchPlain), ("B", SwitchBuffered), ("C", SwitchPlain)]:
        kinds[name] = type(f"Switch{name}", (base,), {"name": name, "log": log, "kinds": kinds})
    return log, kinds


def switch_run(backend):
    """A -> B (BufferedProtocol) -> C: each message is answered by the protocol set
    last; the end of stream and connection_lost go to C. Returns (replies, events)."""
    log, kinds = switch_protocols()
    replies = []
    with running(backend, kinds["A"]) as r:
        with r.connect() as c:
            for msg in [b"one", b"switch:B", b"two", b"three", b"switch:C", b"four"]:
                c.sendall(msg)
                want = b"switched" if msg.startswith(b"switch:") else 2 + len(msg)
                want = want if isinstance(want, int) else len(want)
                replies.append(recv_exactly(c, want))
            c.shutdown(socket.SHUT_WR)
            assert recv_until_eof(c) == b""
        assert log.lost.wait(ROUND_TIMEOUT)
    return replies, log.events


def test_set_protocol_switches_every_callback_as_asyncio():
    fss()
    results = {backend: switch_run(backend) for backend in ("asyncio", "fast")}
    assert results["fast"] == results["asyncio"]
    replies, events = results["asyncio"]
    assert replies == [b"A:one", b"switched", b"B:two", b"B:three", b"switched", b"C:four"]
    assert events[-2:] == [("C", "eof_received"), ("C", "connection_lost", None)]


def test_set_protocol_resume_writing_goes_to_the_new_protocol():
    """A writes more than the socket takes (pause_writing: A's), then switches to C:
    once the peer reads, resume_writing is C's (which closes), and so is
    connection_lost."""
    fss()
    total = 16 << 20
    results = {}
    for backend in ("asyncio", "fast"):
        log, kinds = switch_protocols()

        class Writer(kinds["A"]):
            def data_received(self, data):
                self.log.add(self.name, "data")
                self.transport.write(b"x" * total)
                self.transport.set_protocol(kinds["C"](self.transport))

        with running(backend, Writer) as r:
            with r.connect() as c:
                c.sendall(b"go")
                assert wait_until(lambda: ("A", "pause_writing") in log.events)
                assert len(recv_until_eof(c)) == total
            assert log.lost.wait(ROUND_TIMEOUT)
        results[backend] = log.events
    assert results["fast"] == results["asyncio"]
    assert results["asyncio"] == [
        ("A", "connection_made"), ("A", "data"), ("A", "pause_writing"),
        ("C", "resume_writing"), ("C", "connection_lost", None),
    ]


class DgramSwitch:
    """Datagram protocol: answers with its name; on b"switch" hands the transport to
    a new protocol named B; on b"close" closes the transport."""

    name = "A"
    log: SwitchLog

    def __init__(self, transport=None):
        self.transport = transport

    def connection_made(self, transport):
        self.transport = transport
        self.log.add(self.name, "connection_made")

    def datagram_received(self, data, addr):
        self.log.add(self.name, "datagram", data)
        if data == b"switch":
            new = type(self)(self.transport)
            new.name = "B"
            self.transport.set_protocol(new)
        self.transport.sendto(self.name.encode() + b":" + data, addr)
        if data == b"close":
            self.transport.close()

    def error_received(self, exc):
        self.log.add(self.name, "error_received")

    def connection_lost(self, exc):
        self.log.add(self.name, "connection_lost", tp.exc_name(exc))
        self.log.lost.set()


def test_datagram_set_protocol_switches_callbacks_as_asyncio():
    fss()
    results = {}
    for backend in ("asyncio", "fast"):
        log = SwitchLog()
        P = type("DgramSwitchP", (DgramSwitch, asyncio.DatagramProtocol), {"log": log})
        replies = []
        with running(backend, P, kind="udp") as r:
            with r.dgram_client() as c:
                for msg in (b"one", b"switch", b"two", b"close"):
                    c.sendto(msg, r.address)
                    replies.append(c.recvfrom(100)[0])
            assert log.lost.wait(ROUND_TIMEOUT)
        results[backend] = (replies, log.events)
    assert results["fast"] == results["asyncio"]
    assert results["asyncio"][0] == [b"A:one", b"A:switch", b"B:two", b"B:close"]
    assert results["asyncio"][1][-1] == ("B", "connection_lost", None)
