"""server_close() waiting for a hung handler can be interrupted by a signal.

The stdlib's ThreadingMixIn waits with Thread.join(), which a signal handler that
raises ends at once; the engine's pool wait must let the handler run in the same way.
"""

from __future__ import annotations

import signal
import socket
import threading
import time

import pytest

import fastsocketserver


class Interrupted(Exception):
    pass


def _raise(signum, frame):
    raise Interrupted


def test_signal_ends_server_close_waiting_for_a_handler():
    release = threading.Event()
    entered = threading.Event()

    class Hang(fastsocketserver.BaseRequestHandler):
        def handle(self):
            entered.set()
            release.wait(30)

    server = fastsocketserver.ThreadingTCPServer(("127.0.0.1", 0), Hang)
    previous = signal.signal(signal.SIGUSR1, _raise)
    runner = threading.Thread(target=server.serve_forever, args=(0.05,))
    runner.start()
    try:
        with socket.create_connection(server.server_address, timeout=5):
            assert entered.wait(5)
            server.shutdown()
            runner.join(5)
            timer = threading.Timer(0.3, signal.pthread_kill, (threading.main_thread().ident, signal.SIGUSR1))
            timer.start()
            start = time.monotonic()
            with pytest.raises(Interrupted):
                server.server_close()
            assert time.monotonic() - start < 10
            timer.join()
    finally:
        signal.signal(signal.SIGUSR1, previous)
        release.set()
        runner.join(5)
        server.server_close()
    assert not runner.is_alive()
    assert len(server._threads) == 0
