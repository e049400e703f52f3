"""Bad arguments, OS failures and bad clients: the same exceptions (type and
errno) as the stdlib, no descriptor leaks, and a bad client only affects its
own request."""

from __future__ import annotations

import errno
import os
import socket
import struct

import pytest

from conftest import (
    STDLIB, RecordingServerMixin, default_handler, differential,
    get_kind, make_server, names, recv_line, serving,
    settled_fd_count, stream_exchange, wait_for,
)


def _outcome(fn):
    """What constructing raised: (type name, errno) or "ok"."""
    try:
        server = fn()
    except OSError as exc:
        # type(exc) may be an OSError subclass chosen from errno; compare both
        return (type(exc).__name__, exc.errno)
    except Exception as exc:
        return (type(exc).__name__,)
    server.server_close()
    return "ok"


def _used_tcp_port():
    """A listening socket on an ephemeral port (caller closes it)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def _used_udp_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    return s


def construct_cases(module, paths):
    """name -> zero-argument callable constructing a server (that may fail)."""
    H = module.BaseRequestHandler

    def used_tcp():
        with _used_tcp_port() as s:
            return _outcome(lambda: module.TCPServer(s.getsockname(), H))

    def used_udp():
        with _used_udp_port() as s:
            return _outcome(lambda: module.UDPServer(s.getsockname(), H))

    def existing_unix(cls_name, socktype):
        def run():
            path = paths("used")
            with socket.socket(socket.AF_UNIX, socktype) as s:
                s.bind(path)
                return _outcome(lambda: getattr(module, cls_name)(path, H))
        return run

    def existing_file():
        path = paths("file")
        with open(path, "w"):
            pass
        return _outcome(lambda: module.UnixStreamServer(path, H))

    too_long = "/tmp/" + "x" * 200
    cases = {
        "port_str": lambda: _outcome(lambda: module.TCPServer(("127.0.0.1", "x"), H)),
        "address_int": lambda: _outcome(lambda: module.TCPServer(123, H)),
        "address_str_for_inet": lambda: _outcome(lambda: module.TCPServer("127.0.0.1", H)),
        "tuple_too_short": lambda: _outcome(lambda: module.TCPServer(("127.0.0.1",), H)),
        "tuple_too_long": lambda: _outcome(lambda: module.TCPServer(("127.0.0.1", 0, 0), H)),
        "port_70000": lambda: _outcome(lambda: module.TCPServer(("127.0.0.1", 70000), H)),
        "port_negative": lambda: _outcome(lambda: module.TCPServer(("127.0.0.1", -1), H)),
        "udp_port_70000": lambda: _outcome(lambda: module.UDPServer(("127.0.0.1", 70000), H)),
        "host_int": lambda: _outcome(lambda: module.TCPServer((1234, 0), H)),
        "host_none_port": lambda: _outcome(lambda: module.TCPServer(("127.0.0.1", None), H)),
        "nonlocal_address": lambda: _outcome(lambda: module.TCPServer(("192.0.2.1", 0), H)),
        "used_tcp": used_tcp,
        "used_udp": used_udp,
        "unix_existing_stream": existing_unix("UnixStreamServer", socket.SOCK_STREAM),
        "unix_existing_dgram": existing_unix("UnixDatagramServer", socket.SOCK_DGRAM),
        "unix_existing_regular_file": existing_file,
        "unix_too_long": lambda: _outcome(lambda: module.UnixStreamServer(too_long, H)),
        "unix_no_such_dir": lambda: _outcome(
            lambda: module.UnixStreamServer(paths("nodir") + "/sub/sock", H)),
        "unix_address_int": lambda: _outcome(lambda: module.UnixStreamServer(123, H)),
        "unix_address_tuple": lambda: _outcome(
            lambda: module.UnixStreamServer(("127.0.0.1", 0), H)),
    }
    return cases


CASES = ["port_str", "address_int", "address_str_for_inet", "tuple_too_short",
         "tuple_too_long", "port_70000", "port_negative", "udp_port_70000",
         "host_int", "host_none_port", "nonlocal_address", "used_tcp", "used_udp",
         "unix_existing_stream", "unix_existing_dgram", "unix_existing_regular_file",
         "unix_too_long", "unix_no_such_dir", "unix_address_int", "unix_address_tuple"]


def construct_scenario(module, case, paths):
    return construct_cases(module, paths)[case]()


@pytest.mark.parametrize("case", CASES)
def test_bad_constructor_arguments(mod, case, unix_path):
    ref, got = differential(mod, construct_scenario, case, unix_path)
    assert ref != "ok"
    assert got == ref


def test_known_exception_types(unix_path):
    """Pin the stdlib facts the brief names (so the differential cases above
    compare against the right thing)."""
    cases = construct_cases(STDLIB, unix_path)
    assert cases["port_70000"]() == ("OverflowError",)
    assert cases["port_str"]()[0] == "TypeError"
    assert cases["address_int"]()[0] == "TypeError"
    assert cases["used_tcp"]() == ("OSError", errno.EADDRINUSE)
    assert cases["unix_existing_stream"]() == ("OSError", errno.EADDRINUSE)
    assert cases["unix_too_long"]()[0] == "OSError"
    assert cases["unix_no_such_dir"]() == ("FileNotFoundError", errno.ENOENT)


def test_oserror_has_errno_and_strerror(mod):
    with _used_tcp_port() as s:
        with pytest.raises(OSError) as info:
            mod.TCPServer(s.getsockname(), mod.BaseRequestHandler)
    assert info.value.errno == errno.EADDRINUSE
    assert info.value.strerror == os.strerror(errno.EADDRINUSE)
    assert info.type is OSError


def test_reuse_address_allows_rebinding_time_wait_port(mod):
    """allow_reuse_address=True sets SO_REUSEADDR; False does not."""
    class Reuse(mod.TCPServer):
        allow_reuse_address = True

    for cls, expected in ((mod.TCPServer, False), (Reuse, True)):
        server = cls(("127.0.0.1", 0), mod.BaseRequestHandler)
        try:
            flag = server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
            assert bool(flag) is expected
        finally:
            server.server_close()


def test_failed_constructions_leak_no_descriptors(mod, unix_path):
    """1000 failed constructions leave the fd count unchanged."""
    cases = construct_cases(mod, unix_path)
    cycle = ["port_str", "port_70000", "used_tcp", "unix_existing_stream",
             "unix_too_long", "address_int", "unix_no_such_dir", "used_udp"]
    for name in cycle:  # warm-up: imports, lazily created objects
        assert cases[name]() != "ok"
    before = settled_fd_count()
    for i in range(1000):
        assert cases[cycle[i % len(cycle)]]() != "ok"
    after = settled_fd_count()
    assert after <= before, f"{after - before} descriptors leaked by failed constructions"


def test_bind_and_activate_false_then_failed_bind_leaks_nothing(mod):
    before = settled_fd_count()
    with _used_tcp_port() as s:
        used = s.getsockname()
        for _ in range(200):
            server = mod.TCPServer(used, mod.BaseRequestHandler, bind_and_activate=False)
            with pytest.raises(OSError):
                server.server_bind()
            server.server_close()
    assert settled_fd_count() <= before


# ---------------------------------------------------------------------------
# bad handler classes
# ---------------------------------------------------------------------------

def bad_handler_scenario(module, which, paths):
    kind = get_kind("tcp")
    handler = {"none": None, "not_callable": 42,
               "wrong_signature": lambda request: None}[which]
    server = make_server(module, kind, handler, paths, bases=(RecordingServerMixin,))
    with serving(server):
        c = kind.client(server.server_address, paths)
        first = stream_exchange(c, [])
        assert wait_for(lambda: "close_request" in names(server.calls))
        # the server is still alive and answers the next client the same way
        c = kind.client(server.server_address, paths)
        second = stream_exchange(c, [])
        assert wait_for(lambda: names(server.calls).count("close_request") >= 2)
    errors = [e[3] for e in server.calls if e[0] == "handle_error"]
    return first, second, errors


@pytest.mark.parametrize("which", ["none", "not_callable", "wrong_signature"])
def test_bad_handler_class_goes_to_handle_error(mod, which, unix_path):
    ref, got = differential(mod, bad_handler_scenario, which, unix_path)
    assert ref == (b"", b"", ["TypeError", "TypeError"])
    assert got == ref


# ---------------------------------------------------------------------------
# bad clients
# ---------------------------------------------------------------------------

class GreetThenEcho:
    def handle(self):
        self.wfile.write(b"hello\n")
        for line in self.rfile:
            self.wfile.write(line)


def reset_client_scenario(module, kind_name, paths):
    """A client that resets its connection while the handler waits in
    readline; the handler's exception goes to handle_error and the next client
    is served."""
    kind = get_kind(kind_name)
    handler = type("Greeter", (GreetThenEcho, module.StreamRequestHandler), {})
    server = make_server(module, kind, handler, paths, bases=(RecordingServerMixin,))
    with serving(server):
        c = kind.client(server.server_address, paths)
        assert recv_line(c) == b"hello\n"
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()  # RST
        assert wait_for(lambda: "close_request" in names(server.calls))
        c = kind.client(server.server_address, paths)
        after = stream_exchange(c, [b"next\n"])
    return [e[3] for e in server.calls if e[0] == "handle_error"], after


def test_client_reset_affects_only_its_request(mod, unix_path):
    ref, got = differential(mod, reset_client_scenario, "tcp", unix_path)
    assert ref == (["ConnectionResetError"], b"hello\nnext\n")
    assert got == ref


def early_close_scenario(module, kind_name, paths):
    """Clients that connect and close at once, or half-close mid-line."""
    kind = get_kind(kind_name)
    server = make_server(module, kind, default_handler(module, kind, record=True), paths,
                         bases=(RecordingServerMixin,))
    with serving(server):
        c = kind.client(server.server_address, paths)
        c.close()
        assert wait_for(lambda: "close_request" in names(server.calls))
        c = kind.client(server.server_address, paths)
        partial = stream_exchange(c, [b"no newline"])
        c = kind.client(server.server_address, paths)
        normal = stream_exchange(c, [b"x\n"])
        assert wait_for(lambda: names(server.calls).count("close_request") >= 3)
    return partial, normal, [n for n in names(server.calls) if n != "service_actions"]


@pytest.mark.parametrize("kind_name", ["tcp", "unix_stream"])
def test_client_closing_early(mod, kind_name, unix_path):
    ref, got = differential(mod, early_close_scenario, kind_name, unix_path)
    partial, normal, calls = ref
    assert (partial, normal) == (b"no newline", b"x\n")
    assert "handle_error" not in calls
    assert got == ref


def empty_datagram_scenario(module, kind_name, paths):
    kind = get_kind(kind_name)
    server = make_server(module, kind, default_handler(module, kind), paths)
    with serving(server):
        with kind.client(server.server_address, paths) as c:
            c.sendto(b"", server.server_address)
            first = c.recvfrom(100)[0]
            c.sendto(b"after\n", server.server_address)
            second = c.recvfrom(100)[0]
    return first, second


@pytest.mark.parametrize("kind_name", ["udp", "unix_dgram"])
def test_empty_datagram(mod, kind_name, unix_path):
    ref, got = differential(mod, empty_datagram_scenario, kind_name, unix_path)
    assert ref == (b"", b"AFTER\n")
    assert got == ref


def unbound_unix_dgram_client_scenario(module, paths):
    """A Unix datagram client without an address: client_address is None and
    DatagramRequestHandler.finish cannot reply (handle_error); the next,
    bound client is served."""
    kind = get_kind("unix_dgram")
    seen = []

    class H(module.DatagramRequestHandler):
        def handle(self):
            seen.append(self.client_address)
            self.wfile.write(self.packet.upper())

    server = make_server(module, kind, H, paths, bases=(RecordingServerMixin,))
    with serving(server):
        with kind.client(server.server_address, paths, bind=False) as c:
            c.sendto(b"anonymous", server.server_address)
        assert wait_for(lambda: "close_request" in names(server.calls))
        with kind.client(server.server_address, paths) as c:
            c.sendto(b"bound", server.server_address)
            reply = c.recvfrom(100)[0]
    errors = [e[3] for e in server.calls if e[0] == "handle_error"]
    return seen[0], reply, errors


def test_unbound_unix_datagram_client(mod, unix_path):
    ref, got = differential(mod, unbound_unix_dgram_client_scenario, unix_path)
    assert ref == (None, b"BOUND", ["TypeError"])
    assert got == ref


def test_huge_read_sizes_from_a_client_do_not_allocate_up_front():
    """A handler passing a client-chosen size (``rfile.read(content_length)``,
    ``request.recv(n)``) gets the data there is, never an abort or a huge allocation."""
    import threading

    import fastsocketserver

    got = {}

    class H(fastsocketserver.StreamRequestHandler):
        def handle(self):
            got["recv"] = self.request.recv(10**12)
            got["read"] = self.rfile.read(10**12)

    server = fastsocketserver.TCPServer(("127.0.0.1", 0), H)
    try:
        t = threading.Thread(target=server.handle_request)
        t.start()
        with socket.create_connection(server.server_address, timeout=10) as c:
            c.sendall(b"first")
            import time

            time.sleep(0.2)
            c.sendall(b"second part")
            c.shutdown(socket.SHUT_WR)
            c.recv(10)
        t.join(10)
        assert not t.is_alive()
    finally:
        server.server_close()
    assert got["recv"] + got["read"] == b"firstsecond part"
