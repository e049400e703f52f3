"""Differential property tests for ``StreamRequestHandler.rfile`` / ``wfile``.

The contract (docs/ARCHITECTURE.md, Two handler paths): ``rfile`` of ``fastsocketserver`` behaves
exactly like the stdlib's ``socket.makefile('rb', rbufsize)`` -- an
``io.BufferedReader`` over a blocking socket (a raw ``SocketIO`` when
``rbufsize == 0``) -- and ``wfile`` like the stdlib's writer: with
``wbufsize == 0`` every ``write`` is sent at once and returns the byte count;
with ``wbufsize > 0`` it is an ``io.BufferedWriter`` (at most ``wbufsize``
bytes held back, everything sent on ``flush()``/close).

How the rfile test works
------------------------
hypothesis draws a payload (binary, newline-rich, 0..200 KB), a segmentation
of it (cut points, occasional short pauses; the client has TCP_NODELAY and
ends with ``shutdown(SHUT_WR)``) and a *read program*: a list of ``read(n)``
(n incl. -1/None), ``read1(n)``, ``readline(limit)``, ``readlines(hint)``,
``readinto(buf)``, ``readinto1(buf)``, ``peek(n)``, ``next(iter(rfile))``.
A handler runs the program on ``self.rfile``, records every result, and
finally drains the rest with ``rfile.read()``.  The same example is served by
``socketserver.TCPServer`` and by ``fastsocketserver.TCPServer``.

Each recording is checked op by op against a positional model whose oracle is
``io.BufferedReader(io.BytesIO(payload), buffer_size)`` seeked to the current
stream position:

* ``read``/``readline``/``readlines``/``readinto``/``next`` of a blocking
  buffered reader are segmentation independent, so they must equal the
  oracle's result exactly (same for ``read(-1)``/``readline``/``readlines``/
  ``next`` of the raw reader used for ``rbufsize == 0``).
* ``read1``/``readinto1`` (and ``read(n)``/``readinto`` of the raw reader)
  return a segmentation-dependent amount: the data must be the next bytes of
  the stream, at least 1 byte unless at EOF or asked for 0, at most what was
  asked (``read1(-1)``: at most the buffer size).
* ``peek`` must return a prefix of the remaining stream (>= 1 byte unless at
  EOF) and consume nothing; its length is implementation-defined.
* the final drain must return exactly the rest, so the concatenation of all
  consumed data equals the payload.

When a program contains no segmentation-dependent consuming op, the whole
recording (peek results masked) must in addition be *identical* between the
stdlib, fastsocketserver and the in-memory ``io.BufferedReader``.

The implementation under test is ``fastsocketserver`` (tests skip if it is not
importable).  Set ``FSS_SELFTEST_STDLIB=1`` to run the harness with
``socketserver`` in its place (stdlib vs stdlib vs BytesIO), which checks the
harness itself.

The handler's socket timeout is drawn from {None, 30.0} so that both the
blocking and the timeout code paths are exercised; every client socket has a
timeout, the client always half-closes (so a reader blocked on the server side
sees EOF), and every wait on the server thread is bounded.
"""

from __future__ import annotations

import importlib
import io
import os
import random
import socket
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# --------------------------------------------------------------------------
# configuration

CLIENT_TIMEOUT = 8.0  # every client socket operation
SERVER_TIMEOUT = 8.0  # handle_request() timeout and thread joins
WRITE_PROGRESS_TIMEOUT = 3.0  # how long a wfile.write may take to reach the peer
MAX_PAYLOAD = 200_000
STDLIB = "socketserver"
TARGET = STDLIB if os.environ.get("FSS_SELFTEST_STDLIB") == "1" else "fastsocketserver"

COMMON_SETTINGS = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def target_name():
    if TARGET != STDLIB:
        __import__(TARGET)  # a broken build fails here, never skips
    return TARGET


# --------------------------------------------------------------------------
# payloads and segmentation

# translation tables turning a fraction of random bytes into b"\n"
_NL_TABLES = {k: bytes(10 if i < k else i for i in range(256)) for k in (0, 2, 16, 64, 200)}


class Payload:
    """A payload built from a compact recipe (so failures print readably)."""

    def __init__(self, recipe):
        self.recipe = tuple(recipe)
        parts = []
        for r in self.recipe:
            if r[0] == "lit":
                parts.append(r[1])
            elif r[0] == "rand":
                _, n, seed, nl = r
                parts.append(random.Random(seed).randbytes(n).translate(_NL_TABLES[nl]))
            elif r[0] == "rep":
                _, unit, n = r
                parts.append(unit * n)
        self.data = b"".join(parts)[:MAX_PAYLOAD]

    def __repr__(self):
        return f"Payload({self.recipe!r})  # len={len(self.data)}"


_chunk = st.one_of(
    st.tuples(
        st.just("lit"),
        st.lists(
            st.sampled_from([b"\n", b"\r\n", b"a", b"bc", b"\x00", b"\xff", b"line\n", b"\n\n"]),
            max_size=40,
        ).map(b"".join),
    ),
    st.tuples(st.just("lit"), st.binary(max_size=64)),
    st.tuples(
        st.just("rand"),
        st.integers(0, 120_000),
        st.integers(0, 2**32 - 1),
        st.sampled_from(sorted(_NL_TABLES)),
    ),
    st.tuples(st.just("rep"), st.sampled_from([b"A", b"\n", b"ab\n", b"x" * 99 + b"\n"]), st.integers(0, 70_000)),
)
payloads = st.lists(_chunk, max_size=6).map(Payload)


@st.composite
def payload_and_segments(draw):
    payload = draw(payloads)
    n = len(payload.data)
    cuts = draw(st.lists(st.integers(0, n), max_size=12).map(sorted))
    segments = tuple(
        (c, draw(st.sampled_from([0.0, 0.0, 0.0, 0.001, 0.004]))) for c in cuts
    )
    return payload, segments


# --------------------------------------------------------------------------
# read programs


def _bufsize(rbufsize):
    return io.DEFAULT_BUFFER_SIZE if rbufsize < 0 else rbufsize


def _sizes(bs, cap):
    specials = sorted({max(0, x) for x in (bs - 1, bs, bs + 1, 2 * bs, 4095, 4096, 65536, 65537)})
    return st.one_of(
        st.integers(0, 16),
        st.sampled_from([x for x in specials if x <= cap]),
        st.integers(0, cap),
    )


def programs(bs, raw):
    n = _sizes(bs, 250_000)
    ops = [
        st.tuples(st.just("read"), st.one_of(n, st.just(-1)) if raw else st.one_of(n, st.sampled_from([-1, None]))),
        st.tuples(st.just("readline"), st.one_of(n, st.sampled_from([-1, None]))),
        st.tuples(st.just("readline"), st.integers(-1, 200)),
        st.tuples(st.just("readlines"), st.one_of(_sizes(bs, 20_000), st.sampled_from([-1, 0, None]))),
        st.tuples(st.just("readlines"), st.integers(1, 64)),
        st.tuples(st.just("readinto"), _sizes(bs, 100_000), st.booleans()),
        st.just(("next",)),
    ]
    if not raw:
        ops += [
            st.tuples(st.just("read1"), st.one_of(n, st.just(-1))),
            st.tuples(st.just("readinto1"), _sizes(bs, 100_000), st.booleans()),
            st.tuples(st.just("peek"), st.one_of(st.integers(0, 16), st.sampled_from([bs, bs + 1, 100_000]))),
        ]
    return st.lists(st.one_of(*ops), min_size=1, max_size=20).map(tuple)


STOP = ("StopIteration",)


def _do(f, op):
    kind = op[0]
    if kind == "read":
        return f.read(op[1])
    if kind == "read1":
        return f.read1(op[1])
    if kind == "readline":
        return f.readline(op[1])
    if kind == "readlines":
        return f.readlines(op[1])
    if kind in ("readinto", "readinto1"):
        buf = bytearray(op[1])
        target = memoryview(buf) if op[2] else buf
        n = getattr(f, kind)(target)
        return (n, bytes(buf))
    if kind == "peek":
        return f.peek(op[1])
    if kind == "next":
        try:
            return next(iter(f))
        except StopIteration:
            return STOP
    raise AssertionError(op)


def _recv_all(sock):
    chunks = []
    while True:
        b = sock.recv(65536)
        if not b:
            return b"".join(chunks)
        chunks.append(b)


def execute(f, program, drain=None):
    """Run a read program on ``f``; the last record is the drain: ``f.read()``,
    or ``drain()`` if given (used to read the rest from the socket itself)."""
    rec = []
    for op in program:
        try:
            rec.append(_do(f, op))
        except Exception as e:  # recorded, and the program stops here
            rec.append(("raise", type(e).__name__, str(e)))
            return rec
    try:
        rec.append(("drain", f.read() if drain is None else drain()))
    except Exception as e:
        rec.append(("raise", type(e).__name__, str(e)))
    return rec


def _is_variable(op, raw):
    """Ops whose consumed amount depends on segmentation."""
    kind = op[0]
    if kind in ("read1", "readinto1"):
        return True
    if raw and kind == "readinto":
        return True
    if raw and kind == "read" and op[1] is not None and op[1] > 0:
        return True
    return False


def _short(x, limit=120):
    """Compact description of a (possibly huge) result for failure messages."""
    if isinstance(x, (bytes, bytearray)):
        if len(x) <= limit:
            return repr(bytes(x))
        return f"<{len(x)} bytes {bytes(x[:40])!r}...{bytes(x[-40:])!r}>"
    if isinstance(x, list):
        return f"<list of {len(x)}: [{', '.join(_short(i, 40) for i in x[:5])}{', ...' if len(x) > 5 else ''}] total={sum(map(len, x))}B>"
    if isinstance(x, tuple):
        return "(" + ", ".join(_short(i, limit) for i in x) + ")"
    return repr(x)


def _first_diff(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def _consumed(kind, got):
    if kind in ("read", "read1", "readline"):
        return len(got)
    if kind == "readlines":
        return sum(map(len, got))
    if kind in ("readinto", "readinto1"):
        return got[0]
    if kind == "next":
        return 0 if got == STOP else len(got)
    if kind == "peek":
        return 0
    raise AssertionError(kind)


def check_against_model(label, program, rec, data, bs, raw):
    """Check one recording op by op against the BytesIO-backed oracle."""
    oracle = io.BufferedReader(io.BytesIO(data), max(bs, 1))
    pos = 0
    n_total = len(data)

    def fail(i, msg):
        op = program[i] if i < len(program) else ("drain",)
        pytest.fail(f"[{label}] op #{i} {op!r} at stream pos {pos}/{n_total}: {msg}", pytrace=False)

    for i, op in enumerate(program):
        if i >= len(rec):
            fail(i, "no result recorded")
        got = rec[i]
        if isinstance(got, tuple) and got and got[0] == "raise":
            fail(i, f"raised {got[1]}: {got[2]}")
        kind = op[0]
        rest = n_total - pos
        if kind == "peek":
            if not isinstance(got, bytes):
                fail(i, f"peek returned {type(got).__name__}")
            if got != data[pos : pos + len(got)]:
                fail(i, f"peek {_short(got)} is not a prefix of the remaining stream {_short(data[pos:pos + len(got) + 8])}")
            if rest > 0 and not got:
                fail(i, "peek returned b'' before EOF")
            if rest == 0 and got:
                fail(i, f"peek returned {_short(got)} at EOF")
            continue
        if not _is_variable(op, raw):
            oracle.seek(pos)
            expected = _do(oracle, op)
            if got != expected:
                fail(i, f"got {_short(got)}, BufferedReader(BytesIO) gives {_short(expected)}")
            pos += _consumed(kind, got)
            continue
        # segmentation-dependent amount
        if kind in ("read", "read1"):
            n = op[1]
            if not isinstance(got, bytes):
                fail(i, f"returned {type(got).__name__}: {_short(got)}")
            k = len(got)
            hi = n if n >= 0 else bs
            if got != data[pos : pos + k]:
                d = _first_diff(got, data[pos : pos + k])
                fail(i, f"returned {k} bytes that are not the next {k} bytes of the stream (first difference at +{d})")
            if n == 0 and k:
                fail(i, f"returned {k} bytes for n=0")
            if n != 0 and rest > 0 and not 1 <= k <= hi:
                fail(i, f"returned {k} bytes, expected 1..{hi}")
            pos += k
        else:  # readinto / readinto1
            size = op[1]
            n, buf = got
            if not isinstance(n, int) or not 0 <= n <= size:
                fail(i, f"returned {n!r} for a buffer of {size}")
            if buf[:n] != data[pos : pos + n]:
                fail(i, f"filled {n} bytes that are not the next {n} bytes of the stream")
            if buf[n:] != bytes(size - n):
                fail(i, "wrote into the buffer beyond the returned count")
            if size and rest > 0 and n == 0:
                fail(i, "returned 0 before EOF")
            pos += n
    i = len(program)
    if len(rec) != i + 1:
        fail(i, f"expected {i + 1} records, got {len(rec)}")
    drain = rec[i]
    if drain[0] == "raise":
        fail(i, f"final read() raised {drain[1]}: {drain[2]}")
    if drain[1] != data[pos:]:
        fail(i, f"final read() returned {_short(drain[1])}, expected the remaining {_short(data[pos:])}")


def _mask_peeks(program, rec):
    return [("peek",) if op[0] == "peek" else r for op, r in zip(program + (("drain",),), rec)]


# --------------------------------------------------------------------------
# server harness


def serve_one(modname, configure, body, client):
    """Serve exactly one connection with ``modname.TCPServer``.

    ``configure(cls)`` sets class attributes on the handler class, ``body(h)``
    runs inside ``handle()`` and its result (or exception) is returned along
    with ``client(addr)``'s result.
    """
    mod = importlib.import_module(modname)
    done = threading.Event()
    box = {}

    class Handler(mod.StreamRequestHandler):
        def handle(self):
            try:
                box["result"] = body(self)
            except BaseException as e:  # reported by the caller
                box["error"] = e
            finally:
                done.set()

    configure(Handler)
    server = mod.TCPServer(("127.0.0.1", 0), Handler)
    try:
        server.timeout = SERVER_TIMEOUT
        t = threading.Thread(target=server.handle_request, daemon=True, name=f"serve-{modname}")
        t.start()
        client_result = client(server.server_address)
        if not done.wait(SERVER_TIMEOUT):
            pytest.fail(f"[{modname}] handler did not finish", pytrace=False)
        t.join(SERVER_TIMEOUT)
        if t.is_alive():
            pytest.fail(f"[{modname}] handle_request() did not return", pytrace=False)
    finally:
        server.server_close()
    if "error" in box:
        raise AssertionError(f"[{modname}] handler raised {box['error']!r}") from box["error"]
    return box["result"], client_result


def _connect(addr):
    c = socket.create_connection(addr, timeout=CLIENT_TIMEOUT)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return c


def sending_client(data, segments):
    def client(addr):
        view = memoryview(data)
        with _connect(addr) as c:
            try:
                prev = 0
                for cut, pause in segments:
                    c.sendall(view[prev:cut])
                    prev = cut
                    if pause:
                        time.sleep(pause)
                c.sendall(view[prev:])
                c.shutdown(socket.SHUT_WR)
                while c.recv(65536):  # wait for the server to close
                    pass
            except (ConnectionResetError, BrokenPipeError):
                # the handler stopped reading early (an op raised); the
                # recording says what happened
                pass

    return client


def run_read_program(modname, rbufsize, handler_timeout, program, data, segments, drain_via_socket=False):
    def configure(cls):
        cls.rbufsize = rbufsize
        cls.timeout = handler_timeout

    def body(h):
        return execute(h.rfile, program, (lambda: _recv_all(h.connection)) if drain_via_socket else None)

    rec, _ = serve_one(modname, configure, body, sending_client(data, segments))
    return rec


def _differential(target_name, rbufsize, handler_timeout, program, payload, segments, drain_via_socket=False):
    raw = rbufsize == 0
    bs = _bufsize(rbufsize)
    data = payload.data
    recs = {}
    for modname in dict.fromkeys((STDLIB, target_name)):
        rec = run_read_program(modname, rbufsize, handler_timeout, program, data, segments, drain_via_socket)
        label = modname if modname == STDLIB or target_name != STDLIB else modname + " (selftest)"
        check_against_model(label, program, rec, data, bs, raw)
        recs[modname] = rec
    if not any(_is_variable(op, raw) for op in program):
        # segmentation-independent program: identical recordings everywhere
        mem = execute(io.BufferedReader(io.BytesIO(data), max(bs, 1)), program)
        want = _mask_peeks(program, mem)
        for modname, rec in recs.items():
            got = _mask_peeks(program, rec)
            if got != want:
                i = _first_diff(got, want)
                pytest.fail(
                    f"[{modname}] recording differs from BufferedReader(BytesIO) at op #{i}: "
                    f"{_short(got[i]) if i < len(got) else '<missing>'} vs {_short(want[i]) if i < len(want) else '<missing>'}",
                    pytrace=False,
                )


# --------------------------------------------------------------------------
# rfile tests


@pytest.mark.parametrize("rbufsize", [-1, 1, 7, 8192])
@settings(max_examples=100, **COMMON_SETTINGS)
@given(data=st.data(), handler_timeout=st.sampled_from([None, 30.0]))
def test_rfile_matches_bufferedreader(target_name, rbufsize, data, handler_timeout):
    payload, segments = data.draw(payload_and_segments(), label="payload, segments")
    program = data.draw(programs(_bufsize(rbufsize), raw=False), label="program")
    _differential(target_name, rbufsize, handler_timeout, program, payload, segments)


@settings(max_examples=100, **COMMON_SETTINGS)
@given(data=st.data(), handler_timeout=st.sampled_from([None, 30.0]), drain_via_socket=st.booleans())
def test_rfile_unbuffered_rbufsize0(target_name, data, handler_timeout, drain_via_socket):
    """rbufsize=0: the stdlib gives a raw SocketIO, whose read(n)/readinto may
    return short; only the stream contents and the segmentation-independent
    ops (readline, readlines, read(-1), iteration) are compared exactly.

    An unbuffered rfile reads no further ahead than it returns, so with
    ``drain_via_socket`` the rest is read with ``self.connection.recv`` and
    must still be exactly the rest of the payload (handlers that read a
    header line with rfile and then use the socket directly rely on it)."""
    payload, segments = data.draw(payload_and_segments(), label="payload, segments")
    program = data.draw(programs(1, raw=True), label="program")
    _differential(target_name, 0, handler_timeout, program, payload, segments, drain_via_socket)


def test_rfile_smoke(target_name):
    """A fixed example, so a basic breakage shows up without hypothesis noise."""
    data = b"first line\nsecond\n" + bytes(range(256)) * 40 + b"\nlast"
    program = (("readline", -1), ("read", 3), ("peek", 1), ("readline", 4), ("next",),
               ("readinto", 10, False), ("read1", 5), ("readlines", 100), ("readline", -1))
    _differential(target_name, -1, None, program, Payload([("lit", data)]), ((5, 0.002), (300, 0.0)))


# --------------------------------------------------------------------------
# wfile test


class _Progress:
    """Bytes received by the client so far, waitable from the handler."""

    def __init__(self):
        self.cond = threading.Condition()
        self.received = 0

    def add(self, n):
        with self.cond:
            self.received += n
            self.cond.notify_all()

    def wait_for(self, n, timeout):
        with self.cond:
            return self.cond.wait_for(lambda: self.received >= n, timeout)


def _make_write_arg(spec):
    size, seed, kind = spec
    raw = random.Random(seed).randbytes(size)
    if kind == "bytes":
        return raw
    if kind == "bytearray":
        return bytearray(raw)
    if kind == "memoryview":
        return memoryview(raw)
    if kind == "memoryview-slice":  # non-zero offset into a larger buffer
        return memoryview(b"@@@" + raw + b"@@")[3 : 3 + size]
    if kind == "memoryview-cast":  # itemsize 4: len() != nbytes
        return memoryview(raw[: size - size % 4]).cast("I")
    raise AssertionError(kind)


write_ops = st.lists(
    st.one_of(
        st.tuples(
            st.one_of(
                st.integers(0, 16),
                st.sampled_from([1, 4095, 4096, 8191, 8192, 8193, 65536, 65537, 262144]),
                st.integers(0, 300_000),
            ),
            st.integers(0, 2**32 - 1),
            st.sampled_from(["bytes", "bytearray", "memoryview", "memoryview-slice", "memoryview-cast"]),
        ),
        st.just("flush"),
    ),
    min_size=1,
    max_size=8,
).map(tuple)


def run_write_program(modname, wbufsize, handler_timeout, ops):
    progress = _Progress()

    def configure(cls):
        cls.wbufsize = wbufsize
        cls.timeout = handler_timeout

    def body(h):
        returns, late = [], []
        total = 0
        for i, op in enumerate(ops):
            if op == "flush":
                h.wfile.flush()
                need = total
            else:
                arg = _make_write_arg(op)
                returns.append(h.wfile.write(arg))
                total += memoryview(arg).nbytes
                # unbuffered: sent at once; buffered: at most wbufsize held back
                need = total - wbufsize
            if need > 0 and not late and not progress.wait_for(need, WRITE_PROGRESS_TIMEOUT):
                late.append((i, op, need, progress.received))
        return returns, late

    def client(addr):
        chunks = []
        with _connect(addr) as c:
            c.shutdown(socket.SHUT_WR)
            while True:
                b = c.recv(262144)
                if not b:
                    break
                chunks.append(b)
                progress.add(len(b))
        return b"".join(chunks)

    return serve_one(modname, configure, body, client)


@pytest.mark.parametrize("wbufsize", [0, 1, 8192])
@settings(max_examples=50, **COMMON_SETTINGS)
@given(ops=write_ops, handler_timeout=st.sampled_from([None, 30.0]))
def test_wfile_writes(target_name, wbufsize, ops, handler_timeout):
    expected = b"".join(_make_write_arg(op) for op in ops if op != "flush")
    expected_returns = [memoryview(_make_write_arg(op)).nbytes for op in ops if op != "flush"]
    for modname in dict.fromkeys((STDLIB, target_name)):
        (returns, late), received = run_write_program(modname, wbufsize, handler_timeout, ops)
        if returns != expected_returns:
            pytest.fail(f"[{modname}] write() returned {returns}, expected {expected_returns}", pytrace=False)
        if late:
            i, op, need, got = late[0]
            pytest.fail(
                f"[{modname}] after op #{i} {op!r} the client had only {got} of the {need} bytes "
                f"that must have been sent (wbufsize={wbufsize}) within {WRITE_PROGRESS_TIMEOUT}s",
                pytrace=False,
            )
        if received != expected:
            d = _first_diff(received, expected)
            pytest.fail(
                f"[{modname}] client received {len(received)} bytes, expected {len(expected)}; first difference at {d}",
                pytrace=False,
            )
