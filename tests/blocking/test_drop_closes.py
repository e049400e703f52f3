"""Descriptors closed by destructors: no system call with the GIL held, no leak.

* Connections, ``makefile`` files and servers that handlers drop without closing
  are closed when the garbage collector frees them, from many threads at once, for
  the stdlib and for fastsocketserver alike: every client sees the end of stream
  and the process's descriptor count comes back to where it started.
* fastsocketserver only: a collected connection whose close blocks (``SO_LINGER``
  with unsent data the peer has not read yet) does not block the collecting thread,
  and with it every Python thread; the engine closes it away from the GIL.
"""

from __future__ import annotations

import gc
import socket
import struct
import threading

import pytest

from conftest import (JOIN_TIMEOUT, get_kind, make_server, recv_until_eof, serving,
                      settled_fd_count, wait_for)

CLIENTS = 24


def leaky_server(mod, kind, paths, keep):
    """A threading server that never closes its requests and whose handler leaves
    the request, and files made from it, in a reference cycle: only the collector
    frees them."""

    class Handler(mod.StreamRequestHandler):
        def handle(self):
            line = self.rfile.readline()
            self.wfile.write(line.upper())
            self.extra = [self.request.makefile("rb"), self.request.makefile("wb", 0)]
            self.cycle = self
            keep.set()

        def finish(self):
            pass  # rfile and wfile stay open as well

    server_cls = type("Leaky", (mod.ThreadingMixIn, kind.server_class(mod)), {
        "daemon_threads": True,
        "block_on_close": False,
        "request_queue_size": 64,
        "shutdown_request": lambda self, request: None,
    })
    return make_server(mod, kind, Handler, paths, server_cls=server_cls)


@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.parametrize("kind_name", ["tcp", "unix_stream"])
def test_collected_connections_close_and_nothing_leaks(mod, kind_name, unix_path):
    kind = get_kind(kind_name)
    before = settled_fd_count()
    for _ in range(3):
        handled = threading.Semaphore(0)

        class Keep:
            def set(self):
                handled.release()

        server = leaky_server(mod, kind, unix_path, Keep())
        with serving(server):
            clients = [kind.client(server.server_address, unix_path) for _ in range(CLIENTS)]
            try:
                for i, c in enumerate(clients):
                    c.sendall(b"line %d\n" % i)
                for _ in clients:
                    assert handled.acquire(timeout=JOIN_TIMEOUT)
                # Collect from several threads at once while the server still runs.
                collectors = [threading.Thread(target=gc.collect) for _ in range(4)]
                for t in collectors:
                    t.start()
                for t in collectors:
                    t.join(JOIN_TIMEOUT)
                    assert not t.is_alive(), "a collection did not finish"
                gc.collect()
                got = [recv_until_eof(c) for c in clients]
            finally:
                for c in clients:
                    c.close()
        assert got == [b"LINE %d\n" % i for i in range(CLIENTS)]
        del server
    assert wait_for(lambda: settled_fd_count() <= before, timeout=5), "descriptors leaked"


def test_a_lingering_close_does_not_block_the_collector(fast_mod, unix_path):
    kind = get_kind("tcp")
    ready = threading.Event()
    box = {}

    class Handler(fast_mod.BaseRequestHandler):
        def handle(self):
            conn = self.request
            conn.recv(2)  # nothing unread: a close with unread data would be a reset
            # Close blocks until the peer has the data, for up to 20 s.
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 20))
            conn.settimeout(0.0)
            sent = 0
            while True:
                try:
                    sent += conn.send(b"x" * 65536)
                except BlockingIOError:
                    break
            box["sent"] = sent
            self.cycle = self
            ready.set()

    server_cls = type("Leaky", (fast_mod.TCPServer,), {
        "shutdown_request": lambda self, request: None,
    })
    server = make_server(fast_mod, kind, Handler, unix_path, server_cls=server_cls)
    with serving(server):
        with kind.client(server.server_address, unix_path) as client:
            client.sendall(b"go")
            assert ready.wait(JOIN_TIMEOUT)
            # The client reads only once the collection has returned: a close made by
            # the collecting thread would hold the GIL until the linger time ran out
            # (this thread is already waiting, detached, when the collection starts).
            go, collected = threading.Event(), threading.Event()

            def collect():
                go.wait(JOIN_TIMEOUT)
                gc.collect()
                collected.set()

            collector = threading.Thread(target=collect)
            collector.start()
            go.set()
            assert collected.wait(JOIN_TIMEOUT), "the collection blocked in close()"
            collector.join(JOIN_TIMEOUT)
            data = recv_until_eof(client)
    assert len(data) == box["sent"] > 0
