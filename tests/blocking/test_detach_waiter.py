"""``detach()`` from one thread while another waits on the request, as with the stdlib.

Differential: each scenario runs inside a handler of a stdlib server and of a
fastsocketserver server with the same client, and the results must be equal.

* ``detach()`` returns a descriptor for the socket, which a new ``socket.socket``
  owns and uses;
* a thread waiting in ``recv`` with a timeout gets ``OSError(EBADF)`` once the socket
  becomes readable, and the data stays for the new owner;
* a thread waiting in a blocking ``recv`` gets what arrives (the kernel call goes
  on), and its next call is ``OSError(EBADF)``;
* a thread blocked in ``sendfile`` while the new owner closes the descriptor: the
  kernel call under way sends the rest of the file, the next one fails, so
  ``sendfile`` ends with ``OSError(EBADF)``; the peer gets the file and the end of
  the stream.

The waiter never uses a number the connection no longer owns: the engine keeps the
waiter's number allocated until the wait ends.
"""

from __future__ import annotations

import os
import platform
import signal
import socket
import threading
import time

import pytest

from conftest import JOIN_TIMEOUT, recv_until_eof
from handler_probe import in_handler

STREAMS = ["tcp", "unix_stream"]

#: system call numbers that mean "waiting on the socket" (/proc/.../syscall)
WAITING = {
    "x86_64": {"recvfrom": 45, "poll": 7, "ppoll": 271, "sendfile": 40},
    "aarch64": {"recvfrom": 207, "ppoll": 73, "sendfile": 71},
}.get(platform.machine(), {})


def wait_in_syscall(tid: int, names: set[str]) -> None:
    """Wait until thread ``tid`` sits in one of the system calls ``names``."""
    wanted = {WAITING[n] for n in names if n in WAITING}
    deadline = time.monotonic() + JOIN_TIMEOUT
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/self/task/{tid}/syscall") as f:
                first = f.read().split()[0]
        except (OSError, IndexError):
            time.sleep(0.2)  # no way to look: give the thread time to get there
            return
        if first.isdigit() and int(first) in wanted:
            return
        time.sleep(0.002)
    raise AssertionError(f"thread {tid} never waited in {names}")


def detail(fn, *args):
    try:
        return fn(*args)
    except Exception as exc:
        return ("raised", type(exc).__name__, getattr(exc, "errno", None))


class Waiter(threading.Thread):
    def __init__(self, calls):
        super().__init__(daemon=True)
        self.calls = calls
        self.results = []
        self.tid = None
        self.started_event = threading.Event()

    def run(self):
        self.tid = threading.get_native_id()
        self.started_event.set()
        for fn, args in self.calls:
            self.results.append(detail(fn, *args))


def detach_scenario(module, kind_name, paths, timeout):
    go = threading.Event()

    def probe(handler):
        req = handler.request
        req.settimeout(timeout)
        waiter = Waiter([(req.recv, (10,)), (req.recv, (10,))])
        waiter.start()
        assert waiter.started_event.wait(JOIN_TIMEOUT)
        wait_in_syscall(waiter.tid, {"recvfrom", "poll", "ppoll"})
        fd = req.detach()
        gone = (req.fileno(), detail(req.recv, 1))
        sock = socket.socket(fileno=fd)
        try:
            sock.settimeout(JOIN_TIMEOUT)
            go.set()
            waiter.join(JOIN_TIMEOUT)
            assert not waiter.is_alive()
            # What the waiter did not take is the new owner's.
            rest = sock.recv(100) if timeout is not None else None
            sock.sendall(b"from the new owner")
            sock.shutdown(socket.SHUT_WR)
            tail = recv_until_eof(sock)
        finally:
            sock.close()
        return fd >= 0, gone, waiter.results, rest, tail

    def client(sock):
        assert go.wait(JOIN_TIMEOUT)
        sock.sendall(b"data")
        got = b""
        while not got.endswith(b"owner"):
            chunk = sock.recv(100)
            if not chunk:
                break
            got += chunk
        sock.shutdown(socket.SHUT_WR)
        return got

    return in_handler(module, kind_name, paths, probe, client=client)


@pytest.mark.parametrize("timeout", [None, 5.0], ids=["blocking", "timeout"])
@pytest.mark.parametrize("kind_name", STREAMS)
def test_detach_while_another_thread_waits_in_recv(mod, kind_name, timeout, unix_path):
    from conftest import differential

    ref, got = differential(mod, detach_scenario, kind_name, unix_path, timeout)
    value, client = ref
    assert value[1] == (-1, ("raised", "OSError", 9))
    if timeout is None:
        assert value[2] == [b"data", ("raised", "OSError", 9)]
    else:
        assert value[2] == [("raised", "OSError", 9)] * 2
        assert value[3] == b"data"
    assert client == b"from the new owner"
    assert got == ref


def sendfile_scenario(module, kind_name, paths, tmp_path):
    path = tmp_path / "payload"
    path.write_bytes(b"z" * (32 << 20))
    go = threading.Event()

    def probe(handler):
        req = handler.request
        with open(path, "rb") as f:
            waiter = Waiter([(req.sendfile, (f,))])
            waiter.start()
            assert waiter.started_event.wait(JOIN_TIMEOUT)
            # The client does not read yet: the send buffer fills, sendfile blocks.
            wait_in_syscall(waiter.tid, {"sendfile", "poll", "ppoll"})
            fd = req.detach()
            os.close(fd)
            go.set()
            waiter.join(JOIN_TIMEOUT)
            assert not waiter.is_alive()
            return waiter.results, req.fileno()

    def client(sock):
        assert go.wait(JOIN_TIMEOUT)
        return len(recv_until_eof(sock))

    return in_handler(module, kind_name, paths, probe, client=client)


@pytest.mark.parametrize("kind_name", STREAMS)
def test_detach_and_close_while_the_owner_is_in_sendfile(mod, kind_name, unix_path, tmp_path):
    from conftest import differential

    ref, got = differential(mod, sendfile_scenario, kind_name, unix_path, tmp_path)
    # The call blocked in the kernel goes on to the end of the file; the next fails.
    assert ref == (([("raised", "OSError", 9)], -1), 32 << 20)
    assert got == ref


def reuse_scenario(module, kind_name, paths):
    """The new owner closes the descriptor and the number goes to another socket; a
    signal then interrupts the waiter, whose retry must not read that socket."""

    def probe(handler):
        req = handler.request
        waiter = Waiter([(req.recv, (10,))])
        waiter.start()
        assert waiter.started_event.wait(JOIN_TIMEOUT)
        wait_in_syscall(waiter.tid, {"recvfrom"})
        os.close(req.detach())
        a, b = socket.socketpair()
        try:
            b.sendall(b"foreign")
            signal.pthread_kill(waiter.ident, signal.SIGUSR1)
            waiter.join(JOIN_TIMEOUT)
            assert not waiter.is_alive()
            a.settimeout(0)
            return waiter.results, detail(a.recv, 100)
        finally:
            a.close()
            b.close()

    return in_handler(module, kind_name, paths, probe)


@pytest.mark.parametrize("kind_name", STREAMS)
def test_a_waiter_never_uses_a_number_reused_after_detach(mod, kind_name, unix_path, main_thread):
    from conftest import differential

    previous = signal.signal(signal.SIGUSR1, lambda *args: None)
    try:
        ref, got = differential(mod, reuse_scenario, kind_name, unix_path)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert ref == ([("raised", "OSError", 9)], b"foreign")
    assert got == ref


def test_sendfile_never_reads_a_file_number_reused_meanwhile(fast_mod, unix_path, tmp_path):
    """The file is closed while ``sendfile`` is blocked and its number goes to another
    file: the engine sends from a descriptor of its own, only the first file's bytes.
    (The stdlib sends from the number, whatever it names by then.)"""
    payload = tmp_path / "payload"
    payload.write_bytes(b"p" * (8 << 20))
    other = tmp_path / "other"
    other.write_bytes(b"o" * (16 << 20))  # longer: its bytes lie past the offset reached
    go = threading.Event()

    def probe(handler):
        f = open(payload, "rb")
        waiter = Waiter([(handler.request.sendfile, (f,))])
        waiter.start()
        assert waiter.started_event.wait(JOIN_TIMEOUT)
        wait_in_syscall(waiter.tid, {"sendfile"})
        number = f.fileno()
        f.close()
        with open(other, "rb") as g:
            reused = g.fileno() == number
            go.set()
            waiter.join(JOIN_TIMEOUT)
            assert not waiter.is_alive()
        return reused, waiter.results

    def client(sock):
        assert go.wait(JOIN_TIMEOUT)
        return recv_until_eof(sock)

    (reused, results), data = in_handler(fast_mod, "tcp", unix_path, probe, client=client)
    assert reused, "the test needs the closed number to be reused"
    # Positioning the closed file afterwards fails, as in the stdlib.
    assert results == [("raised", "ValueError", None)]
    assert data == payload.read_bytes()
