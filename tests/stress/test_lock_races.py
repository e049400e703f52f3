"""Races of the lifecycle calls, hundreds of rounds each: no hang, no leaked descriptor.

Every round starts a server on a thread and then races, from other threads,
``shutdown()``, ``server_close()``, ``handle_request()`` and the collection of the
server, in the orders the stdlib's users write them: a ``with`` block that closes the
server as soon as ``serve_forever()`` returns while another thread is still inside
``shutdown()`` (every http.server test fixture does this), ``server_close()`` from another
thread during a wait, ``handle_request(timeout)`` beside a running ``serve_forever()``.

A round that does not finish in time fails the test with every thread's stack (the
engine's lock rule broken shows up here as a hang, not as an assertion).
"""

from __future__ import annotations

import asyncio
import faulthandler
import gc
import io
import os
import random
import socket
import sys
import threading
import time

import pytest

import fastsocketserver as fss

ROUNDS = 300
#: How long one round may take before it counts as a hang.
ROUND_LIMIT = 10.0
#: The whole test gives up (failing) after this long, whatever the round count.
TEST_LIMIT = 60.0


class Quiet(fss.BaseRequestHandler):
    def handle(self) -> None:
        pass


class Echo(asyncio.Protocol):
    def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _stacks() -> str:
    out = io.StringIO()
    # faulthandler writes to a real file descriptor, so go through a temporary file.
    import tempfile

    with tempfile.TemporaryFile("w+") as f:
        faulthandler.dump_traceback(f, all_threads=True)
        f.seek(0)
        out.write(f.read())
    return out.getvalue()


def _make(kind: str, tmp_path) -> fss.BaseServer:  # type: ignore[no-untyped-def]
    if kind == "TCPServer":
        return fss.TCPServer(("127.0.0.1", 0), Quiet)
    if kind == "ThreadingTCPServer":
        return fss.ThreadingTCPServer(("127.0.0.1", 0), Quiet)
    if kind == "UDPServer":
        return fss.UDPServer(("127.0.0.1", 0), Quiet)
    if kind == "UnixStreamServer":
        path = str(tmp_path / f"s{random.getrandbits(40)}")
        return fss.UnixStreamServer(path, Quiet)
    if kind == "protocol":
        return fss.TCPServer(("127.0.0.1", 0), Echo)
    raise AssertionError(kind)


def _poke(server: fss.BaseServer) -> None:
    """Send the server one request (best effort: the server may be closing)."""
    try:
        if server.socket_type == socket.SOCK_DGRAM:  # type: ignore[attr-defined]
            with socket.socket(server.address_family, socket.SOCK_DGRAM) as c:  # type: ignore[attr-defined]
                c.sendto(b"x", server.server_address)
        else:
            with socket.socket(server.address_family, socket.SOCK_STREAM) as c:  # type: ignore[attr-defined]
                c.settimeout(1.0)
                c.connect(server.server_address)
                c.sendall(b"x\n")
    except OSError:
        pass


def _serve_then_close(server: fss.BaseServer, errors: list) -> None:
    """The fixture shape: serve until shut down, then close at once (a ``with`` block)."""
    try:
        with server:
            server.serve_forever(poll_interval=random.choice([0.01, 0.5, None]))
    except BaseException as exc:  # noqa: BLE001 -- reported by the test
        errors.append(exc)


def _scenario_fixture(server: fss.BaseServer, errors: list) -> list[threading.Thread]:
    serving = threading.Thread(target=_serve_then_close, args=(server, errors))
    serving.start()
    if random.random() < 0.5:
        _poke(server)
    time.sleep(random.choice([0, 0, 0.0005, 0.002]))
    stopper = threading.Thread(target=server.shutdown)
    stopper.start()
    return [serving, stopper]


def _scenario_close_during_wait(server: fss.BaseServer, errors: list) -> list[threading.Thread]:
    def serve() -> None:
        try:
            server.serve_forever(poll_interval=random.choice([0.01, 0.5]))
        except (ValueError, OSError):
            pass  # the loop may find the server already closed: as the stdlib's would
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    serving = threading.Thread(target=serve)
    serving.start()
    time.sleep(random.choice([0, 0.0005, 0.002]))
    closer = threading.Thread(target=server.server_close)
    closer.start()
    stopper = threading.Thread(target=server.shutdown)
    stopper.start()
    return [serving, closer, stopper]


def _scenario_handle_request_beside(server: fss.BaseServer, errors: list) -> list[threading.Thread]:
    server.timeout = 0.05  # type: ignore[assignment]
    serving = threading.Thread(target=_serve_then_close, args=(server, errors))
    serving.start()

    def handle() -> None:
        for _ in range(2):
            try:
                server.handle_request()
            except (ValueError, OSError):
                return  # closed under it
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                return

    other = threading.Thread(target=handle)
    other.start()
    if random.random() < 0.5:
        _poke(server)
    time.sleep(random.choice([0, 0.001, 0.01]))
    stopper = threading.Thread(target=server.shutdown)
    stopper.start()
    return [serving, other, stopper]


SCENARIOS = [_scenario_fixture, _scenario_close_during_wait, _scenario_handle_request_beside]


@pytest.mark.parametrize("kind", ["TCPServer", "ThreadingTCPServer", "UDPServer", "UnixStreamServer", "protocol"])
def test_lifecycle_races_never_hang(kind: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    gc.collect()
    fds_before = _fd_count()
    started = time.monotonic()
    rounds = 0
    for rounds in range(1, ROUNDS + 1):
        errors: list = []
        scenario = random.choice(SCENARIOS)
        server = _make(kind, tmp_path)
        threads = scenario(server, errors)
        deadline = time.monotonic() + ROUND_LIMIT
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        hung = [t for t in threads if t.is_alive()]
        if hung:
            pytest.fail(f"round {rounds} ({scenario.__name__}) hung; threads:\n{_stacks()}")
        assert not errors, (scenario.__name__, errors)
        server.server_close()  # idempotent, as the stdlib's
        del server, threads
        if rounds % 10 == 0:
            gc.collect()  # collection of servers races nothing here but must free them
        if time.monotonic() - started > TEST_LIMIT:
            break
    assert rounds >= 50, f"only {rounds} rounds in {TEST_LIMIT} s"
    gc.collect()
    # Every server, poller, waker and connection of the rounds is gone.
    assert _fd_count() <= fds_before


def test_handle_request_timeout_beside_serve_forever() -> None:
    """``handle_request()`` with a timeout from one thread while another runs
    ``serve_forever()`` returns after about its timeout and calls ``handle_timeout``,
    as on the stdlib (both threads wait on the listener; here they take turns)."""
    timeouts = []

    class Server(fss.TCPServer):
        timeout = 0.2

        def handle_timeout(self) -> None:
            timeouts.append(threading.current_thread().name)

    with Server(("127.0.0.1", 0), Quiet) as server:
        serving = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
        serving.start()
        try:
            returned = []
            other = threading.Thread(target=lambda: returned.append(server.handle_request()), name="other")
            other.start()
            other.join(10)
            assert not other.is_alive(), "handle_request(timeout) never returned"
            assert timeouts == ["other"]
        finally:
            server.shutdown()
            serving.join(10)
    assert not serving.is_alive()


def test_sigterm_handler_shutdown_from_thread_then_close() -> None:
    """The daemon recipe: a SIGTERM handler starts ``shutdown()`` on a thread (it must not
    block the main thread, which runs ``serve_forever``), and the ``with`` block closes
    the server as soon as the loop returns."""
    import signal
    import subprocess

    code = r"""
import os, signal, sys, threading, time
import fastsocketserver as fss

class H(fss.BaseRequestHandler):
    def handle(self):
        pass

for _ in range(40):
    with fss.TCPServer(("127.0.0.1", 0), H) as server:
        signal.signal(signal.SIGTERM, lambda *a: threading.Thread(target=server.shutdown).start())
        threading.Timer(0.005, os.kill, (os.getpid(), signal.SIGTERM)).start()
        server.serve_forever(poll_interval=0.5)
print("done")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "done"


@pytest.mark.parametrize("kind", ["TCPServer", "ThreadingTCPServer", "UDPServer", "UnixStreamServer", "protocol"])
def test_servers_dropped_unclosed_under_collection(kind: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Servers shut down from one thread and then dropped without ``server_close()``
    while another thread collects garbage without pause: no hang, and once they are all
    collected every listener, poller and waker they had is closed."""
    gc.collect()
    fds_before = _fd_count()
    collecting = threading.Event()
    collecting.set()

    def collector() -> None:
        while collecting.is_set():
            gc.collect()
            time.sleep(random.choice([0, 0.0005]))

    background = threading.Thread(target=collector, daemon=True)
    background.start()
    started = time.monotonic()
    rounds = 0
    try:
        for rounds in range(1, ROUNDS // 2 + 1):
            errors: list = []
            server = _make(kind, tmp_path)

            def serve(server=server) -> None:  # type: ignore[no-untyped-def]
                try:
                    server.serve_forever(poll_interval=random.choice([0.01, 0.5]))
                except BaseException as exc:  # noqa: BLE001 -- reported by the test
                    errors.append(exc)

            serving = threading.Thread(target=serve)
            serving.start()
            if random.random() < 0.5:
                _poke(server)
            stopper = threading.Thread(target=server.shutdown)
            stopper.start()
            del server  # the threads hold the last references
            deadline = time.monotonic() + ROUND_LIMIT
            for t in (serving, stopper):
                t.join(max(0.0, deadline - time.monotonic()))
            if serving.is_alive() or stopper.is_alive():
                pytest.fail(f"round {rounds} hung; threads:\n{_stacks()}")
            assert not errors, errors
            del serving, stopper, serve
            if time.monotonic() - started > TEST_LIMIT:
                break
    finally:
        collecting.clear()
        background.join(ROUND_LIMIT)
    assert rounds >= 50, f"only {rounds} rounds in {TEST_LIMIT} s"
    for _ in range(3):
        gc.collect()
    assert _fd_count() <= fds_before
