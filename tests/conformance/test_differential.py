"""Differential tests: fastsocketserver must behave like the stdlib socketserver.

Every scenario is a function ``scenario(module, ...)`` that runs servers and
clients and returns a plain, comparable value (bytes received, hook call
sequence, attribute records).  ``differential(mod, scenario, ...)`` runs it
against the stdlib (reference) and against ``mod``; the test checks sanity
facts on the reference and that ``mod`` gives the same value.
"""

from __future__ import annotations

import array
import ast
import hashlib
import io
import os
import socket
import threading

import pytest

from conftest import (
    ALL_KINDS, DGRAM_KINDS, JOIN_TIMEOUT, PY312_NAMES, STDLIB, STREAM_KINDS,
    DatagramFileEchoLogic, DatagramUpperLogic, LineEchoLogic, RecordingServerMixin,
    RecvEchoLogic, addr_shape, default_handler, differential, get_kind,
    handler_class, make_server, names, normalize_calls, recv_line, recv_until_eof,
    serving, stream_exchange, wait_for,
)

HAS_FORK = hasattr(os, "fork")


def expected_family(kind):
    return int(kind.family)


def dgram_roundtrip(kind, server_address, paths, payload, expect_reply=True):
    """Send one datagram from a fresh client and return the reply."""
    with kind.client(server_address, paths) as c:
        c.sendto(payload, server_address)
        if not expect_reply:
            return None
        data, _ = c.recvfrom(65536)
        return data


def wait_calls(server, name, count):
    ok = wait_for(lambda: names(server.calls).count(name) >= count)
    assert ok, f"{name} was not called {count} time(s): {server.calls!r}"


# ---------------------------------------------------------------------------
# module surface: names, MRO, class attributes
# ---------------------------------------------------------------------------

def test_all_names(mod):
    ours, theirs = set(mod.__all__), set(STDLIB.__all__)
    assert theirs <= ours, f"missing from __all__: {sorted(theirs - ours)}"
    # the only allowed extras are the names Python 3.12 added
    assert ours - theirs <= PY312_NAMES, f"unexpected names: {sorted(ours - theirs)}"
    for name in ours:
        assert hasattr(mod, name), name
    assert len(mod.__all__) == len(ours), "duplicates in __all__"


def _mro_names(cls):
    return [c.__name__ for c in cls.__mro__]


def test_class_mro_shapes(mod):
    for name in STDLIB.__all__:
        ref = getattr(STDLIB, name)
        got = getattr(mod, name)
        assert isinstance(got, type), name
        assert _mro_names(got) == _mro_names(ref), name
        assert [b.__name__ for b in got.__bases__] == [b.__name__ for b in ref.__bases__], name
    # the combinations are built from the module's own classes
    assert mod.ThreadingTCPServer.__bases__ == (mod.ThreadingMixIn, mod.TCPServer)
    assert mod.ThreadingUDPServer.__bases__ == (mod.ThreadingMixIn, mod.UDPServer)
    assert mod.UnixDatagramServer.__bases__ == (mod.UDPServer,)
    assert mod.UnixStreamServer.__bases__ == (mod.TCPServer,)
    assert mod.UDPServer.__bases__ == (mod.TCPServer,)
    assert mod.TCPServer.__bases__ == (mod.BaseServer,)
    assert mod.StreamRequestHandler.__bases__ == (mod.BaseRequestHandler,)
    assert mod.DatagramRequestHandler.__bases__ == (mod.BaseRequestHandler,)
    if HAS_FORK:
        assert mod.ForkingTCPServer.__bases__ == (mod.ForkingMixIn, mod.TCPServer)
    # 3.12 names, when exported, compose like in 3.12
    if hasattr(mod, "ForkingUnixStreamServer"):
        assert mod.ForkingUnixStreamServer.__bases__ == (mod.ForkingMixIn, mod.UnixStreamServer)
    if hasattr(mod, "ForkingUnixDatagramServer"):
        assert mod.ForkingUnixDatagramServer.__bases__ == (mod.ForkingMixIn, mod.UnixDatagramServer)


def test_user_mixin_combination(mod):
    """Users combine mixins and servers themselves."""
    class MyThreadingUnixStream(mod.ThreadingMixIn, mod.UnixStreamServer):
        pass
    assert _mro_names(MyThreadingUnixStream)[1:] == _mro_names(STDLIB.ThreadingUnixStreamServer)[1:]


SERVER_ATTRS = ["address_family", "socket_type", "request_queue_size",
                "allow_reuse_address", "allow_reuse_port", "max_packet_size",
                "timeout", "daemon_threads", "block_on_close", "max_children",
                "active_children"]
HANDLER_ATTRS = ["rbufsize", "wbufsize", "timeout", "disable_nagle_algorithm"]
_MISSING = "<missing>"


def test_server_class_attributes(mod):
    for name in STDLIB.__all__:
        ref_cls, got_cls = getattr(STDLIB, name), getattr(mod, name)
        for attr in SERVER_ATTRS:
            ref = getattr(ref_cls, attr, _MISSING)
            got = getattr(got_cls, attr, _MISSING)
            assert got == ref, f"{name}.{attr}: {got!r} != {ref!r}"
            if isinstance(ref, bool) or ref is None:
                assert type(got) is type(ref), f"{name}.{attr}: {got!r} is not {type(ref)}"


def test_handler_class_attributes(mod):
    for name in ["BaseRequestHandler", "StreamRequestHandler", "DatagramRequestHandler"]:
        ref_cls, got_cls = getattr(STDLIB, name), getattr(mod, name)
        for attr in HANDLER_ATTRS:
            assert getattr(got_cls, attr, _MISSING) == getattr(ref_cls, attr, _MISSING), (name, attr)
        for meth in ["setup", "handle", "finish"]:
            assert callable(getattr(got_cls, meth)), (name, meth)


def test_server_hooks_are_python_overridable_methods(mod):
    for hook in ["server_bind", "server_activate", "get_request", "verify_request",
                 "process_request", "finish_request", "shutdown_request",
                 "close_request", "handle_error", "handle_timeout",
                 "service_actions", "server_close", "serve_forever", "shutdown",
                 "handle_request", "fileno", "__enter__", "__exit__"]:
        for cls_name in ["TCPServer", "UDPServer", "UnixStreamServer", "UnixDatagramServer"]:
            assert callable(getattr(getattr(mod, cls_name), hook, None)), (cls_name, hook)


# ---------------------------------------------------------------------------
# echo transcripts, stream
# ---------------------------------------------------------------------------

SEGMENTATIONS = {
    "one_send": [b"hello\nworld\n"],
    "bytewise": [bytes([b]) for b in b"ab\ncd\n\nefg\n"],
    "split_lines": [b"first li", b"ne\nsec", b"ond line\nthi", b"rd\n"],
    "partial_tail": [b"complete\n", b"no newline at end"],
    "binary": [bytes(range(256)) * 3, b"\r\n\x00\n"],
    "empty": [],
    "big": [(b"x" * 1000 + b"\n") * 300, b"y" * 100000],
}


def stream_echo_scenario(module, kind_name, handler_kind, chunks, paths):
    kind = get_kind(kind_name)
    if handler_kind == "lines":
        handler = handler_class(module, "StreamRequestHandler", LineEchoLogic)
    else:
        handler = handler_class(module, "BaseRequestHandler", RecvEchoLogic)
    server = make_server(module, kind, handler, paths)
    with serving(server):
        got = []
        for _ in range(2):  # two clients one after another
            c = kind.client(server.server_address, paths)
            got.append(stream_exchange(c, chunks))
    return got


@pytest.mark.parametrize("segmentation", sorted(SEGMENTATIONS))
@pytest.mark.parametrize("kind_name", STREAM_KINDS)
def test_stream_line_echo(mod, kind_name, segmentation, unix_path):
    chunks = SEGMENTATIONS[segmentation]
    ref, got = differential(mod, stream_echo_scenario, kind_name, "lines", chunks, unix_path)
    assert ref == [b"".join(chunks)] * 2
    assert got == ref


@pytest.mark.parametrize("segmentation", ["one_send", "bytewise", "binary", "big", "empty"])
@pytest.mark.parametrize("kind_name", STREAM_KINDS)
def test_stream_recv_sendall_echo(mod, kind_name, segmentation, unix_path):
    chunks = SEGMENTATIONS[segmentation]
    ref, got = differential(mod, stream_echo_scenario, kind_name, "recv", chunks, unix_path)
    assert ref == [b"".join(chunks)] * 2
    assert got == ref


class ReadOpsLogic:
    """Lock-step protocol: each step reads with a different rfile method and
    reports the results as a repr line; the client sends the next piece only
    after the report, so what is buffered is deterministic."""

    def report(self, obj):
        self.wfile.write(repr(obj).encode("ascii") + b"\n")

    def handle(self):
        r = self.rfile
        self.report([r.read(4), r.read1(100), r.read(0)])
        self.report([r.readline(), r.readline(0), r.readline(3), r.readline(),
                     r.read1(2), r.read1(100)])
        big = r.read(20000)
        self.report([len(big), hashlib.sha256(big).hexdigest()])
        buf = bytearray(5)
        n = r.readinto(buf)
        self.report([n, bytes(buf)])
        self.report([r.readline(), r.read(3), r.readline()])
        self.report([r.readlines(), r.read(), r.readline(), r.read1(5), r.read(7)])


BIG_STEP = bytes(range(256)) * 78 + b"\x01" * 32  # 20000 bytes


def read_ops_scenario(module, kind_name, paths, handler_base=None):
    kind = get_kind(kind_name)
    base = (handler_base or module).StreamRequestHandler
    handler = type("ReadOps", (ReadOpsLogic, base), {})
    server = make_server(module, kind, handler, paths)
    reports = []
    with serving(server):
        with kind.client(server.server_address, paths) as c:
            def step(data, shut=False):
                c.sendall(data)
                if shut:
                    c.shutdown(socket.SHUT_WR)
                reports.append(ast.literal_eval(recv_line(c).decode()))
            step(b"abcdefghij")
            step(b"line1\nline2\nrest")
            step(BIG_STEP)
            step(b"12345")
            # readline() must wait across two sends for its newline
            c.sendall(b"partial-")
            step(b"line\nxyz\n")
            step(b"a\nb\nc", shut=True)  # then EOF
            reports.append(recv_until_eof(c))
    return reports


@pytest.mark.parametrize("kind_name", STREAM_KINDS)
def test_stream_read_methods(mod, kind_name, unix_path):
    ref, got = differential(mod, read_ops_scenario, kind_name, unix_path)
    big = BIG_STEP
    assert ref[0] == [b"abcd", b"efghij", b""]
    assert ref[1] == [b"line1\n", b"", b"lin", b"e2\n", b"re", b"st"]
    assert ref[2] == [len(big), hashlib.sha256(big).hexdigest()]
    assert ref[3] == [5, b"12345"]
    assert ref[4] == [b"partial-line\n", b"xyz", b"\n"]
    assert ref[5] == [[b"a\n", b"b\n", b"c"], b"", b"", b"", b""]
    assert ref[6] == b""
    assert got == ref


# ---------------------------------------------------------------------------
# echo transcripts, datagram
# ---------------------------------------------------------------------------

DATAGRAMS = [b"hello", b"two\nlines\n", b"", bytes(range(256)), b"z" * 8000]


def datagram_scenario(module, kind_name, logic, paths):
    kind = get_kind(kind_name)
    if logic == "file":
        handler = handler_class(module, "DatagramRequestHandler", DatagramFileEchoLogic)
    elif logic == "silent":
        handler = handler_class(module, "DatagramRequestHandler")
    else:
        handler = handler_class(module, "BaseRequestHandler", DatagramUpperLogic)
    server = make_server(module, kind, handler, paths)
    replies = []
    with serving(server):
        for payload in DATAGRAMS:
            replies.append(dgram_roundtrip(kind, server.server_address, paths, payload))
    return replies


@pytest.mark.parametrize("logic", ["file", "sendto", "silent"])
@pytest.mark.parametrize("kind_name", DGRAM_KINDS)
def test_datagram_echo(mod, kind_name, logic, unix_path):
    ref, got = differential(mod, datagram_scenario, kind_name, logic, unix_path)
    if logic == "silent":
        # DatagramRequestHandler.finish sends wfile's (empty) value back
        assert ref == [b""] * len(DATAGRAMS)
    else:
        assert ref == [d.upper() for d in DATAGRAMS]
    assert got == ref


def max_packet_scenario(module, kind_name, size, payload_len, paths):
    kind = get_kind(kind_name)
    seen = []

    class H(module.DatagramRequestHandler):
        def handle(self):
            seen.append(len(self.packet))
            self.wfile.write(self.rfile.read())

    attrs = {} if size is None else {"max_packet_size": size}
    server = make_server(module, kind, H, paths, attrs=attrs)
    payload = bytes(i % 251 for i in range(payload_len))
    with serving(server):
        reply = dgram_roundtrip(kind, server.server_address, paths, payload)
        # a following datagram is unaffected by the truncated one
        reply2 = dgram_roundtrip(kind, server.server_address, paths, b"next")
    return seen, reply, reply2


@pytest.mark.parametrize("size,payload_len", [(100, 300), (None, 9000), (None, 8192), (64, 64)])
@pytest.mark.parametrize("kind_name", ["udp", "unix_dgram"])
def test_udp_max_packet_size_truncates(mod, kind_name, size, payload_len, unix_path):
    ref, got = differential(mod, max_packet_scenario, kind_name, size, payload_len, unix_path)
    limit = STDLIB.UDPServer.max_packet_size if size is None else size
    payload = bytes(i % 251 for i in range(payload_len))
    assert ref == ([min(limit, payload_len), 4], payload[:limit], b"next")
    assert got == ref


# ---------------------------------------------------------------------------
# hook call sequences
# ---------------------------------------------------------------------------

def _client_action(kind, server, paths, payload=b"one\ntwo\n", *, silent=False):
    """One request from a new client; returns what the client saw.

    ``silent``: a stream client sends no data, only EOF (for handlers that
    raise before reading: closing a socket with unread data sends a RST, which
    makes the client's view racy)."""
    if kind.stream:
        c = kind.client(server.server_address, paths)
        return stream_exchange(c, [] if silent else [payload])
    return dgram_roundtrip(kind, server.server_address, paths, payload)


def hook_sequence_scenario(module, kind_name, paths, handler_logic=None, requests=2):
    kind = get_kind(kind_name)
    if handler_logic is None:
        handler = default_handler(module, kind, record=True)
    else:
        base = "StreamRequestHandler" if kind.stream else "DatagramRequestHandler"
        handler = handler_class(module, base, handler_logic, record=True)
    server = make_server(module, kind, handler, paths, bases=(RecordingServerMixin,))
    seen = []
    with serving(server):
        for i in range(requests):
            seen.append(_client_action(kind, server, paths,
                                       silent=handler_logic is RaisingLogic))
            wait_calls(server, "close_request", i + 1)
    return normalize_calls(server.calls), seen


@pytest.mark.parametrize("kind_name", ALL_KINDS)
def test_hook_sequence_serve_forever(mod, kind_name, unix_path):
    ref, got = differential(mod, hook_sequence_scenario, kind_name, unix_path)
    calls, seen = ref
    per_request = ["get_request", "verify_request", "process_request", "finish_request",
                   "setup", "handle", "finish", "shutdown_request", "close_request",
                   "service_actions"]
    assert names(calls) == ["server_bind", "server_activate"] + per_request * 2 + ["server_close"]
    # the same request object goes through every hook of one request
    assert {c[1] for c in calls[2:11] if len(c) > 1} == {"req#0"}
    assert {c[1] for c in calls[12:21] if len(c) > 1} == {"req#1"}
    assert names(got[0]) == names(ref[0])
    assert got == ref


class RaisingLogic:
    def handle(self):
        raise ValueError("boom")


@pytest.mark.parametrize("kind_name", ALL_KINDS)
def test_hook_sequence_handler_raises(mod, kind_name, unix_path):
    ref, got = differential(mod, hook_sequence_scenario, kind_name, unix_path,
                            handler_logic=RaisingLogic, requests=1)
    calls, seen = ref
    assert names(calls) == [
        "server_bind", "server_activate", "get_request", "verify_request",
        "process_request", "finish_request", "setup", "handle", "finish",
        "handle_error", "shutdown_request", "close_request", "service_actions",
        "server_close"]
    assert calls[9][3] == "ValueError"
    assert names(got[0]) == names(ref[0])
    assert got == ref


def handle_request_sequence_scenario(module, kind_name, paths):
    kind = get_kind(kind_name)
    handler = default_handler(module, kind, record=True)
    server = make_server(module, kind, handler, paths, bases=(RecordingServerMixin,),
                         attrs={"timeout": JOIN_TIMEOUT})
    box = {}
    try:
        t = threading.Thread(target=lambda: box.setdefault(
            "seen", _client_action(kind, server, paths)), daemon=True)
        t.start()
        result = server.handle_request()
        t.join(JOIN_TIMEOUT)
        assert not t.is_alive()
    finally:
        server.server_close()
    return normalize_calls(server.calls), box.get("seen"), result


@pytest.mark.parametrize("kind_name", ALL_KINDS)
def test_hook_sequence_handle_request(mod, kind_name, unix_path):
    ref, got = differential(mod, handle_request_sequence_scenario, kind_name, unix_path)
    calls, seen, result = ref
    assert names(calls) == ["server_bind", "server_activate", "get_request",
                            "verify_request", "process_request", "finish_request",
                            "setup", "handle", "finish", "shutdown_request",
                            "close_request", "server_close"]
    assert result is None
    assert names(got[0]) == names(ref[0])
    assert got == ref


# ---------------------------------------------------------------------------
# each hook overridden alone
# ---------------------------------------------------------------------------

def verify_false_stream_scenario(module, kind_name, paths):
    kind = get_kind(kind_name)
    handled = []

    class H(module.StreamRequestHandler):
        def handle(self):
            handled.append(True)

    class Refusing:
        def verify_request(self, request, client_address):
            return False

        def shutdown_request(self, request):
            calls.append("shutdown_request")
            super().shutdown_request(request)

    calls = []
    server = make_server(module, kind, H, paths, bases=(Refusing,))
    with serving(server):
        with kind.client(server.server_address, paths) as c:
            data = recv_until_eof(c)
        assert wait_for(lambda: calls)
    return data, handled, calls


@pytest.mark.parametrize("kind_name", STREAM_KINDS)
def test_verify_request_false_stream(mod, kind_name, unix_path):
    ref, got = differential(mod, verify_false_stream_scenario, kind_name, unix_path)
    assert ref == (b"", [], ["shutdown_request"])
    assert got == ref


def verify_false_dgram_scenario(module, kind_name, paths):
    kind = get_kind(kind_name)

    class Selective:
        def verify_request(self, request, client_address):
            return request[0] != b"reject"

    server = make_server(module, kind, default_handler(module, kind, record=True), paths,
                         bases=(RecordingServerMixin, Selective))
    with serving(server):
        with kind.client(server.server_address, paths) as c:
            c.sendto(b"reject", server.server_address)
            c.sendto(b"accept", server.server_address)
            reply, _ = c.recvfrom(65536)
        wait_calls(server, "close_request", 2)
    return reply, normalize_calls(server.calls)


@pytest.mark.parametrize("kind_name", DGRAM_KINDS)
def test_verify_request_false_datagram(mod, kind_name, unix_path):
    ref, got = differential(mod, verify_false_dgram_scenario, kind_name, unix_path)
    reply, calls = ref
    assert reply == b"ACCEPT"
    assert names(calls)[2:6] == ["get_request", "verify_request", "shutdown_request",
                                 "close_request"]
    assert got == ref


def handle_error_args_scenario(module, kind_name, paths):
    kind = get_kind(kind_name)
    events = []

    class Tracking:
        def get_request(self):
            request, addr = super().get_request()
            events.append(("got", request, addr))
            return request, addr

        def handle_error(self, request, client_address):
            exc_type = __import__("sys").exc_info()[0]
            events.append(("error", request, client_address, exc_type))

    base = "StreamRequestHandler" if kind.stream else "DatagramRequestHandler"
    handler = handler_class(module, base, RaisingLogic)
    server = make_server(module, kind, handler, paths, bases=(Tracking,))
    with serving(server):
        seen = _client_action(kind, server, paths, silent=True)
        assert wait_for(lambda: len(events) >= 2)
    got_ev, err_ev = events[0], events[1]
    return {
        "seen": seen,
        "same_request": err_ev[1] is got_ev[1],
        "same_address": err_ev[2] == got_ev[2],
        "address_shape": addr_shape(err_ev[2]),
        "exc_type": err_ev[3].__name__ if err_ev[3] else None,
        "n_events": len(events),
    }


@pytest.mark.parametrize("kind_name", ALL_KINDS)
def test_handle_error_override_receives_request_and_address(mod, kind_name, unix_path):
    ref, got = differential(mod, handle_error_args_scenario, kind_name, unix_path)
    assert ref["same_request"] and ref["same_address"]
    assert ref["exc_type"] == "ValueError"
    assert got == ref


def get_request_override_scenario(module, kind_name, paths):
    kind = get_kind(kind_name)
    seen_addr = []

    class Wrapping:
        def get_request(self):
            request, addr = super().get_request()
            return request, ("wrapped", addr)

    class H(module.BaseRequestHandler):
        def handle(self):
            seen_addr.append(self.client_address)
            if kind.stream:
                self.request.sendall(b"ok\n")
            else:
                data, sock = self.request
                sock.sendto(b"ok", self.client_address[1])

    server = make_server(module, kind, H, paths, bases=(Wrapping,))
    with serving(server):
        seen = _client_action(kind, server, paths, silent=True)
    return seen, [(a[0], addr_shape(a[1])) for a in seen_addr]


@pytest.mark.parametrize("kind_name", ALL_KINDS)
def test_get_request_override_result_is_used(mod, kind_name, unix_path):
    ref, got = differential(mod, get_request_override_scenario, kind_name, unix_path)
    seen, addrs = ref
    assert len(addrs) == 1 and addrs[0][0] == "wrapped"
    assert got == ref


def process_request_override_scenario(module, kind_name, paths):
    kind = get_kind(kind_name)
    handled = []

    class Custom:
        def process_request(self, request, client_address):
            # handle it here, without the handler class
            if kind.stream:
                request.sendall(b"custom\n")
            else:
                data, sock = request
                sock.sendto(b"custom:" + data, client_address)
            self.shutdown_request(request)

    class H(module.BaseRequestHandler):
        def handle(self):
            handled.append(True)

    server = make_server(module, kind, H, paths, bases=(Custom,))
    with serving(server):
        seen = _client_action(kind, server, paths, b"x\n", silent=True)
    return seen, handled


@pytest.mark.parametrize("kind_name", ALL_KINDS)
def test_process_request_override_is_honoured(mod, kind_name, unix_path):
    ref, got = differential(mod, process_request_override_scenario, kind_name, unix_path)
    kind = get_kind(kind_name)
    assert ref == ((b"custom\n" if kind.stream else b"custom:x\n"), [])
    assert got == ref


def finish_request_override_scenario(module, kind_name, paths):
    kind = get_kind(kind_name)

    class Prefixing:
        def finish_request(self, request, client_address):
            if kind.stream:
                request.sendall(b"prefix\n")
            else:
                request[1].sendto(b"prefix", client_address)
            super().finish_request(request, client_address)

    server = make_server(module, kind, default_handler(module, kind), paths,
                         bases=(Prefixing,))
    with serving(server):
        if kind.stream:
            c = kind.client(server.server_address, paths)
            return stream_exchange(c, [b"a\n"])
        with kind.client(server.server_address, paths) as c:
            c.sendto(b"a\n", server.server_address)
            return [c.recvfrom(100)[0], c.recvfrom(100)[0]]


@pytest.mark.parametrize("kind_name", ALL_KINDS)
def test_finish_request_override_is_honoured(mod, kind_name, unix_path):
    ref, got = differential(mod, finish_request_override_scenario, kind_name, unix_path)
    kind = get_kind(kind_name)
    assert ref == (b"prefix\na\n" if kind.stream else [b"prefix", b"A\n"])
    assert got == ref


def close_request_override_scenario(module, kind_name, paths):
    kind = get_kind(kind_name)
    closed = []

    class Tracking:
        def close_request(self, request):
            closed.append("before")
            super().close_request(request)
            if kind.stream:
                closed.append(request.fileno())

    server = make_server(module, kind, default_handler(module, kind), paths,
                         bases=(Tracking,))
    with serving(server):
        seen = _client_action(kind, server, paths)
        assert wait_for(lambda: len(closed) >= (2 if kind.stream else 1))
    return seen, closed


@pytest.mark.parametrize("kind_name", ALL_KINDS)
def test_close_request_override_is_honoured(mod, kind_name, unix_path):
    ref, got = differential(mod, close_request_override_scenario, kind_name, unix_path)
    kind = get_kind(kind_name)
    seen, closed = ref
    assert seen == (b"one\ntwo\n" if kind.stream else b"ONE\nTWO\n")
    assert closed == (["before", -1] if kind.stream else ["before"])
    assert got == ref


def shutdown_request_override_scenario(module, kind_name, paths):
    kind = get_kind(kind_name)
    log = []

    class Tracking:
        def shutdown_request(self, request):
            log.append("shutdown_request")
            super().shutdown_request(request)

        def close_request(self, request):
            log.append("close_request")
            super().close_request(request)

    server = make_server(module, kind, default_handler(module, kind), paths,
                         bases=(Tracking,))
    with serving(server):
        seen = _client_action(kind, server, paths)
        assert wait_for(lambda: len(log) >= 2)
    return seen, log


@pytest.mark.parametrize("kind_name", ALL_KINDS)
def test_shutdown_request_override_is_honoured(mod, kind_name, unix_path):
    ref, got = differential(mod, shutdown_request_override_scenario, kind_name, unix_path)
    assert ref[1] == ["shutdown_request", "close_request"]
    assert got == ref


def bind_activate_override_scenario(module, kind_name, paths):
    kind = get_kind(kind_name)
    log = []

    class Manual:
        def server_bind(self):
            # do it by hand, no super(): the socket must behave as a socket
            if not kind.unix:
                self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                log.append(bool(self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)))
            self.socket.bind(self.server_address)
            self.server_address = self.socket.getsockname()
            log.append(("bound", addr_shape(self.server_address)))

        def server_activate(self):
            if kind.stream:
                self.socket.listen(3)
            log.append("activated")

    server = make_server(module, kind, default_handler(module, kind), paths,
                         bases=(Manual,))
    with serving(server):
        seen = _client_action(kind, server, paths)
    return log, seen


@pytest.mark.parametrize("kind_name", ALL_KINDS)
def test_server_bind_and_activate_overrides(mod, kind_name, unix_path):
    ref, got = differential(mod, bind_activate_override_scenario, kind_name, unix_path)
    log, seen = ref
    assert log[-1] == "activated"
    assert got == ref


def service_actions_scenario(module, paths):
    kind = get_kind("tcp")
    count = [0]
    enough = threading.Event()

    class Counting:
        def service_actions(self):
            count[0] += 1
            if count[0] >= 3:
                enough.set()
            super().service_actions()

    server = make_server(module, kind, default_handler(module, kind), paths,
                         bases=(Counting,))
    with serving(server, poll_interval=0.01):
        fired = enough.wait(JOIN_TIMEOUT)
    return fired


def test_service_actions_called_while_idle(mod, unix_path):
    ref, got = differential(mod, service_actions_scenario, unix_path)
    assert ref is True
    assert got == ref


# ---------------------------------------------------------------------------
# handler attributes
# ---------------------------------------------------------------------------

SOCKET_METHODS = ["recv", "recv_into", "send", "sendall", "makefile", "settimeout",
                  "gettimeout", "setblocking", "setsockopt", "getsockopt",
                  "getpeername", "getsockname", "shutdown", "close", "fileno"]


class StreamAttrLogic:
    def handle(self):
        req = self.request
        rec = {
            "request_is_connection": self.connection is req,
            "server_is_server": self.server is self.server_ref[0],
            "client_address_shape": addr_shape(self.client_address),
            "client_address_is_peer": self.client_address == req.getpeername(),
            "sockname_is_server_address": req.getsockname() == self.server.server_address,
            "family": int(req.family), "type": int(req.type),
            "timeout": req.gettimeout(),
            "methods": [m for m in SOCKET_METHODS if callable(getattr(req, m, None))],
            "rfile_buffered": isinstance(self.rfile, io.BufferedIOBase),
            "wfile_buffered": isinstance(self.wfile, io.BufferedIOBase),
            "rfile_readable": self.rfile.readable(),
            "wfile_writable": self.wfile.writable(),
            "rfile_closed": self.rfile.closed, "wfile_closed": self.wfile.closed,
            "fileno_positive": req.fileno() >= 0,
            "line": self.rfile.readline(),
        }
        self.records.append(rec)
        self.wfile.write(b"done\n")

    def finish(self):
        super().finish()
        self.records.append({"after_finish_closed": (self.rfile.closed, self.wfile.closed)})


def stream_attrs_scenario(module, kind_name, paths):
    kind = get_kind(kind_name)
    records = []
    server_ref = []
    handler = handler_class(module, "StreamRequestHandler", StreamAttrLogic,
                            attrs={"records": records, "server_ref": server_ref})
    server = make_server(module, kind, handler, paths)
    server_ref.append(server)
    with serving(server):
        c = kind.client(server.server_address, paths)
        seen = stream_exchange(c, [b"hi\n"])
        assert wait_for(lambda: len(records) >= 2)
    return seen, records


@pytest.mark.parametrize("kind_name", STREAM_KINDS)
def test_stream_handler_attributes(mod, kind_name, unix_path):
    ref, got = differential(mod, stream_attrs_scenario, kind_name, unix_path)
    kind = get_kind(kind_name)
    seen, (rec, after) = ref
    assert seen == b"done\n"
    assert rec["request_is_connection"] and rec["server_is_server"]
    assert rec["family"] == expected_family(kind) and rec["type"] == socket.SOCK_STREAM
    assert rec["methods"] == SOCKET_METHODS
    assert rec["rfile_buffered"] and rec["wfile_buffered"]
    assert rec["line"] == b"hi\n"
    if kind.family == socket.AF_INET:
        assert rec["client_address_shape"] == ("tuple", 2, ("str", "int"))
    elif kind.family == socket.AF_INET6:
        assert rec["client_address_shape"] == ("tuple", 4, ("str", "int", "int", "int"))
    else:
        assert rec["client_address_shape"][0] == "str"
    assert after == {"after_finish_closed": (True, True)}
    assert got == ref


class DatagramAttrLogic:
    def handle(self):
        sock = self.socket
        self.records.append({
            "request_type": type(self.request).__name__,
            "request_len": len(self.request),
            "packet_is_request0": self.packet is self.request[0],
            "packet": self.packet,
            "socket_is_request1": sock is self.request[1],
            "socket_family": int(sock.family), "socket_type": int(sock.type),
            "socket_sockname_is_server_address": sock.getsockname() == self.server.server_address,
            "has_sendto": callable(getattr(sock, "sendto", None)),
            "client_address_shape": addr_shape(self.client_address),
            "rfile_read": self.rfile.read(),
            "rfile_buffered": isinstance(self.rfile, io.BufferedIOBase),
            "wfile_buffered": isinstance(self.wfile, io.BufferedIOBase),
            "write_count": self.wfile.write(b"reply"),
        })


def dgram_attrs_scenario(module, kind_name, paths):
    kind = get_kind(kind_name)
    records = []
    handler = handler_class(module, "DatagramRequestHandler", DatagramAttrLogic,
                            attrs={"records": records})
    server = make_server(module, kind, handler, paths)
    with serving(server):
        reply = dgram_roundtrip(kind, server.server_address, paths, b"payload")
    return reply, records


@pytest.mark.parametrize("kind_name", DGRAM_KINDS)
def test_datagram_handler_attributes(mod, kind_name, unix_path):
    ref, got = differential(mod, dgram_attrs_scenario, kind_name, unix_path)
    kind = get_kind(kind_name)
    reply, (rec,) = ref
    assert reply == b"reply"
    assert rec["request_type"] == "tuple" and rec["request_len"] == 2
    assert rec["packet"] == b"payload" and rec["rfile_read"] == b"payload"
    assert rec["socket_family"] == expected_family(kind)
    assert rec["socket_type"] == socket.SOCK_DGRAM
    assert rec["write_count"] == 5
    assert got == ref


class WriteCountLogic:
    def handle(self):
        arr = array.array("i", [1, 2, 3])
        counts = [
            self.wfile.write(b"abc"),
            self.wfile.write(bytearray(b"defg")),
            self.wfile.write(memoryview(b"hijkl")),
            self.wfile.write(arr),
            self.wfile.write(b""),
            self.wfile.write(b"m" * 300000),
        ]
        self.wfile.write(b"|" + repr(counts).encode())


def write_count_scenario(module, kind_name, paths):
    kind = get_kind(kind_name)
    handler = handler_class(module, "StreamRequestHandler", WriteCountLogic)
    server = make_server(module, kind, handler, paths)
    with serving(server):
        c = kind.client(server.server_address, paths)
        return stream_exchange(c, [])


@pytest.mark.parametrize("kind_name", STREAM_KINDS)
def test_wfile_write_returns_byte_count(mod, kind_name, unix_path):
    ref, got = differential(mod, write_count_scenario, kind_name, unix_path)
    arr = array.array("i", [1, 2, 3])
    body = b"abcdefghijkl" + arr.tobytes() + b"m" * 300000
    counts = [3, 4, 5, arr.itemsize * 3, 0, 300000]
    assert ref == body + b"|" + repr(counts).encode()
    assert got == ref


def handler_options_scenario(module, kind_name, attrs, paths):
    kind = get_kind(kind_name)
    records = []

    class Opts(module.StreamRequestHandler):
        def handle(self):
            rec = {"timeout": self.request.gettimeout()}
            if not kind.unix:
                rec["nodelay"] = bool(self.request.getsockopt(socket.IPPROTO_TCP,
                                                              socket.TCP_NODELAY))
            records.append(rec)
            for line in self.rfile:
                self.wfile.write(line)
                self.wfile.write(b"+")

    handler = type("OptsH", (Opts,), dict(attrs))
    server = make_server(module, kind, handler, paths)
    with serving(server):
        c = kind.client(server.server_address, paths)
        seen = stream_exchange(c, [b"a\nb\n", b"c"])
    return seen, records


@pytest.mark.parametrize("attrs", [
    {"timeout": 2.5},
    {"disable_nagle_algorithm": True},
    {"wbufsize": -1},
    {"wbufsize": 4},
    {"rbufsize": 0},
    {"rbufsize": 1},
], ids=lambda a: ",".join(f"{k}={v}" for k, v in a.items()))
@pytest.mark.parametrize("kind_name", ["tcp", "unix_stream"])
def test_handler_option_attributes(mod, kind_name, attrs, unix_path):
    if kind_name == "unix_stream" and "disable_nagle_algorithm" in attrs:
        pytest.skip("TCP_NODELAY is TCP only")
    ref, got = differential(mod, handler_options_scenario, kind_name, attrs, unix_path)
    seen, (rec,) = ref
    assert seen == b"a\n+b\n+c+"
    assert rec["timeout"] == attrs.get("timeout")
    if "nodelay" in rec:
        assert rec["nodelay"] == bool(attrs.get("disable_nagle_algorithm"))
    assert got == ref


# ---------------------------------------------------------------------------
# mixing handler classes across modules
# ---------------------------------------------------------------------------

def cross_handler_scenario(server_module, handler_module, kind_name, paths):
    kind = get_kind(kind_name)

    class Echo(handler_module.StreamRequestHandler):
        def handle(self):
            for line in self.rfile:
                self.wfile.write(line.upper())

    server = make_server(server_module, kind, Echo, paths)
    with serving(server):
        c = kind.client(server.server_address, paths)
        return stream_exchange(c, [b"mixed\nmodules\n", b"tail"])


@pytest.mark.parametrize("kind_name", ["tcp", "unix_stream"])
def test_stdlib_handler_on_module_server(mod, kind_name, unix_path):
    ref = cross_handler_scenario(STDLIB, STDLIB, kind_name, unix_path)
    got = cross_handler_scenario(mod, STDLIB, kind_name, unix_path)
    assert ref == b"MIXED\nMODULES\nTAIL"
    assert got == ref


@pytest.mark.parametrize("kind_name", ["tcp", "unix_stream"])
def test_module_handler_on_stdlib_server(mod, kind_name, unix_path):
    """e.g. a handler written against fastsocketserver served by http.server's
    (stdlib) TCPServer."""
    ref = cross_handler_scenario(STDLIB, STDLIB, kind_name, unix_path)
    got = cross_handler_scenario(STDLIB, mod, kind_name, unix_path)
    assert got == ref


def stdlib_read_ops_on_module(module, kind_name, paths):
    return read_ops_scenario(module, kind_name, paths, handler_base=STDLIB)


def test_stdlib_read_handler_on_module_server(mod, unix_path):
    ref = read_ops_scenario(STDLIB, "tcp", unix_path)
    got = stdlib_read_ops_on_module(mod, "tcp", unix_path)
    assert got == ref


# ---------------------------------------------------------------------------
# construction, binding, context manager, fileno
# ---------------------------------------------------------------------------

def manual_bind_scenario(module, kind_name, paths):
    kind = get_kind(kind_name)
    server = make_server(module, kind, default_handler(module, kind), paths,
                         bind_and_activate=False)
    try:
        before = server.socket.getsockname()
        requested = server.server_address
        if not kind.unix:
            server.allow_reuse_address = True  # instance attribute, honoured by server_bind
        server.server_bind()
        server.server_activate()
        rec = {
            "before_shape": addr_shape(before),
            "before_port0": (before[1] == 0) if isinstance(before, tuple) else before,
            "after_shape": addr_shape(server.server_address),
            "addr_is_sockname": server.server_address == server.socket.getsockname(),
            "fileno": server.fileno() == server.socket.fileno() >= 0,
        }
        if not kind.unix:
            rec["reuse"] = bool(server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR))
            rec["port_nonzero"] = server.server_address[1] != 0
        else:
            rec["path_is_requested"] = server.server_address == requested
    except BaseException:
        server.server_close()
        raise
    with serving(server):
        rec["seen"] = _client_action(kind, server, paths)
    return rec


@pytest.mark.parametrize("kind_name", ALL_KINDS)
def test_bind_and_activate_false_then_manual(mod, kind_name, unix_path):
    ref, got = differential(mod, manual_bind_scenario, kind_name, unix_path)
    kind = get_kind(kind_name)
    assert ref["addr_is_sockname"] and ref["fileno"]
    if not kind.unix:
        assert ref["reuse"] and ref["port_nonzero"] and ref["before_port0"]
    else:
        assert ref["path_is_requested"]
    assert got == ref


def context_manager_scenario(module, kind_name, paths):
    kind = get_kind(kind_name)
    closes = []

    class Tracking:
        def server_close(self):
            closes.append(True)
            super().server_close()

    server = make_server(module, kind, default_handler(module, kind), paths,
                         bases=(Tracking,))
    with server as entered:
        same = entered is server
        fd_ok = server.fileno() == server.socket.fileno() >= 0
        address = server.server_address
        if not kind.unix:
            real = address[1] != 0 and address[0] == kind.host
        else:
            real = os.path.exists(address)
    return {"same": same, "fd_ok": fd_ok, "real": real, "closes": closes,
            "socket_fileno_after": server.socket.fileno(),
            "fileno_after": server.fileno(),
            "shape": addr_shape(address)}


@pytest.mark.parametrize("kind_name", ALL_KINDS)
def test_context_manager_closes_and_fileno(mod, kind_name, unix_path):
    ref, got = differential(mod, context_manager_scenario, kind_name, unix_path)
    assert ref["same"] and ref["fd_ok"] and ref["real"]
    assert ref["closes"] == [True]
    assert ref["socket_fileno_after"] == -1
    assert got == ref


def test_server_close_closes_descriptor(mod, unix_path):
    kind = get_kind("tcp")
    server = make_server(mod, kind, default_handler(mod, kind), unix_path)
    address = server.server_address
    server.server_close()
    assert server.socket.fileno() == -1
    with socket.socket() as c:
        c.settimeout(JOIN_TIMEOUT)
        with pytest.raises(ConnectionRefusedError):
            c.connect(address)


# ---------------------------------------------------------------------------
# threading and forking servers
# ---------------------------------------------------------------------------

THREADING_KINDS = {"tcp": "ThreadingTCPServer", "udp": "ThreadingUDPServer",
                   "unix_stream": "ThreadingUnixStreamServer",
                   "unix_dgram": "ThreadingUnixDatagramServer"}


def threading_concurrency_scenario(module, kind_name, paths, n=4):
    kind = get_kind(kind_name)
    barrier = threading.Barrier(n, timeout=JOIN_TIMEOUT)

    class H(module.BaseRequestHandler):
        def handle(self):
            barrier.wait()  # only passes when n handlers run at once
            if kind.stream:
                data = recv_line(self.request)
                self.request.sendall(data.upper())
            else:
                data, sock = self.request
                sock.sendto(data.upper(), self.client_address)

    server = make_server(module, kind, H, paths,
                         server_cls=getattr(module, THREADING_KINDS[kind_name]))
    results = [None] * n
    with serving(server):
        def client(i):
            if kind.stream:
                c = kind.client(server.server_address, paths)
                results[i] = stream_exchange(c, [b"client%d\n" % i])
            else:
                results[i] = dgram_roundtrip(kind, server.server_address, paths,
                                             b"client%d\n" % i)
        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(JOIN_TIMEOUT)
        assert not any(t.is_alive() for t in threads)
    return results


@pytest.mark.parametrize("kind_name", sorted(THREADING_KINDS))
def test_threading_server_runs_handlers_concurrently(mod, kind_name, unix_path):
    ref, got = differential(mod, threading_concurrency_scenario, kind_name, unix_path)
    assert ref == [b"CLIENT%d\n" % i for i in range(4)]
    assert got == ref


def threading_sequence_scenario(module, kind_name, paths, raising):
    kind = get_kind(kind_name)
    base = "StreamRequestHandler" if kind.stream else "DatagramRequestHandler"
    logic = RaisingLogic if raising else (LineEchoLogic if kind.stream else DatagramFileEchoLogic)
    handler = handler_class(module, base, logic, record=True)
    server = make_server(module, kind, handler, paths, bases=(RecordingServerMixin,),
                         server_cls=getattr(module, THREADING_KINDS[kind_name]))
    with serving(server):
        seen = _client_action(kind, server, paths, silent=raising)
        wait_calls(server, "close_request", 1)
    calls = [c for c in server.calls if c[0] != "service_actions"]
    return calls, seen


@pytest.mark.parametrize("raising", [False, True], ids=["ok", "raising"])
@pytest.mark.parametrize("kind_name", sorted(THREADING_KINDS))
def test_threading_server_hook_sequence(mod, kind_name, raising, unix_path):
    ref, got = differential(mod, threading_sequence_scenario, kind_name, unix_path, raising)
    calls, seen = ref
    middle = ["handle_error"] if raising else []
    assert names(calls) == ["server_bind", "server_activate", "get_request",
                            "verify_request", "process_request", "finish_request",
                            "setup", "handle", "finish"] + middle + [
                            "shutdown_request", "close_request", "server_close"]
    assert got == ref


def block_on_close_scenario(module, daemon, paths):
    kind = get_kind("tcp")
    entered = threading.Event()
    release = threading.Event()
    finished = threading.Event()

    class H(module.StreamRequestHandler):
        def handle(self):
            entered.set()
            release.wait(JOIN_TIMEOUT)
            self.wfile.write(b"late\n")
            finished.set()

    server = make_server(module, kind, H, paths, server_cls=module.ThreadingTCPServer,
                         attrs={"daemon_threads": daemon})
    c = kind.client(server.server_address, paths)
    try:
        with serving(server, close=False):
            c.sendall(b"go\n")
            assert entered.wait(JOIN_TIMEOUT)
        # serve_forever has stopped; the handler is still blocked
        done = threading.Event()
        closer = threading.Thread(target=lambda: (server.server_close(), done.set()),
                                  daemon=True)
        closer.start()
        if daemon:
            returned_while_blocked = done.wait(JOIN_TIMEOUT) and not finished.is_set()
        else:
            returned_while_blocked = done.wait(0.3)
        release.set()
        closer.join(JOIN_TIMEOUT)
        assert not closer.is_alive()
        assert finished.wait(JOIN_TIMEOUT)
        reply = recv_until_eof(c)
    finally:
        release.set()
        c.close()
        server.server_close()
    return returned_while_blocked, reply


@pytest.mark.parametrize("daemon", [False, True], ids=["block_on_close", "daemon_threads"])
def test_threading_server_close_waits_for_handlers(mod, daemon, unix_path):
    ref, got = differential(mod, block_on_close_scenario, daemon, unix_path)
    assert ref == (daemon, b"late\n")
    assert got == ref


FORKING_KINDS = {"tcp": "ForkingTCPServer", "udp": "ForkingUDPServer"}


def forking_scenario(module, kind_name, paths):
    kind = get_kind(kind_name)
    handler = default_handler(module, kind)
    server = make_server(module, kind, handler, paths, bases=(RecordingServerMixin,),
                         server_cls=getattr(module, FORKING_KINDS[kind_name]))
    seen = []
    with serving(server):
        for i in range(2):
            seen.append(_client_action(kind, server, paths, b"fork%d\n" % i))
            wait_calls(server, "close_request", i + 1)
    calls = normalize_calls(server.calls)
    return seen, calls, type(server.active_children).__name__, len(server.active_children or ())


@pytest.mark.skipif(not HAS_FORK, reason="needs os.fork")
@pytest.mark.parametrize("kind_name", sorted(FORKING_KINDS))
def test_forking_server(mod, kind_name, unix_path):
    ref, got = differential(mod, forking_scenario, kind_name, unix_path)
    kind = get_kind(kind_name)
    seen, calls, children_type, n_children = ref
    expected = [b"fork%d\n" % i for i in range(2)]
    assert seen == (expected if kind.stream else [e.upper() for e in expected])
    # in the parent: the child handles the request, the parent closes its copy
    assert names(calls) == ["server_bind", "server_activate"] + [
        "get_request", "verify_request", "process_request", "close_request",
        "service_actions"] * 2 + ["server_close"]
    assert (children_type, n_children) == ("set", 0)
    assert got == ref
