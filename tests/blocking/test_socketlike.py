"""``self.request`` behaves as the ``socket.socket`` a stdlib handler gets.

Differential: every scenario runs inside a handler of a stdlib server and of a
fastsocketserver server (``handler_probe.in_handler``) with the same client, and
the recorded results must be equal.

* ``makefile()`` in every mode ``socket.makefile`` accepts: ``'rwb'`` is an
  ``io.BufferedRWPair``, ``buffering=0`` the raw ``socket.SocketIO``, text modes
  an ``io.TextIOWrapper`` with ``encoding``/``errors``/``newline``; the connection
  closes for real only when the last file made from it is closed.
"""

from __future__ import annotations

import io
import socket

import pytest

from conftest import differential, recv_until_eof
from handler_probe import in_handler, outcome

MODES = ["r", "w", "b", "rb", "wb", "rw", "rwb", "br", "wr", "bwr", "", "bb", "rt", "x", "rw+"]
BUFFERINGS = [None, -1, 0, 1, 64, 8192]


def describe(f):
    """What a handler can observe of a file without doing I/O on it."""
    return (
        isinstance(f, io.BufferedRWPair), isinstance(f, io.RawIOBase),
        isinstance(f, io.BufferedIOBase), isinstance(f, io.TextIOBase),
        type(f) is socket.SocketIO, getattr(f, "mode", None), f.readable(),
        f.writable(), f.seekable(), f.closed,
    )


def makefile_shapes_scenario(module, kind_name, paths):
    def probe(handler):
        seen = []
        for mode in MODES:
            for buffering in BUFFERINGS:
                f = outcome(handler.request.makefile, mode, buffering)
                if isinstance(f, tuple):
                    seen.append((mode, buffering, f))
                    continue
                seen.append((mode, buffering, describe(f)))
                f.close()
                seen.append(("closed", describe_closed(f)))
        return seen

    return in_handler(module, kind_name, paths, probe)


def describe_closed(f):
    return f.closed, outcome(f.readable), outcome(f.writable), outcome(f.fileno)


@pytest.mark.parametrize("kind_name", ["tcp", "unix_stream"])
def test_makefile_modes_give_the_stdlib_shapes(mod, kind_name, unix_path):
    ref, got = differential(mod, makefile_shapes_scenario, kind_name, unix_path)
    shapes = {(m, b): r for m, b, r in (x for x in ref if len(x) == 3)}
    assert shapes[("rwb", None)][0] is True  # a BufferedRWPair
    assert shapes[("rb", 0)][4] is True  # a SocketIO
    assert shapes[("r", 0)] == ("raised", "ValueError")
    assert shapes[("x", None)] == ("raised", "ValueError")
    assert got == ref


def rw_exchange_scenario(module, kind_name, paths, mode, buffering, kwargs):
    def probe(handler):
        f = handler.request.makefile(mode, buffering, **kwargs)
        try:
            line = f.readline()
            wrote = outcome(f.write, line.upper() * 2)
            flushed = outcome(f.flush)
            # Read to the end, so that no unread byte makes the close a reset.
            rest = f.read()
            return (line, wrote, flushed, rest, getattr(f, "encoding", None),
                    getattr(f, "newlines", None))
        finally:
            f.close()

    def client(sock):
        sock.sendall("héllo wörld\r\nmore".encode("utf-8"))
        sock.shutdown(socket.SHUT_WR)
        return recv_until_eof(sock)

    return in_handler(module, kind_name, paths, probe, client=client)


RW_CASES = [
    ("rwb", None, {}),
    ("rwb", 16, {}),
    ("rwb", 0, {}),
    ("rw", None, {"encoding": "utf-8"}),
    ("rw", 5, {"encoding": "utf-8", "newline": ""}),
    ("rw", None, {"encoding": "ascii", "errors": "replace"}),
    ("wr", None, {"encoding": "latin-1", "newline": "\n"}),
    ("rb", 0, {}),
]


@pytest.mark.parametrize("mode,buffering,kwargs", RW_CASES, ids=repr)
@pytest.mark.parametrize("kind_name", ["tcp", "unix_stream"])
def test_makefile_read_write_exchange(mod, kind_name, mode, buffering, kwargs, unix_path):
    ref, got = differential(mod, rw_exchange_scenario, kind_name, unix_path, mode, buffering, kwargs)
    assert got == ref


def deferred_close_scenario(module, kind_name, paths, mode, buffering):
    """``close()`` on the connection while a ``makefile`` file is open defers the real
    close until that file is closed, whichever kind of file it is."""

    def probe(handler):
        conn = handler.request
        text = "b" not in mode
        f = conn.makefile(mode, buffering, **({"encoding": "utf-8"} if text else {}))
        conn.close()
        still_open = conn.fileno() >= 0
        if f.writable():
            f.write("late\n" if text else b"late\n")
            f.flush()
        f.close()
        return still_open, conn.fileno()

    return in_handler(module, kind_name, paths, probe, client=recv_until_eof)


@pytest.mark.parametrize("mode,buffering", [
    ("rwb", None), ("rwb", 0), ("wb", 0), ("rb", 0), ("wb", None), ("rb", None),
    ("w", None), ("rw", 3),
], ids=repr)
def test_makefile_file_keeps_the_connection_open(mod, mode, buffering, unix_path):
    ref, got = differential(mod, deferred_close_scenario, "tcp", unix_path, mode, buffering)
    assert ref[0] == (True, -1)
    assert got == ref
