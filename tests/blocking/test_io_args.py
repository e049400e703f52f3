"""``rfile`` and ``self.request`` check their arguments as ``io`` and ``socket`` do.

Differential: the same calls, with odd arguments, inside a handler of a stdlib
server (``rfile`` is an ``io.BufferedReader`` over a ``socket.SocketIO``,
``self.request`` a ``socket.socket``) and of a fastsocketserver server; results
and exception types must be equal. ``read(-5)`` is a ``ValueError``, a float or a
string size a ``TypeError``, ``readinto(bytes)`` (and ``recv_into(bytes)``) a
``TypeError``, never a ``BufferError``.

The client sends its whole payload and half-closes before the handler reads
(the handler waits for it with ``MSG_PEEK | MSG_WAITALL``), so every read is
independent of how the bytes were segmented on the way.
"""

from __future__ import annotations

import array
import socket

import pytest

from conftest import differential
from handler_probe import in_handler, outcome

PAYLOAD = b"".join(b"line %03d of the payload\n" % i for i in range(60))


class Index:
    def __index__(self):
        return 2


class FloatLike:
    def __float__(self):
        return 2.0


# Sizes that consume everything come last, so the ones before see data.
SIZE_ARGS = [
    (0,), (3,), (True,), (Index(),), (-5,), (-2,), (-2**70,), (2**70,), (2.0,),
    ("3",), (b"x",), (FloatLike(),), (None, None), (1, 2), (None,), (-1,), (),
]
METHODS = ["read", "read1", "readline", "readlines", "peek"]


def _whole_payload_arrived(handler):
    sock = handler.request
    got = sock.recv(len(PAYLOAD), socket.MSG_PEEK | socket.MSG_WAITALL)
    assert got == PAYLOAD


def _send_payload(sock):
    sock.sendall(PAYLOAD)
    sock.shutdown(socket.SHUT_WR)
    return None


def size_args_scenario(module, kind_name, paths, method):
    def probe(handler):
        _whole_payload_arrived(handler)
        call = getattr(handler.rfile, method)
        seen = []
        for args in SIZE_ARGS:
            result = outcome(call, *args)
            if method == "peek" and not isinstance(result, tuple):
                result = ("peeked", len(result) > 0)  # its length is the implementation's
            seen.append((repr(args), result))
        return seen

    return in_handler(module, kind_name, paths, probe, client=_send_payload,
                      handler_base="StreamRequestHandler")[0]


@pytest.mark.parametrize("method", METHODS)
def test_rfile_size_arguments(mod, method, unix_path):
    ref, got = differential(mod, size_args_scenario, "tcp", unix_path, method)
    by_args = dict(ref)
    if method == "read":
        assert by_args["(-5,)"] == ("raised", "ValueError")
        assert by_args["(2.0,)"] == ("raised", "TypeError")
    for (args, r), (_, g) in zip(ref, got):
        assert g == r, f"rfile.{method}{args}: {g!r} != stdlib {r!r}"


def _buffers():
    return [
        ("bytearray", bytearray(5)), ("bytes", bytes(5)),
        ("memoryview", memoryview(bytearray(5))),
        ("readonly memoryview", memoryview(b"abcde")),
        ("strided memoryview", memoryview(bytearray(10))[::2]),
        ("array", array.array("i", [0, 0])), ("empty", bytearray()),
        ("str", "abcde"), ("None", None), ("int", 5),
    ]


NOT_BYTES = ["text", None, 5, memoryview(bytearray(10))[::2], [1, 2]]


def _fill_each(call):
    seen = []
    for name, buf in _buffers():
        result = outcome(call, buf)
        content = bytes(buf) if isinstance(buf, (bytearray, array.array)) else None
        seen.append((name, result, content))
    return seen


def readinto_scenario(module, kind_name, paths):
    def probe(handler):
        _whole_payload_arrived(handler)
        return {
            "readinto": _fill_each(handler.rfile.readinto),
            "readinto1": _fill_each(handler.rfile.readinto1),
            "recv_into": _fill_each(handler.request.recv_into),
            "recv_into nbytes": [
                outcome(handler.request.recv_into, bytearray(4), n)
                for n in (5, -1, 2.0, None)
            ],
            "send": [outcome(handler.request.send, b) for b in NOT_BYTES],
            "sendall": [outcome(handler.request.sendall, b) for b in NOT_BYTES],
            "wfile.write": [outcome(handler.wfile.write, b) for b in NOT_BYTES],
        }

    return in_handler(module, kind_name, paths, probe, client=_send_payload,
                      handler_base="StreamRequestHandler")[0]


@pytest.mark.parametrize("kind_name", ["tcp", "unix_stream"])
def test_readinto_and_recv_into_buffers(mod, kind_name, unix_path):
    ref, got = differential(mod, readinto_scenario, kind_name, unix_path)
    assert dict((n, r) for n, r, _ in ref["readinto"])["bytes"] == ("raised", "TypeError")
    assert dict((n, r) for n, r, _ in ref["recv_into"])["bytes"] == ("raised", "TypeError")
    for key in ref:
        assert got[key] == ref[key], key
