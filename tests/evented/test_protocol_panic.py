"""A Rust panic inside a protocol callback (``_core._panic``) is one connection's
failure: it reaches ``handle_error`` as PanicException, that connection is aborted with
``connection_lost(PanicException)``, and the server keeps serving."""

from __future__ import annotations

import asyncio
import socket
import threading

import fastsocketserver
from fastsocketserver import _core


def test_panic_in_data_received_aborts_only_that_connection():
    errors: list[str] = []
    lost: list[str] = []

    class Echo(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data):
            if data.startswith(b"panic"):
                _core._panic("boom in data_received")
            self.transport.write(data)

        def connection_lost(self, exc):
            lost.append(type(exc).__name__)

    class Server(fastsocketserver.TCPServer):
        def handle_error(self, request, client_address):
            import sys

            errors.append(type(sys.exc_info()[1]).__name__)

    server = Server(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    try:
        for _ in range(3):
            with socket.create_connection(server.server_address, timeout=10) as bad:
                bad.sendall(b"panic\n")
                assert bad.recv(100) == b""  # aborted
            with socket.create_connection(server.server_address, timeout=10) as good:
                good.sendall(b"fine\n")
                assert good.recv(100) == b"fine\n"
    finally:
        server.shutdown()
        thread.join(10)
        server.server_close()
    assert not thread.is_alive()
    assert errors == ["PanicException"] * 3
    assert lost.count("PanicException") == 3
    assert lost.count("NoneType") == 3
