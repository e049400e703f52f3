"""``request.sendfile()`` behaves like ``socket.socket.sendfile`` (bytes sent, the
file positioned after them), with and without a socket timeout, for both modules."""

from __future__ import annotations

import io
import socket
import socketserver
import threading

import pytest

import fastsocketserver

PAYLOAD = bytes(range(256)) * 2000  # 512,000 bytes


@pytest.mark.parametrize("mod", [socketserver, fastsocketserver], ids=["stdlib", "fast"])
@pytest.mark.parametrize("timeout", [None, 5.0])
@pytest.mark.parametrize("offset,count", [(0, None), (1000, None), (1000, 70000)])
@pytest.mark.parametrize("source", ["file", "bytesio"])
def test_sendfile(tmp_path, mod, timeout, offset, count, source):
    path = tmp_path / "payload"
    path.write_bytes(PAYLOAD)
    result = {}

    class H(mod.BaseRequestHandler):
        def handle(self):
            self.request.settimeout(timeout)
            f = open(path, "rb") if source == "file" else io.BytesIO(PAYLOAD)
            with f:
                result["sent"] = self.request.sendfile(f, offset, count)
                result["pos"] = f.tell()

    server = mod.TCPServer(("127.0.0.1", 0), H)
    try:
        t = threading.Thread(target=server.handle_request)
        t.start()
        with socket.create_connection(server.server_address, timeout=10) as c:
            data = b""
            while chunk := c.recv(65536):
                data += chunk
        t.join(10)
        assert not t.is_alive()
    finally:
        server.server_close()
    end = len(PAYLOAD) if count is None else offset + count
    assert data == PAYLOAD[offset:end]
    assert result == {"sent": end - offset, "pos": end}
