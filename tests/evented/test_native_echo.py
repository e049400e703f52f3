"""``_core.NativeEcho``: the Rust echo protocol the benchmark uses as the engine's ceiling.

On fastsocketserver's servers the event loop echoes for it without calling Python; on
asyncio it is an ordinary protocol whose methods write through the transport it is
given. Both must echo every byte, to the right peer, and end the connection at EOF.
"""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import threading

import pytest

import fastsocketserver
from fastsocketserver import _core

TIMEOUT = 10.0


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 65536))
        if not chunk:
            break
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


class Served:
    """A fastsocketserver server with NativeEcho, serving in a thread."""

    def __init__(self, cls: type, address: object) -> None:
        self.server = cls(address, _core.NativeEcho)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.start()

    def __enter__(self) -> object:
        return self.server

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.thread.join(TIMEOUT)
        self.server.server_close()
        assert not self.thread.is_alive()


def stream_echo_checks(family: int, address: object) -> None:
    payload = os.urandom(1 << 20)
    clients = [socket.socket(family, socket.SOCK_STREAM) for _ in range(4)]
    try:
        for c in clients:
            c.settimeout(TIMEOUT)
            c.connect(address)
        for i, c in enumerate(clients):
            c.sendall(b"line %d\n" % i)
        for i, c in enumerate(clients):
            assert recv_exactly(c, len(b"line %d\n" % i)) == b"line %d\n" % i
        # A large payload, sent while the echo is read back (the server's send buffer fills).
        big = clients[0]
        sender = threading.Thread(target=big.sendall, args=(payload,))
        sender.start()
        assert recv_exactly(big, len(payload)) == payload
        sender.join(TIMEOUT)
        # End of stream from the client: the protocol closes the connection.
        big.shutdown(socket.SHUT_WR)
        assert big.recv(1) == b""
    finally:
        for c in clients:
            c.close()


def test_tcp_server_echoes_without_python():
    with Served(fastsocketserver.TCPServer, ("127.0.0.1", 0)) as server:
        stream_echo_checks(socket.AF_INET, server.server_address)


def test_unix_stream_server_echoes():
    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        path = os.path.join(d, "s")
        with Served(fastsocketserver.UnixStreamServer, path) as server:
            stream_echo_checks(socket.AF_UNIX, server.server_address)


def test_udp_server_echoes_to_each_peer():
    with Served(fastsocketserver.UDPServer, ("127.0.0.1", 0)) as server:
        peers = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
        try:
            for i, p in enumerate(peers):
                p.settimeout(TIMEOUT)
                p.sendto(b"datagram %d" % i, server.server_address)
            for i, p in enumerate(peers):
                data, addr = p.recvfrom(100)
                assert data == b"datagram %d" % i
                assert addr == server.server_address
        finally:
            for p in peers:
                p.close()


def test_native_echo_is_an_ordinary_protocol_on_asyncio():
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_core.NativeEcho, "127.0.0.1", 0)
        address = server.sockets[0].getsockname()
        reader, writer = await asyncio.open_connection(*address)
        writer.write(b"hello\n")
        assert await asyncio.wait_for(reader.readexactly(6), TIMEOUT) == b"hello\n"
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
        writer.close()
        server.close()
        await server.wait_closed()

        transport, _ = await loop.create_datagram_endpoint(_core.NativeEcho, local_addr=("127.0.0.1", 0))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
            peer.setblocking(False)
            peer.sendto(b"ping", transport.get_extra_info("sockname"))
            data = await asyncio.wait_for(loop.sock_recv(peer, 16), TIMEOUT)
        transport.close()
        assert data == b"ping"

    asyncio.run(main())


def test_native_echo_refuses_bad_arguments():
    echo = _core.NativeEcho()
    with pytest.raises(TypeError):
        echo.connection_made()  # type: ignore[call-arg]
    # Before connection_made there is no transport: received data is dropped, not echoed.
    echo.data_received(b"lost")
    assert echo.eof_received() is False


class _RecordingEcho:
    """A Python echo protocol that closes at EOF, like NativeEcho."""

    def connection_made(self, transport):  # type: ignore[no-untyped-def]
        self.transport = transport

    def data_received(self, data):  # type: ignore[no-untyped-def]
        self.transport.write(data)

    def eof_received(self):  # type: ignore[no-untyped-def]
        return False

    def connection_lost(self, exc):  # type: ignore[no-untyped-def]
        pass


@pytest.mark.parametrize("protocol", [_core.NativeEcho, _RecordingEcho], ids=["native", "python"])
def test_data_and_end_of_stream_together_are_both_seen(protocol):
    """The loop stops reading a connection after a short read (it is drained), except when
    the event also reports the peer's end of stream: data and FIN sent back to back must
    give the echo and then the close, never a connection left hanging."""
    server = fastsocketserver.TCPServer(("127.0.0.1", 0), protocol)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        for i in range(200):
            payload = b"%d " % i * (1 + i % 50) + b"\n"
            with socket.create_connection(server.server_address, timeout=TIMEOUT) as c:
                c.sendall(payload)
                c.shutdown(socket.SHUT_WR)
                got = b""
                while True:
                    chunk = c.recv(65536)
                    if not chunk:
                        break
                    got += chunk
                assert got == payload
    finally:
        server.shutdown()
        thread.join(TIMEOUT)
        server.server_close()


def test_collected_server_closes_its_connections():
    """A protocol server dropped without server_close() must not leak its connections'
    descriptors: the client sees the end of the stream once the server is collected."""
    import gc

    server = fastsocketserver.TCPServer(("127.0.0.1", 0), _core.NativeEcho)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    client = socket.create_connection(server.server_address, timeout=TIMEOUT)
    try:
        client.sendall(b"ping\n")
        assert recv_exactly(client, 5) == b"ping\n"
        server.shutdown()
        thread.join(TIMEOUT)
        server.socket.close()  # the listener is the server's own socket.socket
        del server, thread
        gc.collect()
        assert client.recv(1) == b""
    finally:
        client.close()


def test_connection_count_can_be_read_from_a_callback():
    """The event loop's open-connection count is readable from inside a protocol callback
    (the loop's own lock is held there)."""
    holder: dict = {}

    class CountingEcho(_RecordingEcho):
        def data_received(self, data):  # type: ignore[no-untyped-def]
            self.transport.write(b"%d\n" % holder["server"]._reactor().connections)

    server = fastsocketserver.TCPServer(("127.0.0.1", 0), CountingEcho)
    holder["server"] = server
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    clients = []
    try:
        for n in range(1, 4):
            c = socket.create_connection(server.server_address, timeout=TIMEOUT)
            clients.append(c)
            c.sendall(b"?\n")
            assert c.recv(16) == b"%d\n" % n
    finally:
        for c in clients:
            c.close()
        server.shutdown()
        thread.join(TIMEOUT)
        server.server_close()
