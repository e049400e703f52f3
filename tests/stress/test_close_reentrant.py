"""``server_close()`` called while ``serve_forever()`` is waiting, from a signal handler
that runs on the serving thread (a common SIGTERM pattern) or from a protocol callback:
the loop must stop promptly instead of deadlocking on the engine's own lock."""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time

import pytest

import fastsocketserver


class Echo(fastsocketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(line)


class EchoProtocol(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)


@pytest.mark.parametrize("handler", [Echo, EchoProtocol], ids=["blocking", "protocol"])
def test_server_close_from_signal_handler_stops_serve_forever(handler):
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals are delivered to the main thread")
    server = fastsocketserver.TCPServer(("127.0.0.1", 0), handler)
    closed_in_handler = []

    def on_alarm(signum, frame):
        server.server_close()
        closed_in_handler.append(True)

    old = signal.signal(signal.SIGALRM, on_alarm)
    watchdog = threading.Timer(10, lambda: signal.pthread_kill(threading.main_thread().ident, signal.SIGINT))
    watchdog.start()
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        start = time.monotonic()
        server.serve_forever(poll_interval=30)
        elapsed = time.monotonic() - start
    finally:
        watchdog.cancel()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        server.server_close()
    assert closed_in_handler == [True]
    assert elapsed < 5, f"serve_forever took {elapsed:.1f} s to notice server_close()"
    assert server.socket.fileno() == -1


def test_server_close_from_a_protocol_callback():
    holder = {}

    class Closer(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data):
            self.transport.write(data)
            if data.startswith(b"close"):
                holder["server"].server_close()

    server = fastsocketserver.TCPServer(("127.0.0.1", 0), Closer)
    holder["server"] = server
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 30})
    thread.start()
    try:
        with socket.create_connection(server.server_address, timeout=10) as c:
            c.sendall(b"hello\n")
            assert c.recv(100) == b"hello\n"
            c.sendall(b"close\n")
            # The echo queued before server_close may or may not have been sent; the
            # connection must end either way.
            data = b""
            while chunk := c.recv(100):
                data += chunk
            assert data in (b"", b"close\n")
        thread.join(10)
        assert not thread.is_alive(), "serve_forever did not return after server_close()"
    finally:
        if thread.is_alive():
            server.shutdown()
        server.server_close()
