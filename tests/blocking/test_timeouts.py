"""Timeouts as the stdlib has them, to the nanosecond, with the stdlib's exceptions.

Differential: every scenario runs on the stdlib (``socketserver`` over
``socket.socket``) and on fastsocketserver, and the results must be equal.

* ``self.request.settimeout(v)`` for odd values: CPython rounds a timeout up to
  whole nanoseconds (so ``1e-10`` reads back as ``1e-09`` and still times out),
  refuses NaN and negative values (``ValueError``), values past its 64-bit
  nanosecond clock (``OverflowError``) and non-numbers (``TypeError``).
* a server's ``timeout`` (and ``serve_forever``'s ``poll_interval``) that is NaN
  or too large raises from ``handle_request()`` (``serve_forever()``) instead of
  spinning or waiting forever.
"""

from __future__ import annotations

import decimal
import fractions
import random

import pytest

from conftest import (
    ALL_KINDS, JOIN_TIMEOUT, STDLIB, STREAM_KINDS, call_with_timeout, differential,
    get_kind, make_server,
)
from handler_probe import in_handler, outcome


class FloatSub(float):
    pass


class IntSub(int):
    pass


class Index:
    def __index__(self):
        return 3


class OnlyFloat:
    """Has ``__float__`` but no ``__index__``: not a timeout for CPython."""

    def __float__(self):
        return 1.0


def _odd_values():
    values = [
        None, 1e-10, 5e-324, 1e-300, 1.5e-9, 1e-9, 1.0000000001e-9, 0.1, 0.3, 2.5,
        1, 0, True, False, -0.0, 0.0, 9.2e9, 9223372036, 9223372036.854774,
        9223372037, 2**63, 2**70, -2**70, float("nan"), -float("nan"), -1, -1e-10,
        -5e-324, -0.5, 1e10, 1e300, float("inf"), float("-inf"), FloatSub(1e-10),
        IntSub(4), Index(), OnlyFloat(), "1", b"1", decimal.Decimal(1),
        fractions.Fraction(1, 2), 1j, [], object(),
    ]
    rng = random.Random(20261201)
    for _ in range(300):
        values.append(rng.random() * 10.0 ** rng.randint(-12, 10))
    return values


ODD_VALUES = _odd_values()


def settimeout_scenario(module, kind_name, paths):
    def probe(handler):
        sock = handler.request
        seen = []
        for value in ODD_VALUES:
            result = outcome(sock.settimeout, value)
            seen.append((result, sock.gettimeout(), sock.getblocking(), sock.timeout))
        return seen

    return in_handler(module, kind_name, paths, probe)


@pytest.mark.parametrize("kind_name", ["tcp", "unix_stream"])
def test_settimeout_reads_back_as_socket_does(mod, kind_name, unix_path):
    ref, got = differential(mod, settimeout_scenario, kind_name, unix_path)
    by_value = dict(zip(map(repr, ODD_VALUES), ref))
    assert by_value["1e-10"][1] == 1e-09
    assert by_value["nan"][0] == ("raised", "ValueError")
    assert by_value["1e+300"][0] == ("raised", "OverflowError")
    assert by_value["'1'"][0] == ("raised", "TypeError")
    for value, r, g in zip(ODD_VALUES, ref, got):
        assert g == r, f"settimeout({value!r}): {g!r} != stdlib {r!r}"


def tiny_timeout_scenario(module, kind_name, paths):
    def probe(handler):
        sock = handler.request
        sock.settimeout(1e-10)
        first = outcome(sock.recv, 16)
        buf = bytearray(4)
        second = outcome(sock.recv_into, buf)
        return sock.gettimeout(), first, second

    return in_handler(module, kind_name, paths, probe)


@pytest.mark.parametrize("kind_name", STREAM_KINDS)
def test_tiny_timeout_times_out(mod, kind_name, unix_path):
    ref, got = differential(mod, tiny_timeout_scenario, kind_name, unix_path)
    assert ref == (1e-09, ("raised", "TimeoutError"), ("raised", "TimeoutError"))
    assert got == ref


def rfile_tiny_timeout_scenario(module, kind_name, paths):
    def probe(handler):
        first = outcome(handler.rfile.readline)
        again = outcome(handler.rfile.read, 1)
        return handler.connection.gettimeout(), first, again

    return in_handler(module, kind_name, paths, probe,
                      handler_base="StreamRequestHandler",
                      handler_attrs={"timeout": 1e-10})


@pytest.mark.parametrize("kind_name", ["tcp", "unix_stream"])
def test_handler_tiny_timeout_applies_to_rfile(mod, kind_name, unix_path):
    ref, got = differential(mod, rfile_tiny_timeout_scenario, kind_name, unix_path)
    assert ref[:2] == (1e-09, ("raised", "TimeoutError"))
    assert got == ref


BAD_SERVER_TIMEOUTS = [float("nan"), 1e10, 1e300, float("inf")]


def server_timeout_scenario(module, kind_name, paths, value):
    """``handle_request()`` with ``server.timeout = value``, bounded by a thread join:
    a spinning or never-ending wait shows as "hung"."""
    kind = get_kind(kind_name)
    server = make_server(module, kind, module.BaseRequestHandler, paths)
    return _handle_request_outcome(server, value)


def _handle_request_outcome(server, value):
    server.timeout = value
    finished, _, exc = call_with_timeout(server.handle_request, JOIN_TIMEOUT)
    if not finished:
        # The wait never ends (it spins, or waits for ever): closing the server under
        # it could block this test too, so the server is left to its daemon thread.
        return "hung"
    server.server_close()
    return type(exc).__name__ if exc is not None else "returned"


@pytest.mark.parametrize("value", BAD_SERVER_TIMEOUTS, ids=repr)
@pytest.mark.parametrize("kind_name", ALL_KINDS)
def test_server_timeout_bad_values_raise(mod, kind_name, value, unix_path):
    ref, got = differential(mod, server_timeout_scenario, kind_name, unix_path, value)
    assert ref == ("ValueError" if value != value else "OverflowError")
    assert got == ref


@pytest.mark.parametrize("value", [float("-inf"), -1.0, 0.0, 1e-10], ids=repr)
@pytest.mark.parametrize("kind_name", ["tcp", "udp"])
def test_server_timeout_not_positive_times_out_at_once(mod, kind_name, value, unix_path):
    ref, got = differential(mod, server_timeout_scenario, kind_name, unix_path, value)
    assert ref == "returned"
    assert got == ref


def poll_interval_scenario(module, kind_name, paths, value):
    """``serve_forever(value)``: raises at once; ``shutdown()`` afterwards returns."""
    kind = get_kind(kind_name)
    server = make_server(module, kind, module.BaseRequestHandler, paths)
    finished, _, exc = call_with_timeout(lambda: server.serve_forever(value))
    if not finished:
        call_with_timeout(server.shutdown)
        return "hung"
    server.server_close()
    return type(exc).__name__ if exc is not None else "returned"


@pytest.mark.parametrize("value", BAD_SERVER_TIMEOUTS, ids=repr)
@pytest.mark.parametrize("kind_name", ["tcp", "udp", "unix_stream"])
def test_poll_interval_bad_values_raise(mod, kind_name, value, unix_path):
    ref, got = differential(mod, poll_interval_scenario, kind_name, unix_path, value)
    assert ref == ("ValueError" if value != value else "OverflowError")
    assert got == ref


class _Echo:
    """A minimal ``asyncio.Protocol``-shaped handler for the event-driven path."""

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)

    def connection_lost(self, exc):
        pass


@pytest.mark.parametrize("value", BAD_SERVER_TIMEOUTS, ids=repr)
def test_protocol_server_timeout_bad_values_raise(fast_mod, value, unix_path):
    """The event-driven path raises what the stdlib's blocking server raises."""
    ref = server_timeout_scenario(STDLIB, "tcp", unix_path, value)
    server = fast_mod.TCPServer(("127.0.0.1", 0), _Echo)
    assert _handle_request_outcome(server, value) == ref
