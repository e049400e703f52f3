"""Ctrl-C (SIGINT) on a protocol-handler server holding thousands of connections.

The server runs in a subprocess with SIGINT at its default (a background process
started from a non-interactive shell would have it ignored). After SIGINT,
``serve_forever()`` must raise KeyboardInterrupt promptly; ``server_close()`` must then
call ``connection_lost`` on every open connection and leave no descriptor behind.
"""

from __future__ import annotations

import json
import os
import resource
import selectors
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

import fastsocketserver  # noqa: F401  (a broken build fails, never skips)

N_CONNECTIONS = 2000

SERVER = textwrap.dedent(
    r"""
    import asyncio, json, os, sys
    import fastsocketserver

    lost = []

    class Echo(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport
        def data_received(self, data):
            self.transport.write(data)
        def connection_lost(self, exc):
            lost.append(exc)

    class Server(fastsocketserver.TCPServer):
        request_queue_size = 4096

    fds_before = len(os.listdir("/proc/self/fd"))
    server = Server(("127.0.0.1", 0), Echo)
    print(json.dumps({"port": server.server_address[1]}), flush=True)
    try:
        server.serve_forever(poll_interval=30)
    except KeyboardInterrupt:
        outcome = "KeyboardInterrupt"
    else:
        outcome = "returned"
    server.server_close()
    fds_after = len(os.listdir("/proc/self/fd"))
    print(json.dumps({"outcome": outcome, "lost": len(lost),
                      "lost_errors": sum(e is not None for e in lost),
                      "fds_before": fds_before, "fds_after": fds_after}), flush=True)
    """
)


def _raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below the {need} this test needs")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def _preexec() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    need = N_CONNECTIONS + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))


def test_sigint_with_thousands_of_connections() -> None:
    _raise_nofile(N_CONNECTIONS + 256)
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_preexec,
    )
    clients: list[socket.socket] = []
    try:
        port = json.loads(proc.stdout.readline())["port"]
        sel = selectors.DefaultSelector()
        deadline = time.monotonic() + 60
        for _ in range(N_CONNECTIONS):
            c = socket.create_connection(("127.0.0.1", port), timeout=10)
            c.sendall(b"ping\n")
            c.setblocking(False)
            sel.register(c, selectors.EVENT_READ)
            clients.append(c)
        echoed = 0
        while echoed < N_CONNECTIONS and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=1):
                assert key.fileobj.recv(16) == b"ping\n"
                sel.unregister(key.fileobj)
                echoed += 1
        sel.close()
        assert echoed == N_CONNECTIONS, f"only {echoed} of {N_CONNECTIONS} connections echoed"

        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
        elapsed = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        for c in clients:
            c.close()
    assert elapsed < 5, f"serve_forever took {elapsed:.1f} s to stop on SIGINT"
    report = json.loads(out.strip().splitlines()[-1])
    assert report["outcome"] == "KeyboardInterrupt", (report, err)
    assert report["lost"] == N_CONNECTIONS, report
    assert report["lost_errors"] == 0, report
    # The server's own listening socket was opened after the first count and closed.
    assert report["fds_after"] == report["fds_before"], report
