"""Fuzzing the engine's address parsing (``rust/bridge/address.rs``) with hypothesis.

``_core._normalize_address(obj, family)`` parses an address as ``sendto`` does and
converts it back as the kernel reports it. Valid addresses must round-trip to what the
``socket``/``ipaddress`` modules say; anything else must raise an ordinary Python
exception (never crash the process, never accept garbage silently).
"""

from __future__ import annotations

import ipaddress
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastsocketserver import _core

ACCEPTABLE_ERRORS = (TypeError, ValueError, OverflowError, OSError, UnicodeError, IndexError)


@settings(max_examples=300, deadline=None)
@given(ip=st.ip_addresses(v=4), port=st.integers(0, 65535))
def test_ipv4_round_trip(ip, port):
    assert _core._normalize_address((str(ip), port), socket.AF_INET) == (str(ip), port)


@settings(max_examples=300, deadline=None)
@given(
    ip=st.ip_addresses(v=6),
    port=st.integers(0, 65535),
    flowinfo=st.integers(0, 0xFFFFF),
    scope=st.integers(0, 2**32 - 1),
)
def test_ipv6_round_trip(ip, port, flowinfo, scope):
    host, p, f, s = _core._normalize_address((str(ip), port, flowinfo, scope), socket.AF_INET6)
    # The text is inet_ntop's, as the socket module reports it.
    expected = socket.inet_ntop(socket.AF_INET6, ip.packed)
    assert (host, p, f, s) == (expected, port, flowinfo, scope)
    assert ipaddress.IPv6Address(host) == ip


@settings(max_examples=200, deadline=None)
@given(port=st.one_of(st.integers(max_value=-1), st.integers(min_value=65536)))
def test_port_out_of_range_is_overflow_error(port):
    with pytest.raises(OverflowError):
        _core._normalize_address(("127.0.0.1", port), socket.AF_INET)


@settings(max_examples=200, deadline=None)
@given(path=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=100))
def test_unix_path_round_trip(path):
    if len(path.encode()) >= 108:
        with pytest.raises(OSError):
            _core._normalize_address(path, socket.AF_UNIX)
    else:
        assert _core._normalize_address(path, socket.AF_UNIX) == path


def test_unix_path_too_long_is_os_error():
    with pytest.raises(OSError):
        _core._normalize_address("x" * 200, socket.AF_UNIX)


# Host strings stay numeric: a name would go to the resolver (and off loopback).
hosts = st.sampled_from(["", "127.0.0.1", "::1", "0.0.0.0", "::"])
garbage = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | hosts | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=5).map(tuple) | st.lists(children, max_size=5),
    max_leaves=8,
)


@settings(max_examples=500, deadline=None)
@given(obj=garbage, family=st.sampled_from([socket.AF_INET, socket.AF_INET6, socket.AF_UNIX]))
def test_garbage_raises_an_ordinary_exception_or_parses(obj, family):
    try:
        result = _core._normalize_address(obj, family)
    except ACCEPTABLE_ERRORS:
        return
    # Whatever was accepted must be a real address of that family.
    if family == socket.AF_INET:
        assert isinstance(obj, tuple)
        ipaddress.IPv4Address(result[0])
        assert 0 <= result[1] <= 65535
    elif family == socket.AF_INET6:
        assert isinstance(obj, tuple)
        ipaddress.IPv6Address(result[0])
        assert 0 <= result[1] <= 65535
    else:
        assert isinstance(result, (str, bytes))
