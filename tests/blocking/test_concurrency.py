"""Concurrent servers: ThreadingMixIn and ForkingMixIn, ours against the stdlib's.

For every concrete class (and user-made combinations, in either mixin order the stdlib
accepts): the same echo transcripts; ``server_close()`` returning only after in-flight
requests finished (threads) or children were reaped (forking); N slow requests served
in about the time of one; no descriptor, thread or zombie left after many requests;
handler exceptions reaching ``handle_error``; ``SystemExit`` in a thread reaching
``threading.excepthook`` while the server keeps serving.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import shutil
import signal
import socket
import socketserver as stdlib
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import pytest

import fastsocketserver as fast

MODS = {"stdlib": stdlib, "fast": fast}
TIMEOUT = 10.0
NAP = 0.5  # how long a "slow" handler sleeps
N = 8  # concurrent clients


# ---------------------------------------------------------------------------
# server kinds
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Kind:
    """A server class, built the same way from either module."""

    name: str
    family: str  # "tcp", "udp", "unix", "unixdgram"
    dispatch: str  # "thread", "fork" or "sync" (the handler runs in the loop's thread)
    build: Callable[[Any], type]
    waits_on_close: bool = True  # server_close() waits for in-flight requests

    @property
    def stream(self) -> bool:
        return self.family in ("tcp", "unix")


def concrete(name: str, mixin: str, base: str) -> Callable[[Any], type]:
    """``mod.<name>``; on Pythons whose stdlib lacks it (ForkingUnix* before 3.12),
    the stdlib's own definition of it: ``class <name>(<mixin>, <base>)``."""
    def build(mod):
        cls = getattr(mod, name, None)
        return cls if cls is not None else type(name, (getattr(mod, mixin), getattr(mod, base)), {})
    return build


def user(*names: str, **attrs: Any) -> Callable[[Any], type]:
    """A user-made class ``class S(<names...>)`` from the module's classes."""
    def build(mod):
        return type("S", tuple(getattr(mod, n) for n in names), dict(attrs))
    return build


def my_mixin(mod):
    class MyThreadingMixIn(mod.ThreadingMixIn):
        pass

    class S(MyThreadingMixIn, mod.UnixStreamServer):
        pass
    return S


def my_base(mod):
    class MyTCPServer(mod.TCPServer):
        allow_reuse_address = True

    class S(mod.ForkingMixIn, MyTCPServer):
        pass
    return S


KINDS = [
    Kind("ThreadingTCPServer", "tcp", "thread", concrete("ThreadingTCPServer", "ThreadingMixIn", "TCPServer")),
    Kind("ThreadingUDPServer", "udp", "thread", concrete("ThreadingUDPServer", "ThreadingMixIn", "UDPServer")),
    Kind("ThreadingUnixStreamServer", "unix", "thread",
         concrete("ThreadingUnixStreamServer", "ThreadingMixIn", "UnixStreamServer")),
    Kind("ThreadingUnixDatagramServer", "unixdgram", "thread",
         concrete("ThreadingUnixDatagramServer", "ThreadingMixIn", "UnixDatagramServer")),
    Kind("ForkingTCPServer", "tcp", "fork", concrete("ForkingTCPServer", "ForkingMixIn", "TCPServer")),
    Kind("ForkingUDPServer", "udp", "fork", concrete("ForkingUDPServer", "ForkingMixIn", "UDPServer")),
    Kind("ForkingUnixStreamServer", "unix", "fork",
         concrete("ForkingUnixStreamServer", "ForkingMixIn", "UnixStreamServer")),
    Kind("ForkingUnixDatagramServer", "unixdgram", "fork",
         concrete("ForkingUnixDatagramServer", "ForkingMixIn", "UnixDatagramServer")),
    Kind("user(ThreadingMixIn,TCPServer)", "tcp", "thread", user("ThreadingMixIn", "TCPServer")),
    Kind("user(ForkingMixIn,UDPServer)", "udp", "fork", user("ForkingMixIn", "UDPServer")),
    Kind("user(MyThreadingMixIn,UnixStreamServer)", "unix", "thread", my_mixin),
    Kind("user(ForkingMixIn,MyTCPServer)", "tcp", "fork", my_base),
    Kind("user(ThreadingTCPServer)+daemon_threads", "tcp", "thread",
         user("ThreadingTCPServer", daemon_threads=True), waits_on_close=False),
    Kind("user(ThreadingUDPServer)+no block_on_close", "udp", "thread",
         user("ThreadingUDPServer", block_on_close=False), waits_on_close=False),
    # The mixin after the server class: BaseServer.process_request comes first in the
    # MRO, so the stdlib serves these synchronously; so must we.
    Kind("user(TCPServer,ThreadingMixIn)", "tcp", "sync", user("TCPServer", "ThreadingMixIn")),
    Kind("user(UDPServer,ForkingMixIn)", "udp", "sync", user("UDPServer", "ForkingMixIn")),
    Kind("user(UnixStreamServer,ForkingMixIn)", "unix", "sync", user("UnixStreamServer", "ForkingMixIn")),
]
BY_NAME = {k.name: k for k in KINDS}
CONCURRENT = [k for k in KINDS if k.dispatch != "sync"]
ids = lambda kinds: [k.name for k in kinds]  # noqa: E731


# ---------------------------------------------------------------------------
# helpers: servers, clients, processes
# ---------------------------------------------------------------------------

_paths = itertools.count()


@pytest.fixture
def tmp():
    path = tempfile.mkdtemp(prefix="fssc", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def bounded(fn: Callable[[], Any], timeout: float = TIMEOUT, what: str = "call") -> Any:
    """Run ``fn`` in a helper thread; fail (instead of hanging) if it does not return."""
    box: dict[str, Any] = {}

    def run():
        try:
            box["result"] = fn()
        except BaseException as exc:  # re-raised below
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise AssertionError(f"{what} did not return within {timeout}s")
    if "error" in box:
        raise box["error"]
    return box.get("result")


def process_state(pid: int) -> str | None:
    """State letter of a child of ours ('Z' = zombie), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except FileNotFoundError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    state, ppid = fields[0], int(fields[1])
    return state if ppid == os.getpid() else None


class Running:
    """A server serving in a thread; ``close()`` shuts it down, closes it, joins it."""

    def __init__(self, server):
        self.server = server
        self.closed = False
        self.thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> float:
        """shutdown() + server_close(); returns how long server_close() took."""
        if self.closed:
            return 0.0
        self.closed = True
        bounded(self.server.shutdown, what="shutdown()")
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), "serve_forever did not return"
        start = time.monotonic()
        bounded(self.server.server_close, what="server_close()")
        return time.monotonic() - start


@contextlib.contextmanager
def running(cls: type, kind: Kind, handler: type, tmp: str):
    address: Any = ("127.0.0.1", 0) if kind.family in ("tcp", "udp") else os.path.join(tmp, f"s{next(_paths)}")
    server = cls(address, handler)
    run = Running(server)
    try:
        yield run
    finally:
        try:
            run.close()
        finally:
            # A child still running now is a failure the test reports; never leave it
            # behind (it would hold this process's descriptors forever).
            for pid in list(getattr(server, "active_children", None) or ()):
                if process_state(pid) not in (None, "Z"):
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)


class Client(socket.socket):
    """A test client socket with buffered line reads. ``close()`` shuts it down first:
    forked children inherit a copy of every client socket open when they were forked,
    and must still see EOF when the test is done with it."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.buffer = b""

    def message(self) -> bytes:
        """The next line (stream; newline included, or what is left at EOF) or datagram."""
        if self.type == socket.SOCK_DGRAM:
            return self.recv(65536)
        while b"\n" not in self.buffer and len(self.buffer) < 1 << 22:
            chunk = self.recv(65536)
            if not chunk:
                data, self.buffer = self.buffer, b""
                return data
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"

    def rest(self) -> bytes:
        """Everything up to EOF."""
        data, self.buffer = self.buffer, b""
        while len(data) < 1 << 22:
            chunk = self.recv(65536)
            if not chunk:
                return data
            data += chunk
        raise AssertionError("no EOF")

    def close(self) -> None:
        if self.fileno() != -1:
            with contextlib.suppress(OSError):
                self.shutdown(socket.SHUT_RDWR)
        super().close()


def client(server, kind: Kind, tmp: str, timeout: float = TIMEOUT) -> Client:
    """A client connected to ``server`` (datagram clients too, so recv() sees only it)."""
    family = socket.AF_INET if kind.family in ("tcp", "udp") else socket.AF_UNIX
    sock = Client(family, socket.SOCK_STREAM if kind.stream else socket.SOCK_DGRAM)
    try:
        sock.settimeout(timeout)
        if kind.family == "unixdgram":
            sock.bind(os.path.join(tmp, f"c{next(_paths)}"))
        deadline = time.monotonic() + timeout
        while True:
            try:
                sock.connect(server.server_address)
                break
            except BlockingIOError:
                # The Unix listener's backlog is full: with a timeout set, connect()
                # fails with EAGAIN at once instead of waiting. Wait for the accepts.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.005)
    except BaseException:
        sock.close()
        raise
    return sock


def both(scenario: Callable[..., Any], *args: Any, timeout: float = 30) -> dict[str, Any]:
    """Run ``scenario(mod, *args)`` for the stdlib and for fastsocketserver at the same
    time, each in its own thread (the timing scenarios sleep: this halves the file's
    run time). Returns {name: result}, or fails naming each module whose run failed."""
    results: dict[str, Any] = {}
    errors: dict[str, BaseException] = {}

    def run(name: str) -> None:
        try:
            results[name] = scenario(MODS[name], *args)
        except BaseException as exc:  # reported below
            errors[name] = exc

    threads = {name: threading.Thread(target=run, args=(name,), daemon=True) for name in MODS}
    for t in threads.values():
        t.start()
    deadline = time.monotonic() + timeout
    for name, t in threads.items():
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            errors[name] = AssertionError(f"scenario did not finish within {timeout}s")
    if errors:
        raise AssertionError("; ".join(f"[{name}] {type(e).__name__}: {e}" for name, e in sorted(errors.items())))
    return results


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def thread_count() -> int:
    """OS threads of this process (Rust threads included, unlike threading's count)."""
    return len(os.listdir("/proc/self/task"))


def settle(target: Callable[[], Any], expected: Any, timeout: float = TIMEOUT) -> Any:
    """Poll ``target()`` until it equals ``expected`` (bounded); return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        gc.collect()
        value = target()
        if value == expected or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def assert_reaped(server, pids: list[int]) -> None:
    assert not server.active_children, f"active_children not empty: {server.active_children}"
    left = {pid: state for pid in pids if (state := process_state(pid)) is not None}
    assert not left, f"children not reaped after server_close(): {left} (Z = zombie)"


# ---------------------------------------------------------------------------
# handlers
# ---------------------------------------------------------------------------

def echo_handler(mod, kind: Kind) -> type:
    if kind.stream:
        class Echo(mod.StreamRequestHandler):
            def handle(self):
                for line in self.rfile:
                    if line == b"quit\n":
                        break
                    self.wfile.write(b"echo:" + line)
                self.wfile.write(b"bye\n")
        return Echo

    class DatagramEcho(mod.DatagramRequestHandler):
        def handle(self):
            self.wfile.write(b"echo:" + self.rfile.read())
    return DatagramEcho


def slow_handler(mod, kind: Kind) -> type:
    """Answers 'started <pid>' at once, then 'done' after NAP seconds."""
    if kind.stream:
        class Slow(mod.StreamRequestHandler):
            def handle(self):
                self.rfile.readline()
                self.wfile.write(b"started %d\n" % os.getpid())
                time.sleep(NAP)
                self.wfile.write(b"done\n")
        return Slow

    class SlowDatagram(mod.DatagramRequestHandler):
        def handle(self):
            self.socket.sendto(b"started %d\n" % os.getpid(), self.client_address)
            time.sleep(NAP)
            self.wfile.write(b"done\n")
    return SlowDatagram


# ---------------------------------------------------------------------------
# transcripts, class relations, where the handler runs
# ---------------------------------------------------------------------------

STREAM_SCRIPT = [b"hello\n", b"x" * 70000 + b"\n", b"\xff\x00 binary\n", b"\n"]
DGRAM_SCRIPT = [b"hello", b"", b"x" * 4000, b"\xff\x00 binary"]


def transcript(server, kind: Kind, tmp: str, tag: int) -> list[bytes]:
    with client(server, kind, tmp) as sock:
        out = []
        if not kind.stream:
            for packet in DGRAM_SCRIPT:
                sock.send(packet + b"#%d" % tag)
                out.append(sock.message())
            return out
        for line in STREAM_SCRIPT:  # in lock-step: one line, then its echo
            sock.sendall(line[:-1] + b"#%d\n" % tag)
            out.append(sock.message())
        sock.sendall(b"last without newline #%d" % tag)
        sock.shutdown(socket.SHUT_WR)
        out.append(sock.rest())
        return out


def run_transcripts(mod, kind: Kind, tmp: str) -> list[list[bytes]]:
    """Three clients one after another, then four at once."""
    with running(kind.build(mod), kind, echo_handler(mod, kind), tmp) as run:
        sequential = [transcript(run.server, kind, tmp, i) for i in range(3)]
        results: dict[int, Any] = {}
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, transcript(run.server, kind, tmp, i)))
                   for i in range(3, 7)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        return sequential + [results.get(i) for i in range(3, 7)]


@pytest.mark.parametrize("kind", KINDS, ids=ids(KINDS))
def test_echo_transcripts_match_stdlib(kind, tmp):
    got = both(run_transcripts, kind, tmp)
    assert all(got["stdlib"]), "reference run incomplete"
    assert got["fast"] == got["stdlib"]
    assert got["stdlib"][0][0] == (b"echo:hello#0\n" if kind.stream else b"echo:hello#0")


@pytest.mark.parametrize("kind", KINDS, ids=ids(KINDS))
def test_class_relations_match_stdlib(kind):
    ours, ref = kind.build(fast), kind.build(stdlib)
    names = lambda cls: [c.__name__ for c in cls.__mro__]  # noqa: E731
    assert names(ours) == names(ref)
    for attr in ("daemon_threads", "block_on_close", "max_children", "timeout", "allow_reuse_address",
                 "request_queue_size", "address_family", "socket_type"):
        assert getattr(ours, attr, None) == getattr(ref, attr, None), attr


def where_handled(mod, kind: Kind, tmp: str) -> tuple[int, int, int]:
    """(pid, thread ident) the handler ran in, and the serve_forever thread's ident."""
    class Where(mod.BaseRequestHandler):
        def handle(self):
            payload = b"%d %d\n" % (os.getpid(), threading.get_ident())
            if kind.stream:
                self.request.sendall(payload)
            else:
                self.request[1].sendto(payload, self.client_address)

    with running(kind.build(mod), kind, Where, tmp) as run:
        with client(run.server, kind, tmp) as sock:
            if not kind.stream:
                sock.send(b"?")
            pid, ident = map(int, sock.message().split())
        return pid, ident, run.thread.ident


@pytest.mark.parametrize("kind", KINDS, ids=ids(KINDS))
def test_dispatch_runs_where_the_stdlib_runs_it(kind, tmp):
    """Threads: another thread of this process; forking: another process; mixin after
    the server in the bases (synchronous): the thread that runs serve_forever."""
    for name, (pid, ident, loop_ident) in both(where_handled, kind, tmp).items():
        if kind.dispatch == "fork":
            assert pid != os.getpid(), name
        elif kind.dispatch == "thread":
            assert pid == os.getpid() and ident not in (loop_ident, threading.main_thread().ident), name
        else:
            assert (pid, ident) == (os.getpid(), loop_ident), name


# ---------------------------------------------------------------------------
# server_close() and in-flight requests
# ---------------------------------------------------------------------------

def close_during_request(mod, kind: Kind, tmp: str) -> dict[str, Any]:
    """Start a request whose handler sleeps NAP seconds, then shutdown() and
    server_close() while it sleeps. What was observed right after server_close()."""
    finished = threading.Event()
    errors: list[BaseException] = []

    class Server(kind.build(mod)):
        def handle_error(self, request, client_address):
            errors.append(sys.exc_info()[1])

    class Handler(slow_handler(mod, kind)):
        def finish(self):
            try:
                super().finish()
            finally:
                finished.set()

    with running(Server, kind, Handler, tmp) as run:
        with client(run.server, kind, tmp) as sock:
            sock.send(b"go\n")
            started = sock.message()
            assert started.startswith(b"started "), started
            pid = int(started.split()[1])
            took = run.close()
            seen = {"took": took, "finished": finished.is_set()}
            if kind.dispatch == "fork":
                assert_reaped(run.server, [pid])
            if kind.stream or kind.dispatch != "thread":
                seen["reply"] = sock.message()
            # else: a threaded datagram handler answers through the server's socket,
            # which server_close() closed already (the stdlib closes it before joining
            # the threads): that reply fails (EBADF, to handle_error) in both.
    if kind.dispatch != "fork":
        assert finished.wait(TIMEOUT), "the handler never finished"
        if "reply" in seen:
            assert errors == [], errors
    return seen


@pytest.mark.parametrize("kind", KINDS, ids=ids(KINDS))
def test_server_close_waits_for_in_flight_requests(kind, tmp):
    for name, seen in both(close_during_request, kind, tmp).items():
        if kind.dispatch != "fork":
            if kind.waits_on_close:
                assert seen["finished"], f"{name}: server_close() returned after {seen['took']:.2f}s, " \
                                         "before the request finished"
            else:  # daemon threads / block_on_close = False: the stdlib does not wait
                assert not seen["finished"] and seen["took"] < NAP * 0.8, \
                    f"{name}: server_close() waited {seen['took']:.2f}s"
        if "reply" in seen:
            assert seen["reply"] == b"done\n", f"{name}: the client did not get its whole answer"


# ---------------------------------------------------------------------------
# concurrency
# ---------------------------------------------------------------------------

def slow_requests(mod, kind: Kind, tmp: str) -> float:
    """N clients, each held NAP seconds by its handler: the time until all answered."""
    with running(kind.build(mod), kind, slow_handler(mod, kind), tmp) as run:
        socks = [client(run.server, kind, tmp) for _ in range(N)]
        try:
            start = time.monotonic()
            for sock in socks:
                sock.send(b"go\n")
            for sock in socks:
                assert sock.message().startswith(b"started ")
                assert sock.message() == b"done\n"
            return time.monotonic() - start
        finally:
            for sock in socks:
                sock.close()


@pytest.mark.parametrize("kind", CONCURRENT, ids=ids(CONCURRENT))
def test_slow_handlers_run_concurrently(kind, tmp):
    for name, elapsed in both(slow_requests, kind, tmp).items():
        assert elapsed < N * NAP * 0.6, f"{name}: {N} requests sleeping {NAP}s each took {elapsed:.2f}s"


STREAM_CONCURRENT = [k for k in CONCURRENT if k.stream]


def blocked_readers(mod, kind: Kind, tmp: str) -> list[bytes]:
    class Blocking(mod.StreamRequestHandler):
        def handle(self):
            first = self.rfile.readline()
            self.wfile.write(b"ready " + first)
            second = self.rfile.readline()  # blocks until the client sends again
            self.wfile.write(b"got " + second)

    with running(kind.build(mod), kind, Blocking, tmp) as run:
        socks = [client(run.server, kind, tmp, timeout=5) for _ in range(N)]
        try:
            out = []
            for i, sock in enumerate(socks):
                sock.sendall(b"%d\n" % i)
            for i, sock in enumerate(socks):
                try:
                    out.append(sock.message())
                except socket.timeout:
                    raise AssertionError(f"client {i} not served while clients 0..{i - 1} are held") from None
            for i, sock in enumerate(socks):
                sock.sendall(b"second %d\n" % i)
            return out + [sock.message() for sock in socks]
        finally:
            for sock in socks:
                sock.close()


@pytest.mark.parametrize("kind", STREAM_CONCURRENT, ids=ids(STREAM_CONCURRENT))
def test_handlers_blocked_reading_do_not_block_others(kind, tmp):
    """Every handler blocks reading its socket until its client speaks again; the
    clients speak again only after all N handlers answered: serialised handlers never
    get there (the next client times out)."""
    got = both(blocked_readers, kind, tmp)
    expected = [b"ready %d\n" % i for i in range(N)] + [b"got second %d\n" % i for i in range(N)]
    assert got["stdlib"] == expected
    assert got["fast"] == expected


# ---------------------------------------------------------------------------
# leaks
# ---------------------------------------------------------------------------

def _hammer(server, kind, tmp, clients: int, per_client: int, sample: Callable[[], None]) -> list[bytes]:
    replies: list[bytes] = []
    errors: list[BaseException] = []

    def work(c):
        try:
            for i in range(per_client):
                with client(server, kind, tmp) as sock:
                    sock.sendall(b"req %d %d\n" % (c, i))
                    replies.append(sock.message())
                if i % 10 == 0:
                    sample()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    return replies


@pytest.mark.parametrize("modname", MODS)
def test_threading_no_leaks_after_1000_requests(modname, tmp):
    mod = MODS[modname]
    kind = BY_NAME["ThreadingTCPServer"]

    class Reply(mod.StreamRequestHandler):
        def handle(self):
            self.wfile.write(b"ok " + self.rfile.readline())

    gc.collect()
    fds, threads = fd_count(), thread_count()
    sizes: list[int] = []

    with running(mod.ThreadingTCPServer, kind, Reply, tmp) as run:
        def sample():
            threads_list = run.server._threads
            sizes.append(len(threads_list) if hasattr(threads_list, "__len__") else 0)

        replies = _hammer(run.server, kind, tmp, clients=4, per_client=250, sample=sample)
        assert len(replies) == 1000 and all(r.startswith(b"ok req ") for r in replies)
        assert max(sizes) <= 64, f"server._threads grew: {sizes}"
    after_threads = settle(thread_count, threads)
    after_fds = settle(fd_count, fds)
    assert (after_fds, after_threads) == (fds, threads), (
        f"descriptors {fds} -> {after_fds}, OS threads {threads} -> {after_threads}")


@pytest.mark.parametrize("modname", MODS)
def test_forking_no_leaks_after_200_requests(modname, tmp):
    mod = MODS[modname]
    kind = BY_NAME["ForkingTCPServer"]

    class Reply(mod.StreamRequestHandler):
        def handle(self):
            self.wfile.write(b"%d\n" % os.getpid())

    gc.collect()
    fds, threads = fd_count(), thread_count()
    children: list[int] = []

    with running(mod.ForkingTCPServer, kind, Reply, tmp) as run:
        def sample():
            children.append(len(run.server.active_children or ()))

        replies = _hammer(run.server, kind, tmp, clients=4, per_client=50, sample=sample)
        run.close()
        pids = [int(r) for r in replies]
        assert len(set(pids)) == 200 and os.getpid() not in pids
        assert max(children) <= run.server.max_children
        assert_reaped(run.server, pids)
    after_threads = settle(thread_count, threads)
    after_fds = settle(fd_count, fds)
    assert (after_fds, after_threads) == (fds, threads), (
        f"descriptors {fds} -> {after_fds}, OS threads {threads} -> {after_threads}")


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------

ERROR_KINDS = [BY_NAME[n] for n in ("ThreadingTCPServer", "ForkingTCPServer", "ThreadingUDPServer",
                                     "ForkingUDPServer", "ThreadingUnixStreamServer", "ForkingUnixDatagramServer")]


def error_transcript(mod, kind: Kind, tmp: str) -> list[bytes]:
    class Failing(mod.BaseRequestHandler):
        def handle(self):
            if kind.stream:
                line = self.request.recv(100)
            else:
                line = self.request[0]
            if line.startswith(b"fail"):
                raise ValueError("handler failed")
            reply = b"fine\n"
            if kind.stream:
                self.request.sendall(reply)
            else:
                self.request[1].sendto(reply, self.client_address)

    class Server(kind.build(mod)):
        def handle_error(self, request, client_address):
            # runs in the worker thread or in the child: tells the client directly
            message = b"handle_error:%s\n" % sys.exc_info()[0].__name__.encode()
            if kind.stream:
                request.sendall(message)
            else:
                request[1].sendto(message, client_address)

    out = []
    with running(Server, kind, Failing, tmp) as run:
        for line in (b"fail 1\n", b"ok\n", b"fail 2\n", b"ok\n"):
            with client(run.server, kind, tmp) as sock:
                sock.send(line)
                out.append(sock.rest() if kind.stream else sock.message())
        out.append(b"serving" if run.thread.is_alive() else b"loop died")
    return out


@pytest.mark.parametrize("kind", ERROR_KINDS, ids=ids(ERROR_KINDS))
def test_handler_exceptions_reach_handle_error(kind, tmp):
    got = both(error_transcript, kind, tmp)
    assert got["stdlib"] == [b"handle_error:ValueError\n", b"fine\n", b"handle_error:ValueError\n", b"fine\n",
                             b"serving"]
    assert got["fast"] == got["stdlib"]


@pytest.mark.parametrize("modname", MODS)
def test_forked_children_exit_status(modname, tmp):
    """A child exits 0 after a handled request and 1 after an error (reaped here:
    the ``collect_children`` override is honoured, nobody else reaps)."""
    mod = MODS[modname]

    class Handler(mod.StreamRequestHandler):
        def handle(self):
            self.wfile.write(b"%d\n" % os.getpid())
            if self.rfile.readline() == b"fail\n":
                raise ValueError("handler failed")

    class Server(mod.ForkingTCPServer):
        def collect_children(self, *, blocking=False):
            pass

        def handle_error(self, request, client_address):
            pass

    kind = BY_NAME["ForkingTCPServer"]
    statuses = []
    with running(Server, kind, Handler, tmp) as run:
        for line in (b"ok\n", b"fail\n"):
            with client(run.server, kind, tmp) as sock:
                pid = int(sock.message())
                sock.sendall(line)
                assert sock.rest() == b""
            try:
                _, status = os.waitpid(pid, 0)
            except ChildProcessError:
                raise AssertionError("the child was reaped by someone else than collect_children") from None
            statuses.append(os.waitstatus_to_exitcode(status))
    assert statuses == [0, 1]


@pytest.mark.parametrize("exc_type", [SystemExit, KeyboardInterrupt])
@pytest.mark.parametrize("modname", MODS)
def test_base_exceptions_in_threads_reach_excepthook(exc_type, modname, tmp):
    """Like the stdlib: not handle_error but threading.excepthook, and the server
    keeps serving."""
    mod = MODS[modname]
    kind = BY_NAME["ThreadingTCPServer"]
    hooked: list[type] = []
    errors: list[Any] = []
    hook_called = threading.Event()

    class Handler(mod.StreamRequestHandler):
        def handle(self):
            if self.rfile.readline() == b"exit\n":
                raise exc_type(3)
            self.wfile.write(b"alive\n")

    class Server(mod.ThreadingTCPServer):
        def handle_error(self, request, client_address):
            errors.append(sys.exc_info()[0])

    def excepthook(args):
        hooked.append(args.exc_type)
        hook_called.set()

    saved = threading.excepthook
    threading.excepthook = excepthook
    try:
        with running(Server, kind, Handler, tmp) as run:
            with client(run.server, kind, tmp) as sock:
                sock.sendall(b"exit\n")
                assert sock.rest() == b""  # the request was shut down all the same
            assert hook_called.wait(TIMEOUT), "threading.excepthook was not called"
            for _ in range(3):
                with client(run.server, kind, tmp) as sock:
                    sock.sendall(b"hi\n")
                    assert sock.message() == b"alive\n"
            assert run.thread.is_alive()
    finally:
        threading.excepthook = saved
    assert hooked == [exc_type]
    assert errors == []
