"""``self.request`` has the message-level calls of ``socket.socket``.

Differential: each scenario runs inside a handler of a stdlib server and of a
fastsocketserver server (``handler_probe.in_handler``) with the same client, and
the recorded results must be equal.

* ``recvmsg``, ``recvmsg_into``, ``recvfrom_into`` and ``sendmsg`` return what the
  stdlib returns (data, ancillary data as ``(level, type, data)`` tuples,
  ``msg_flags``, address), with its argument checks, its exceptions (a closed or
  detached socket is ``OSError(EBADF)``) and its timeouts;
* descriptors pass both ways on a Unix stream connection (``socket.send_fds`` /
  ``socket.recv_fds``); received ones are inheritable, as CPython leaves them;
  a control buffer too small for them is reported with ``MSG_CTRUNC``;
* ``get_inheritable`` / ``set_inheritable``.
"""

from __future__ import annotations

import array
import gc
import os
import socket
import threading
import time

import pytest

from conftest import JOIN_TIMEOUT, differential, fd_count, recv_exactly
from handler_probe import in_handler

STREAMS = ["tcp", "unix_stream"]


def detail(fn, *args, **kwargs):
    """``fn(...)``'s value, or the exception's type, errno and (for the messages the
    engine copies) text."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        return ("raised", type(exc).__name__, getattr(exc, "errno", None))


def message(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except Exception as exc:
        return (type(exc).__name__, str(exc))
    return None


def settled(module):
    """The descriptor count once earlier tests' collected sockets are closed."""
    gc.collect()
    if module.__name__ == "fastsocketserver":
        module._core._settle_closes()
    return fd_count()


def fast_request_is_the_engines(module, handler):
    if module.__name__ == "fastsocketserver":
        assert type(handler.request).__name__ == "Connection"


# -- data ------------------------------------------------------------------------


def exchange_scenario(module, kind_name, paths):
    waiting = threading.Event()

    def probe(handler):
        fast_request_is_the_engines(module, handler)
        req = handler.request
        waiting.set()
        # The client sends only once this thread is waiting: the wait must release the GIL.
        first = req.recvmsg(5, 0, socket.MSG_WAITALL)
        a, b = bytearray(2), bytearray(4)
        into = req.recvmsg_into([a, memoryview(b)], 0, socket.MSG_WAITALL)
        c = bytearray(8)
        frm = req.recvfrom_into(c, 3, socket.MSG_WAITALL)
        d = bytearray(5)
        frm_kw = req.recvfrom_into(buffer=d, flags=socket.MSG_WAITALL)
        sent = req.sendmsg([b"ab", memoryview(b"cd"), bytearray(b"ef")])
        sent2 = req.sendmsg(iter([b"gh"]), iter([]), 0, None)
        sent3 = req.sendmsg([], [])
        return (first, into, bytes(a), bytes(b), frm, bytes(c), frm_kw, bytes(d),
                sent, sent2, sent3)

    def client(sock):
        assert waiting.wait(JOIN_TIMEOUT)
        time.sleep(0.05)
        sock.sendall(b"hello world, again!")
        return recv_exactly(sock, 8)

    return in_handler(module, kind_name, paths, probe, client=client)


@pytest.mark.parametrize("kind_name", STREAMS)
def test_message_calls_exchange_data_like_the_stdlib(mod, kind_name, unix_path):
    ref, got = differential(mod, exchange_scenario, kind_name, unix_path)
    assert ref[0][0] == (b"hello", [], 0, None)
    assert ref[1] == b"abcdefgh"
    assert got == ref


def truncate_flag_scenario(module, kind_name, paths):
    def probe(handler):
        req = handler.request
        data, anc, flags, addr = req.recvmsg(4, 0, socket.MSG_TRUNC | socket.MSG_WAITALL)
        n, anc2, flags2, addr2 = req.recvmsg_into([bytearray(2)], 0, socket.MSG_TRUNC)
        rest = req.recvmsg(100)
        # With MSG_TRUNC, TCP discards what it counts: compare lengths, not contents.
        return (len(data), anc, flags, addr, n, anc2, flags2, addr2, rest)

    def client(sock):
        sock.sendall(b"0123456789")

    return in_handler(module, kind_name, paths, probe, client=client)


def test_msg_trunc_flag_like_the_stdlib(mod, unix_path):
    ref, got = differential(mod, truncate_flag_scenario, "tcp", unix_path)
    assert ref[0][0] == 4
    assert got == ref


# -- argument checking -----------------------------------------------------------

BAD_CALLS = [
    ("recvmsg", (-1,)),
    ("recvmsg", (1, -1)),
    ("recvmsg", (1, 2**40)),
    ("recvmsg", ("x",)),
    ("recvmsg", (1.0,)),
    ("recvmsg", (1, 1.0)),
    ("recvmsg", (1, 0, "x")),
    ("recvmsg", (2**70,)),
    ("recvmsg", ()),
    ("recvmsg", (1, 0, 0, 0)),
    ("recvmsg", (-1, -1)),
    ("recvmsg_into", (5,)),
    ("recvmsg_into", (5, -1)),
    ("recvmsg_into", ([bytearray(1)], -1)),
    ("recvmsg_into", ([b"x"],)),
    ("recvmsg_into", ([bytearray(2), 3],)),
    ("recvmsg_into", ("ab",)),
    ("recvmsg_into", ([memoryview(bytearray(4))[::2]],)),
    ("recvmsg_into", ([bytearray(1)], 0, "x")),
    ("recvmsg_into", ([bytearray(1)], 2**40)),
    ("recvfrom_into", (bytearray(2), -1)),
    ("recvfrom_into", (bytearray(2), 3)),
    ("recvfrom_into", (b"xx",)),
    ("recvfrom_into", (None,)),
    ("recvfrom_into", (bytearray(2), 0, "x")),
    ("recvfrom_into", ()),
    ("sendmsg", (b"x",)),
    ("sendmsg", ([1],)),
    ("sendmsg", (5,)),
    ("sendmsg", ("ab",)),
    ("sendmsg", ([b"x"], 5)),
    ("sendmsg", ([b"x"], None)),
    ("sendmsg", ([b"x"], [1])),
    ("sendmsg", ([b"x"], [(1, 2)])),
    ("sendmsg", ([b"x"], [(1, 2, 3)])),
    ("sendmsg", ([b"x"], [("a", 2, b"")])),
    ("sendmsg", ([b"x"], ["abc"])),
    ("sendmsg", ([b"x"], [(2**40, 1, b"")])),
    ("sendmsg", ([b"x"], [], "x")),
    ("sendmsg", ([b"x"], [], 2**40)),
    ("sendmsg", (5, None, "x")),
    ("sendmsg", (5, [], 0, 5)),
    ("sendmsg", ([b"x"], [], 0, None, 1)),
    ("sendmsg", ([memoryview(b"abcd")[::2]],)),
    ("set_inheritable", (1.5,)),
    ("set_inheritable", ("x",)),
    ("set_inheritable", (None,)),
    ("set_inheritable", (2**40,)),
    ("set_inheritable", ()),
    ("get_inheritable", (1,)),
    ("get_inheritable", ()),
    ("sendmsg", ([b"x"],)),
]

#: calls whose exception text the engine copies from the stdlib's
SAME_TEXT = {(name, repr(args)) for name, args in [
    ("recvmsg", (-1,)), ("recvmsg", (1, -1)), ("recvmsg", (1, 2**40)),
    ("recvmsg_into", (5,)), ("recvmsg_into", ([b"x"],)), ("recvmsg_into", ("ab",)),
    ("recvmsg_into", ([bytearray(1)], -1)), ("recvfrom_into", (bytearray(2), -1)),
    ("recvfrom_into", (bytearray(2), 3)), ("recvfrom_into", (b"xx",)),
    ("sendmsg", (5,)), ("sendmsg", ([1],)), ("sendmsg", ([b"x"], 5)),
    ("sendmsg", ([b"x"], None)), ("sendmsg", ([b"x"], [1])),
    ("sendmsg", ([b"x"], [(1, 2)])), ("sendmsg", ([b"x"], [(1, 2, 3)])),
    ("sendmsg", ([b"x"], [], 0, None, 1)),
]}


def bad_arguments_scenario(module, kind_name, paths, close):
    def probe(handler):
        req = handler.request
        # Nothing arrives: a call whose arguments pass fails with EAGAIN at once.
        req.settimeout(0.0)
        if close == "close":
            req.close()
        elif close == "detach":
            os.close(req.detach())
        seen = []
        for name, args in BAD_CALLS:
            seen.append((name, repr(args), detail(getattr(req, name), *args)))
            if (name, repr(args)) in SAME_TEXT:
                seen.append(message(getattr(req, name), *args))
        return seen

    return in_handler(module, kind_name, paths, probe)


@pytest.mark.parametrize("close", ["open", "close", "detach"])
@pytest.mark.parametrize("kind_name", STREAMS)
def test_bad_arguments_raise_as_in_the_stdlib(mod, kind_name, close, unix_path):
    ref, got = differential(mod, bad_arguments_scenario, kind_name, unix_path, close)
    by_call = {(n, a): r for n, a, r in (x for x in ref if x is not None and len(x) == 3)}
    assert by_call[("recvmsg", "(-1,)")] == ("raised", "ValueError", None)
    if close != "open":
        assert by_call[("sendmsg", "([b'x'],)")] == ("raised", "OSError", 9)
    assert got == ref


def closed_scenario(module, kind_name, paths, close):
    def probe(handler):
        req = handler.request
        if close == "close":
            req.close()
        else:
            os.close(req.detach())
        calls = [
            (req.recvmsg, (1,)), (req.recvmsg, (1, 64)), (req.recvmsg_into, ([bytearray(1)],)),
            (req.recvfrom_into, (bytearray(1),)), (req.sendmsg, ([b"x"],)),
            (req.sendmsg, ([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0]))])),
            (req.get_inheritable, ()), (req.set_inheritable, (True,)),
        ]
        return [detail(fn, *args) for fn, args in calls]

    return in_handler(module, kind_name, paths, probe)


@pytest.mark.parametrize("close", ["close", "detach"])
@pytest.mark.parametrize("kind_name", STREAMS)
def test_closed_socket_is_ebadf(mod, kind_name, close, unix_path):
    ref, got = differential(mod, closed_scenario, kind_name, unix_path, close)
    assert ref == [("raised", "OSError", 9)] * 8
    assert got == ref


# -- timeouts ----------------------------------------------------------------------


def timeout_scenario(module, kind_name, paths):
    def probe(handler):
        req = handler.request
        req.settimeout(0.05)
        seen = [
            detail(req.recvmsg, 10),
            detail(req.recvmsg, 10, 64),
            detail(req.recvmsg_into, [bytearray(3)]),
            detail(req.recvfrom_into, bytearray(3)),
        ]
        req.setblocking(False)
        seen += [detail(req.recvmsg, 10), detail(req.recvfrom_into, bytearray(3))]
        # Fill the send buffer (the client does not read): sendmsg times out in the end.
        req.settimeout(0.05)
        chunk = b"x" * 65536
        for _ in range(10000):
            result = detail(req.sendmsg, [chunk, chunk])
            if isinstance(result, tuple):
                seen.append(result)
                break
        return seen

    return in_handler(module, kind_name, paths, probe)


@pytest.mark.parametrize("kind_name", STREAMS)
def test_message_calls_honour_the_timeout(mod, kind_name, unix_path):
    ref, got = differential(mod, timeout_scenario, kind_name, unix_path)
    assert ref[0] == ("raised", "TimeoutError", None)
    assert ref[-1] == ("raised", "TimeoutError", None)
    assert got == ref


# -- descriptors -------------------------------------------------------------------


def fds_in_scenario(module, kind_name, paths):
    """The client passes a pipe's two ends; the handler uses them."""

    def probe(handler):
        msg, fds, flags, addr = socket.recv_fds(handler.request, 16, 4)
        try:
            inheritable = [os.get_inheritable(f) for f in fds]
            r, w = fds
            os.write(w, b"through the pipe")
            got = os.read(r, 100)
        finally:
            for f in fds:
                os.close(f)
        return msg, len(fds), flags, addr, inheritable, got

    def client(sock):
        r, w = os.pipe()
        try:
            return socket.send_fds(sock, [b"two", b" fds"], [r, w])
        finally:
            os.close(r)
            os.close(w)

    return in_handler(module, kind_name, paths, probe, client=client)


def test_recv_fds_on_the_request(mod, unix_path):
    ref, got = differential(mod, fds_in_scenario, "unix_stream", unix_path)
    assert ref == ((b"two fds", 2, 0, None, [True, True], b"through the pipe"), 7)
    assert got == ref


def fds_out_scenario(module, kind_name, paths):
    """The handler passes a pipe's read end to the client."""

    def probe(handler):
        r, w = os.pipe()
        try:
            os.write(w, b"from the handler")
            return socket.send_fds(handler.request, [b"fd"], [r])
        finally:
            os.close(r)
            os.close(w)

    def client(sock):
        msg, fds, flags, addr = socket.recv_fds(sock, 16, 2)
        try:
            return msg, flags, [os.read(f, 100) for f in fds]
        finally:
            for f in fds:
                os.close(f)

    return in_handler(module, kind_name, paths, probe, client=client)


def test_send_fds_on_the_request(mod, unix_path):
    ref, got = differential(mod, fds_out_scenario, "unix_stream", unix_path)
    assert ref == (2, (b"fd", 0, [b"from the handler"]))
    assert got == ref


def ctrunc_scenario(module, kind_name, paths):
    """Ancillary buffers too small for what arrives: MSG_CTRUNC, as many descriptors
    as fit (the kernel closes the rest)."""
    rounds = [0, socket.CMSG_LEN(4), socket.CMSG_LEN(6), 17, socket.CMSG_SPACE(8),
              socket.CMSG_SPACE(8) + 100]
    sent = threading.Semaphore(0)

    def probe(handler):
        req = handler.request
        before = settled(module)
        seen = []
        for anc in rounds:
            assert sent.acquire(timeout=JOIN_TIMEOUT)
            data, ancdata, flags, addr = req.recvmsg(16, anc)
            items = []
            for level, kind, blob in ancdata:
                items.append((level, kind, len(blob)))
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                    fds = array.array("i")
                    fds.frombytes(blob[: len(blob) - len(blob) % fds.itemsize])
                    for f in fds:
                        os.close(f)
            seen.append((anc, data, items, flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC), addr))
        seen.append(("leaked", settled(module) - before))
        return seen

    def client(sock):
        r, w = os.pipe()
        try:
            for _ in rounds:
                socket.send_fds(sock, [b"m"], [r, w])
                sent.release()
        finally:
            os.close(r)
            os.close(w)

    return in_handler(module, kind_name, paths, probe, client=client)


def test_control_truncation_is_reported(mod, unix_path):
    ref, got = differential(mod, ctrunc_scenario, "unix_stream", unix_path)
    seen = ref[0]
    assert seen[0][3] == socket.MSG_CTRUNC
    assert seen[4][3] == 0 and seen[4][2] == [(socket.SOL_SOCKET, socket.SCM_RIGHTS, 8)]
    assert seen[-1] == ("leaked", 0)
    assert got == ref


def recvmsg_into_fds_scenario(module, kind_name, paths):
    def probe(handler):
        bufs = [bytearray(1), bytearray(10)]
        n, ancdata, flags, addr = handler.request.recvmsg_into(bufs, socket.CMSG_SPACE(4))
        fds = array.array("i")
        for level, kind, blob in ancdata:
            fds.frombytes(blob)
        contents = [os.read(f, 10) for f in fds]
        for f in fds:
            os.close(f)
        return n, [bytes(b) for b in bufs], [(lv, k, len(b)) for lv, k, b in ancdata], flags, addr, contents

    def client(sock):
        r, w = os.pipe()
        try:
            os.write(w, b"piped")
            sock.sendmsg([b"scatter"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]))])
        finally:
            os.close(r)
            os.close(w)

    return in_handler(module, kind_name, paths, probe, client=client)


def test_recvmsg_into_with_a_descriptor(mod, unix_path):
    ref, got = differential(mod, recvmsg_into_fds_scenario, "unix_stream", unix_path)
    assert ref[0][0] == 7 and ref[0][-1] == [b"piped"]
    assert got == ref


# -- inheritance -------------------------------------------------------------------


def inheritable_scenario(module, kind_name, paths):
    def probe(handler):
        req = handler.request
        seen = [req.get_inheritable()]
        seen.append(req.set_inheritable(True))
        seen.append(req.get_inheritable())
        seen.append(os.get_inheritable(req.fileno()))
        seen.append(req.set_inheritable(inheritable=0))
        seen.append(req.get_inheritable())
        seen.append(os.get_inheritable(req.fileno()))
        return seen

    return in_handler(module, kind_name, paths, probe)


@pytest.mark.parametrize("kind_name", STREAMS)
def test_inheritable_flag(mod, kind_name, unix_path):
    ref, got = differential(mod, inheritable_scenario, kind_name, unix_path)
    assert ref == [False, None, True, True, None, False, False]
    assert got == ref
