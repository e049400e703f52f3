"""Lifecycle: serve_forever/shutdown/handle_request, timeouts, exceptions,
signals (EINTR and PEP 475), Ctrl-C, and the ``python -m fastsocketserver``
command line.

Signal tests run in the main thread (CPython runs Python signal handlers
there only).  Every test that waits for something a broken implementation
might never do has a *watchdog* that, after ``RESCUE_AFTER`` seconds, unblocks
the server the ordinary way and records that it had to: a test then fails on
``rescued`` instead of hanging.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from conftest import (
    JOIN_TIMEOUT, STDLIB, STREAM_KINDS, RecordingServerMixin, call_with_timeout,
    default_handler, differential, fd_count, get_kind, make_server, names,
    normalize_calls, recv_exactly, recv_line, recv_until_eof, serving,
    settled_fd_count, stream_exchange, wait_for,
)

RESCUE_AFTER = 5.0
SUBPROCESS_TIMEOUT = 15.0


class Alarm(BaseException):
    """Raised by a test signal handler; a BaseException so that it is not
    caught by the server's ``except Exception`` paths."""


class AlarmError(Exception):
    """Raised by a test signal handler; an ordinary exception."""


def is_fast(module):
    return module is not STDLIB


# ---------------------------------------------------------------------------
# shutdown
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("warm", [True, False], ids=["after_request", "fresh"])
@pytest.mark.parametrize("kind_name", ["tcp", "tcp6", "unix_stream", "udp", "unix_dgram"])
def test_shutdown_while_idle(mod, kind_name, warm, unix_path):
    kind = get_kind(kind_name)
    # the stdlib waits out poll_interval (gh-88932): give it a short one
    poll_interval = 30.0 if is_fast(mod) else 0.1
    server = make_server(mod, kind, default_handler(mod, kind), unix_path)
    with serving(server, poll_interval=poll_interval) as st:
        if warm:
            # one round trip proves the loop is up and now idle in its wait
            if kind.stream:
                c = kind.client(server.server_address, unix_path)
                assert stream_exchange(c, [b"ping\n"]) == b"ping\n"
            else:
                with kind.client(server.server_address, unix_path) as c:
                    c.sendto(b"ping", server.server_address)
                    assert c.recvfrom(100)[0] == b"PING"
        else:
            time.sleep(0.2)
        t0 = time.monotonic()
        finished, _, exc = call_with_timeout(server.shutdown, timeout=JOIN_TIMEOUT)
        elapsed = time.monotonic() - t0
        assert finished and exc is None
        assert st.returned.wait(JOIN_TIMEOUT), "serve_forever did not return after shutdown()"
        assert st.exception is None
    if is_fast(mod):
        # fastsocketserver wakes its reactor at once (docs/ARCHITECTURE.md, Signals)
        assert elapsed < 2.0, f"shutdown() took {elapsed:.2f}s with poll_interval=30"


@pytest.mark.parametrize("kind_name", STREAM_KINDS)
def test_shutdown_with_request_in_flight(mod, kind_name, unix_path):
    kind = get_kind(kind_name)
    entered = threading.Event()

    class H(mod.StreamRequestHandler):
        def handle(self):
            entered.set()
            line = self.rfile.readline()
            self.wfile.write(b"late:" + line)

    poll_interval = 30.0 if is_fast(mod) else 0.1
    server = make_server(mod, kind, H, unix_path)
    with serving(server, poll_interval=poll_interval) as st:
        with kind.client(server.server_address, unix_path) as c:
            assert entered.wait(JOIN_TIMEOUT)
            done = threading.Event()
            shutter = threading.Thread(target=lambda: (server.shutdown(), done.set()),
                                       daemon=True)
            shutter.start()
            # shutdown() blocks until the loop finished: the request is in flight
            assert not done.wait(0.3), "shutdown() returned while a request was in flight"
            assert not st.returned.is_set()
            c.sendall(b"finish\n")
            assert recv_until_eof(c) == b"late:finish\n"
            assert done.wait(JOIN_TIMEOUT), "shutdown() did not return after the request"
            shutter.join(JOIN_TIMEOUT)
        assert st.returned.wait(JOIN_TIMEOUT)
        assert st.exception is None


def shutdown_during_request_scenario(module, kind_name, paths):
    """shutdown() is called while a request is being handled: the stdlib still
    runs service_actions() after that request before the loop exits."""
    kind = get_kind(kind_name)
    entered = threading.Event()
    release = threading.Event()

    class H(module.StreamRequestHandler):
        def handle(self):
            entered.set()
            release.wait(JOIN_TIMEOUT)
            self.wfile.write(self.rfile.readline())

    server = make_server(module, kind, H, paths, bases=(RecordingServerMixin,))
    with serving(server) as st:
        with kind.client(server.server_address, paths) as c:
            c.sendall(b"in flight\n")
            assert entered.wait(JOIN_TIMEOUT)
            shutter = threading.Thread(target=server.shutdown, daemon=True)
            shutter.start()
            time.sleep(0.1)  # let shutdown() set its flag (ordering aid only)
            release.set()
            seen = recv_until_eof(c)
        shutter.join(JOIN_TIMEOUT)
        assert st.returned.wait(JOIN_TIMEOUT)
    return normalize_calls(server.calls), seen


@pytest.mark.parametrize("kind_name", ["tcp", "unix_stream"])
def test_shutdown_during_request_still_runs_service_actions(mod, kind_name, unix_path):
    ref, got = differential(mod, shutdown_during_request_scenario, kind_name, unix_path)
    calls, seen = ref
    assert seen == b"in flight\n"
    assert names(calls)[-3:] == ["close_request", "service_actions", "server_close"]
    assert names(got[0]) == names(calls)
    assert got == ref


def test_serve_forever_can_restart_after_shutdown(mod, unix_path):
    kind = get_kind("tcp")
    server = make_server(mod, kind, default_handler(mod, kind), unix_path)
    try:
        for round_ in range(2):
            with serving(server, close=False):
                c = kind.client(server.server_address, unix_path)
                assert stream_exchange(c, [b"round %d\n" % round_]) == b"round %d\n" % round_
    finally:
        server.server_close()


# ---------------------------------------------------------------------------
# handle_request and timeouts
# ---------------------------------------------------------------------------

class TimeoutRecorder:
    def __init__(self, *args, **kwargs):
        self.timeouts = 0
        super().__init__(*args, **kwargs)

    def handle_timeout(self):
        self.timeouts += 1
        super().handle_timeout()


@pytest.mark.parametrize("kind_name", ["tcp", "unix_stream", "udp"])
def test_handle_request_timeout_calls_handle_timeout(mod, kind_name, unix_path):
    kind = get_kind(kind_name)
    server = make_server(mod, kind, default_handler(mod, kind), unix_path,
                         bases=(TimeoutRecorder,), attrs={"timeout": 0.3})
    try:
        t0 = time.monotonic()
        result = server.handle_request()
        elapsed = time.monotonic() - t0
    finally:
        server.server_close()
    assert result is None
    assert server.timeouts == 1
    assert elapsed >= 0.25, f"handle_request returned after {elapsed:.3f}s < timeout"
    assert elapsed < 0.3 + RESCUE_AFTER


@pytest.mark.parametrize("sock_timeout,server_timeout", [
    (0.2, 5.0), (5.0, 0.2), (0.2, None), (None, 0.0), (0.0, None),
])
def test_socket_timeout_vs_server_timeout(mod, sock_timeout, server_timeout, unix_path):
    """handle_request uses the smaller of server.socket's timeout and
    server.timeout."""
    kind = get_kind("tcp")
    server = make_server(mod, kind, default_handler(mod, kind), unix_path,
                         bases=(TimeoutRecorder,), attrs={"timeout": server_timeout})
    try:
        server.socket.settimeout(sock_timeout)
        assert server.socket.gettimeout() == sock_timeout
        t0 = time.monotonic()
        server.handle_request()
        elapsed = time.monotonic() - t0
    finally:
        server.server_close()
    smaller = min(t for t in (sock_timeout, server_timeout) if t is not None)
    assert server.timeouts == 1
    assert elapsed >= smaller * 0.9
    assert elapsed < 3.0, f"handle_request waited {elapsed:.2f}s; the smaller timeout is {smaller}"


def test_handle_request_serves_one_request(mod, unix_path):
    kind = get_kind("tcp")
    server = make_server(mod, kind, default_handler(mod, kind), unix_path,
                         bases=(TimeoutRecorder,), attrs={"timeout": JOIN_TIMEOUT})
    try:
        results = []
        for i in range(3):
            c = kind.client(server.server_address, unix_path)
            t = threading.Thread(target=lambda c=c, i=i: results.append(
                stream_exchange(c, [b"req%d\n" % i])), daemon=True)
            t.start()
            assert server.handle_request() is None
            t.join(JOIN_TIMEOUT)
        assert results == [b"req0\n", b"req1\n", b"req2\n"]
        assert server.timeouts == 0
    finally:
        server.server_close()


def handler_timeout_scenario(module, kind_name, paths):
    kind = get_kind(kind_name)

    class H(module.StreamRequestHandler):
        timeout = 0.3

        def handle(self):
            for line in self.rfile:
                self.wfile.write(line)

    server = make_server(module, kind, H, paths, bases=(RecordingServerMixin,))
    with serving(server):
        with kind.client(server.server_address, paths) as silent:
            # send nothing: the handler's readline times out
            wait_calls = wait_for(lambda: "handle_error" in names(server.calls))
            assert wait_calls, "handle_error was not called for the timed-out request"
            silent_saw = recv_until_eof(silent)
        c = kind.client(server.server_address, paths)
        next_saw = stream_exchange(c, [b"still serving\n"])
        assert wait_for(lambda: names(server.calls).count("close_request") >= 2)
    errors = [c for c in server.calls if c[0] == "handle_error"]
    return [e[3] for e in errors], silent_saw, next_saw


@pytest.mark.parametrize("kind_name", STREAM_KINDS)
def test_handler_timeout_reaches_handle_error(mod, kind_name, unix_path):
    ref, got = differential(mod, handler_timeout_scenario, kind_name, unix_path)
    assert ref == (["TimeoutError"], b"", b"still serving\n")
    assert got == ref


# ---------------------------------------------------------------------------
# exceptions in handlers
# ---------------------------------------------------------------------------

def base_exception_scenario(module, exc_type, via, paths):
    kind = get_kind("tcp")

    class H(module.StreamRequestHandler):
        def handle(self):
            line = self.rfile.readline()
            if line == b"raise\n":
                raise exc_type("from handler")
            self.wfile.write(line)

    server = make_server(module, kind, H, paths, bases=(RecordingServerMixin,),
                         attrs={"timeout": JOIN_TIMEOUT})
    out = {}
    try:
        c = kind.client(server.server_address, paths)
        c.sendall(b"raise\n")
        c.shutdown(socket.SHUT_WR)
        caught = None
        try:
            if via == "handle_request":
                server.handle_request()
            else:
                rescue = threading.Timer(RESCUE_AFTER, server.shutdown)
                rescue.daemon = True
                rescue.start()
                try:
                    server.serve_forever(0.05)
                finally:
                    rescue.cancel()
        except BaseException as exc:  # the point of the test
            caught = exc
        out["caught"] = type(caught).__name__ if caught else None
        out["caught_args"] = caught.args if caught else None
        out["client_saw"] = recv_until_eof(c)
        c.close()
        out["calls"] = [n for n in names(server.calls) if n != "service_actions"]
        # the server still serves
        c2 = kind.client(server.server_address, paths)
        t = threading.Thread(target=lambda: out.setdefault(
            "next", stream_exchange(c2, [b"again\n"])), daemon=True)
        t.start()
        server.handle_request()
        t.join(JOIN_TIMEOUT)
    finally:
        server.server_close()
    return out


@pytest.mark.parametrize("via", ["handle_request", "serve_forever"])
@pytest.mark.parametrize("exc_type", [SystemExit, KeyboardInterrupt])
def test_base_exceptions_propagate(mod, exc_type, via, main_thread, unix_path):
    ref, got = differential(mod, base_exception_scenario, exc_type, via, unix_path)
    assert ref["caught"] == exc_type.__name__
    assert ref["caught_args"] == ("from handler",)
    assert ref["client_saw"] == b""
    # shutdown_request is still called on the way out; handle_error is not
    assert ref["calls"] == ["server_bind", "server_activate", "get_request",
                            "verify_request", "process_request", "finish_request",
                            "shutdown_request", "close_request"]
    assert ref["next"] == b"again\n"
    assert got == ref


def _normalize_error_block(text):
    lines = text.splitlines()
    frames = re.findall(r'^\s*File "[^"]*", line \d+, in (\S+)$', text, re.M)
    return {
        "first": lines[0] if lines else None,
        "second": re.sub(r"\d+", "N", lines[1]) if len(lines) > 1 else None,
        "has_traceback": "Traceback (most recent call last):" in text,
        "last_frame": frames[-1] if frames else None,
        "exception_line": lines[-2] if len(lines) > 1 else None,
        "last": lines[-1] if lines else None,
    }


def default_handle_error_scenario(module, kind_name, capfd, paths):
    kind = get_kind(kind_name)

    class H(module.StreamRequestHandler):
        def handle(self):
            line = self.rfile.readline()
            if line == b"boom\n":
                raise ValueError("boom in handler")
            self.wfile.write(line)

    server = make_server(module, kind, H, paths)
    capfd.readouterr()
    with serving(server):
        c = kind.client(server.server_address, paths)
        first = stream_exchange(c, [b"boom\n"])
        c = kind.client(server.server_address, paths)
        second = stream_exchange(c, [b"fine\n"])
    captured = capfd.readouterr()
    return _normalize_error_block(captured.err), captured.out, first, second


@pytest.mark.parametrize("kind_name", ["tcp", "unix_stream"])
def test_default_handle_error_prints_block(mod, kind_name, capfd, unix_path):
    ref, got = differential(mod, default_handle_error_scenario, kind_name, capfd, unix_path)
    block, out, first, second = ref
    assert block["first"] == "-" * 40 and block["last"] == "-" * 40
    assert block["second"].startswith("Exception occurred during processing of request from")
    assert block["has_traceback"] and block["last_frame"] == "handle"
    assert block["exception_line"] == "ValueError: boom in handler"
    assert out == ""
    assert (first, second) == (b"", b"fine\n")
    assert got == ref


# ---------------------------------------------------------------------------
# signals
# ---------------------------------------------------------------------------

@contextlib.contextmanager
def sigalrm_handler(handler):
    old = signal.signal(signal.SIGALRM, handler)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def arm(delay=0.2, interval=0.0):
    signal.setitimer(signal.ITIMER_REAL, delay, interval)


def disarm():
    signal.setitimer(signal.ITIMER_REAL, 0)


class Rescue:
    """Runs ``action`` after RESCUE_AFTER seconds unless cancelled."""

    def __init__(self, action):
        self.fired = False
        self._action = action
        self._timer = threading.Timer(RESCUE_AFTER, self._fire)
        self._timer.daemon = True

    def _fire(self):
        self.fired = True
        try:
            self._action()
        except Exception:
            pass

    def __enter__(self):
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self._timer.cancel()


def _poke(address, family=socket.AF_INET):
    with socket.socket(family) as s:
        s.settimeout(2)
        s.connect(address)


@pytest.mark.parametrize("raising", [True, False], ids=["raising", "returning"])
@pytest.mark.parametrize("kind_name", ["tcp", "unix_stream", "udp"])
def test_signal_while_blocked_in_handle_request(mod, kind_name, raising, main_thread, unix_path):
    kind = get_kind(kind_name)
    calls = []

    def on_alarm(signum, frame):
        calls.append(signum)
        if raising:
            raise Alarm()

    server = make_server(mod, kind, default_handler(mod, kind), unix_path)
    addr = server.server_address

    def unblock():
        if kind.stream:
            with kind.client(addr, unix_path) as c:
                c.shutdown(socket.SHUT_WR)
                recv_until_eof(c)
        else:
            with kind.client(addr, unix_path) as c:
                c.sendto(b"rescue", addr)

    try:
        with sigalrm_handler(on_alarm), Rescue(unblock) as rescue:
            if raising:
                arm(0.1)
                with pytest.raises(Alarm):
                    server.handle_request()
                disarm()
            else:
                arm(0.05, 0.02)
                client_result = []

                def late_client():
                    # connect only after the handler ran a few times
                    wait_for(lambda: len(calls) >= 3, timeout=RESCUE_AFTER - 1)
                    if kind.stream:
                        c = kind.client(addr, unix_path)
                        client_result.append(stream_exchange(c, [b"after signals\n"]))
                    else:
                        with kind.client(addr, unix_path) as c:
                            c.sendto(b"after signals", addr)
                            client_result.append(c.recvfrom(100)[0])

                t = threading.Thread(target=late_client, daemon=True)
                t.start()
                assert server.handle_request() is None
                disarm()
                t.join(JOIN_TIMEOUT)
                assert client_result == [b"after signals\n" if kind.stream else b"AFTER SIGNALS"]
                assert len(calls) >= 3
        assert not rescue.fired, "the signal did not interrupt handle_request()"
    finally:
        server.server_close()


@pytest.mark.parametrize("kind_name", ["tcp", "unix_stream"])
def test_signal_while_blocked_in_serve_forever(mod, kind_name, main_thread, unix_path):
    kind = get_kind(kind_name)

    def on_alarm(signum, frame):
        raise Alarm()

    server = make_server(mod, kind, default_handler(mod, kind), unix_path)
    try:
        # a long poll_interval: the signal must interrupt the wait itself
        with sigalrm_handler(on_alarm), Rescue(server.shutdown) as rescue:
            arm(0.2)
            with pytest.raises(Alarm):
                server.serve_forever(poll_interval=RESCUE_AFTER)
            disarm()
        assert not rescue.fired, "the signal did not interrupt serve_forever()"
        # the server is still usable afterwards
        with serving(server, close=False):
            c = kind.client(server.server_address, unix_path)
            assert stream_exchange(c, [b"after\n"]) == b"after\n"
    finally:
        server.server_close()


BIG_WRITE = bytes(range(256)) * (16 * 4096)  # 16 MiB, far more than socket buffers


def _signal_in_handler_scenario(module, kind_name, op, behaviour, paths):
    """The handler (running inline in the main thread via handle_request())
    arms SIGALRM and then blocks in ``op``.  ``behaviour``: "base" (handler
    raises Alarm, a BaseException), "exception" (raises AlarmError), or
    "return" (handler returns; the blocked call must go on to completion)."""
    kind = get_kind(kind_name)
    calls = []
    big = BIG_WRITE

    def on_alarm(signum, frame):
        calls.append(signum)
        if behaviour == "base":
            raise Alarm()
        if behaviour == "exception":
            raise AlarmError("from signal handler")

    class H(module.StreamRequestHandler):
        def handle(self):
            if behaviour == "return":
                arm(0.05, 0.02)
            else:
                arm(0.05)
            if op == "readline":
                line = self.rfile.readline()
                disarm()
                self.wfile.write(b"got:" + line)
            elif op == "read":
                data = self.rfile.read(200000)
                disarm()
                self.wfile.write(b"got:%d:%d\n" % (len(data), sum(data) % 65521))
            elif op == "write":
                n = self.wfile.write(big)
                disarm()
                self.server.write_result = n

    server = make_server(module, kind, H, paths, bases=(RecordingServerMixin,),
                         attrs={"timeout": JOIN_TIMEOUT})
    server.write_result = None
    result = {}
    c = kind.client(server.server_address, paths, connect=False)
    try:
        if op == "write":
            c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        c.connect(server.server_address)
    except BaseException:
        c.close()
        server.server_close()
        raise
    reader_box = {}

    def feed():
        """What the client does once the signal handler has run (or, for
        raising handlers, what the rescue does)."""
        if op == "readline":
            c.sendall(b"a complete line\n")
        elif op == "read":
            c.sendall(bytes(i % 256 for i in range(100000)))
        elif op == "write":
            reader_box["data"] = recv_exactly(c, len(big))

    try:
        if op == "read":
            c.sendall(bytes(i % 256 for i in range(100000)))  # first half only
        with sigalrm_handler(on_alarm), Rescue(feed) as rescue:
            if behaviour == "return":
                feeder = threading.Thread(
                    target=lambda: (wait_for(lambda: len(calls) >= 3,
                                             timeout=RESCUE_AFTER - 1), feed()),
                    daemon=True)
                feeder.start()
            caught = None
            try:
                server.handle_request()
            except BaseException as exc:
                caught = exc
            disarm()
            if behaviour == "return":
                feeder.join(JOIN_TIMEOUT)
        result["rescued"] = rescue.fired
        result["caught"] = type(caught).__name__ if caught else None
        result["signal_handler_ran"] = len(calls) >= (3 if behaviour == "return" else 1)
        if op == "write":
            data = reader_box.get("data")
            if behaviour == "return":
                result["write_result"] = server.write_result
                result["received_intact"] = data == big
                c.shutdown(socket.SHUT_WR)
                result["after"] = recv_until_eof(c)
        else:
            c.shutdown(socket.SHUT_WR)
            result["client_saw"] = recv_until_eof(c)
        result["calls"] = [(e[0], e[3]) if e[0] == "handle_error" else e[0]
                           for e in server.calls if e[0] != "service_actions"]
    finally:
        c.close()
        server.server_close()
    return result


@pytest.mark.parametrize("behaviour", ["base", "exception", "return"])
@pytest.mark.parametrize("op", ["readline", "read", "write"])
@pytest.mark.parametrize("kind_name", ["tcp", "unix_stream"])
def test_signal_while_handler_blocked(mod, kind_name, op, behaviour, main_thread, unix_path):
    ref, got = differential(mod, _signal_in_handler_scenario, kind_name, op, behaviour,
                            unix_path)
    assert ref["rescued"] is False
    assert ref["signal_handler_ran"]
    handler_calls = ["server_bind", "server_activate", "get_request", "verify_request",
                     "process_request", "finish_request"]
    if behaviour == "base":
        assert ref["caught"] == "Alarm"
        assert ref["calls"] == handler_calls + ["shutdown_request", "close_request"]
    elif behaviour == "exception":
        assert ref["caught"] is None
        assert ref["calls"] == handler_calls + [("handle_error", "AlarmError"),
                                                "shutdown_request", "close_request"]
    else:
        assert ref["caught"] is None
        assert ref["calls"] == handler_calls + ["shutdown_request", "close_request"]
        if op == "readline":
            assert ref["client_saw"] == b"got:a complete line\n"
        elif op == "read":
            expected = sum(i % 256 for i in range(100000)) * 2 % 65521
            assert ref["client_saw"] == b"got:200000:%d\n" % expected
        else:
            assert ref["received_intact"] and ref["write_result"] == len(BIG_WRITE)
            assert ref["after"] == b""
    assert got == ref, f"rescued={got.get('rescued')}"


# ---------------------------------------------------------------------------
# Ctrl-C in a real process
# ---------------------------------------------------------------------------

def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class LineReader:
    """Collects lines from a subprocess pipe in a thread."""

    def __init__(self, pipe, name):
        self.lines = queue.Queue()
        self.all = []
        self._t = threading.Thread(target=self._run, args=(pipe,), daemon=True, name=name)
        self._t.start()

    def _run(self, pipe):
        for line in iter(pipe.readline, ""):
            self.all.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, pattern, timeout=SUBPROCESS_TIMEOUT):
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                return None
            if line is None:
                return None
            m = re.search(pattern, line)
            if m:
                return m

    def text(self):
        self._t.join(SUBPROCESS_TIMEOUT)
        return "".join(self.all)


@contextlib.contextmanager
def child_process(args, cwd=None, env_extra=None):
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(env_extra or {})
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd, env=env,
                            preexec_fn=_default_sigint)
    out = LineReader(proc.stdout, "child-stdout")
    err = LineReader(proc.stderr, "child-stderr")
    try:
        yield proc, out, err
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(SUBPROCESS_TIMEOUT)
        proc.stdout.close()
        proc.stderr.close()


CTRL_C_CHILD = textwrap.dedent("""
    import importlib, sys
    ss = importlib.import_module(sys.argv[1])
    where = sys.argv[2]

    class H(ss.StreamRequestHandler):
        def handle(self):
            print("IN-HANDLER", flush=True)
            self.rfile.readline()

    server = ss.TCPServer(("127.0.0.1", 0), H)
    print("PORT", server.server_address[1], flush=True)
    if where == "handle_request":
        server.handle_request()
    else:
        server.serve_forever(poll_interval=30)
""")


@pytest.mark.parametrize("where", ["serve_forever", "handle_request", "in_handler"])
def test_ctrl_c_stops_server_process(mod, where, unix_dir):
    args = [sys.executable, "-c", CTRL_C_CHILD, mod.__name__,
            "serve_forever" if where == "in_handler" else where]
    with child_process(args, cwd=unix_dir) as (proc, out, err):
        m = out.wait_for(r"PORT (\d+)")
        assert m, f"child did not report its port; stderr: {err.text()}"
        client = None
        try:
            if where == "in_handler":
                client = socket.create_connection(("127.0.0.1", int(m.group(1))), timeout=10)
                assert out.wait_for(r"IN-HANDLER"), "handler did not start"
            else:
                time.sleep(0.2)  # let it reach its wait
            proc.send_signal(signal.SIGINT)
            try:
                rc = proc.wait(SUBPROCESS_TIMEOUT)
            except subprocess.TimeoutExpired:
                rc = None
        finally:
            if client is not None:
                client.close()
        stderr = err.text()
    assert rc is not None, "the server process did not exit after SIGINT"
    assert rc != 0
    assert "KeyboardInterrupt" in stderr, stderr


# ---------------------------------------------------------------------------
# resources
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind_name", ["tcp", "unix_stream", "udp"])
def test_no_fd_leak_after_many_requests(mod, kind_name, unix_path):
    kind = get_kind(kind_name)
    # warm up (lazily created objects, imported modules)
    server = make_server(mod, kind, default_handler(mod, kind), unix_path)
    with serving(server):
        if kind.stream:
            stream_exchange(kind.client(server.server_address, unix_path), [b"warm\n"])
    before = settled_fd_count()
    server = make_server(mod, kind, default_handler(mod, kind), unix_path)
    with serving(server):
        for i in range(150):
            if kind.stream:
                c = kind.client(server.server_address, unix_path)
                assert stream_exchange(c, [b"%d\n" % i]) == b"%d\n" % i
            else:
                with kind.client(server.server_address, unix_path) as c:
                    c.sendto(b"%d" % i, server.server_address)
                    assert c.recvfrom(100)[0] == b"%d" % i
    assert wait_for(lambda: settled_fd_count() <= before, timeout=3), (
        f"fd count {fd_count()} > {before} after 150 requests and server_close()")


def unix_path_left_scenario(module, kind_name, paths):
    kind = get_kind(kind_name)
    server = make_server(module, kind, default_handler(module, kind), paths)
    path = server.server_address
    existed = os.path.exists(path)
    server.server_close()
    left = os.path.exists(path)
    try:
        again = None
        try:
            s2 = type(server)(path, default_handler(module, kind))
            s2.server_close()
            again = "ok"
        except OSError as exc:
            again = (type(exc).__name__, exc.errno)
    finally:
        if os.path.exists(path):
            os.unlink(path)
    return existed, left, again


@pytest.mark.parametrize("kind_name", ["unix_stream", "unix_dgram"])
def test_unix_socket_path_is_left_after_close(mod, kind_name, unix_path):
    """Like the stdlib, server_close() does not unlink the path, so binding it
    again fails with EADDRINUSE."""
    ref, got = differential(mod, unix_path_left_scenario, kind_name, unix_path)
    assert ref == (True, True, ("OSError", errno.EADDRINUSE))
    assert got == ref


# ---------------------------------------------------------------------------
# python -m fastsocketserver
# ---------------------------------------------------------------------------

ADDRESS_RE = r"(tcp|udp|unix)://(\S+)"


def _cli(args):
    return [sys.executable, "-m", "fastsocketserver"] + list(args)


def _stop_cli(proc, err):
    proc.send_signal(signal.SIGINT)
    try:
        rc = proc.wait(SUBPROCESS_TIMEOUT)
    except subprocess.TimeoutExpired:
        rc = None
    stderr = err.text()
    assert rc is not None, "server did not exit on SIGINT"
    assert rc in (0, 130, -signal.SIGINT), (rc, stderr)
    assert "Traceback" not in stderr, stderr


def _find_address(out, err):
    """The address line may go to stdout or stderr."""
    found = []

    def scan(reader):
        m = reader.wait_for(ADDRESS_RE)
        if m:
            found.append(m)

    threads = [threading.Thread(target=scan, args=(r,), daemon=True) for r in (out, err)]
    for t in threads:
        t.start()
    # stop early when the child exits (both pipes at EOF) without the line
    wait_for(lambda: found or not any(t.is_alive() for t in threads),
             timeout=SUBPROCESS_TIMEOUT)
    assert found, f"no address line printed; stderr: {err.text()[-2000:]}"
    return found[0]


def test_cli_help(fast_mod):
    proc = subprocess.run(_cli(["--help"]), capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout.lower()
    assert "usage" in text
    for option in ("--port", "--udp", "--unix"):
        assert option in proc.stdout


def test_cli_tcp_line_echo(fast_mod, unix_dir):
    with child_process(_cli(["--port", "0"]), cwd=unix_dir) as (proc, out, err):
        m = _find_address(out, err)
        assert m.group(1) == "tcp"
        host, port = m.group(2).rsplit(":", 1)
        assert host == "127.0.0.1"
        with socket.create_connection((host, int(port)), timeout=10) as c:
            c.sendall(b"hello cli\n")
            assert recv_line(c) == b"hello cli\n"
            c.sendall(b"second\n")
            assert recv_line(c) == b"second\n"
        _stop_cli(proc, err)


def test_cli_udp_echo(fast_mod, unix_dir):
    with child_process(_cli(["--udp", "--port", "0"]), cwd=unix_dir) as (proc, out, err):
        m = _find_address(out, err)
        assert m.group(1) == "udp"
        host, port = m.group(2).rsplit(":", 1)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
            c.settimeout(10)
            c.sendto(b"datagram\n", (host, int(port)))
            assert c.recvfrom(1000)[0] == b"datagram\n"
        _stop_cli(proc, err)


def test_cli_unix_stream(fast_mod, unix_dir):
    path = os.path.join(unix_dir, "cli.sock")
    with child_process(_cli(["--unix", path]), cwd=unix_dir) as (proc, out, err):
        m = _find_address(out, err)
        assert m.group(1) == "unix"
        assert m.group(2) == path
        with socket.socket(socket.AF_UNIX) as c:
            c.settimeout(10)
            c.connect(path)
            c.sendall(b"over unix\n")
            assert recv_line(c) == b"over unix\n"
        _stop_cli(proc, err)


HANDLER_MODULE = textwrap.dedent("""
    import fastsocketserver as socketserver

    class Upper(socketserver.StreamRequestHandler):
        def handle(self):
            for line in self.rfile:
                self.wfile.write(b"UP:" + line.upper())
""")


def test_cli_custom_handler(fast_mod, unix_dir):
    with open(os.path.join(unix_dir, "cli_handler_mod.py"), "w") as f:
        f.write(HANDLER_MODULE)
    env = {"PYTHONPATH": unix_dir + os.pathsep + os.environ.get("PYTHONPATH", "")}
    args = _cli(["--port", "0", "cli_handler_mod:Upper"])
    with child_process(args, cwd=unix_dir, env_extra=env) as (proc, out, err):
        m = _find_address(out, err)
        host, port = m.group(2).rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as c:
            c.sendall(b"shout\n")
            assert recv_line(c) == b"UP:SHOUT\n"
        _stop_cli(proc, err)
