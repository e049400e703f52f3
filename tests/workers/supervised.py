"""Helpers for tests that run a supervisor (tests/prefork_probe.py) in its own session.

Every process is started with ``start_new_session=True``, so the supervisor's pid is
also its session id, and every worker it forks is in that session: ``session()``
lists them from ``/proc``, and ``run()`` kills the whole session when a test leaves,
passed or failed. Every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PROBE = str(Path(__file__).with_name("prefork_probe.py"))
DEADLINE = 30.0


def stat_fields(pid: int) -> list[str] | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return data[data.rfind(b")") + 2 :].decode().split()


def session(sid: int) -> set[int]:
    """Live (not zombie) processes of session ``sid``."""
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = stat_fields(int(entry))
            # fields: state ppid pgrp session ...
            if fields and int(fields[3]) == sid and fields[0] != "Z":
                pids.add(int(entry))
    return pids


def children(pid: int) -> set[int]:
    """Live children of ``pid``."""
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = stat_fields(int(entry))
            if fields and int(fields[1]) == pid and fields[0] != "Z":
                out.add(int(entry))
    return out


def wait_for(predicate, timeout: float = DEADLINE, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {message}")
        time.sleep(0.02)


def ask(port: int, line: bytes = b"pid", timeout: float = 10.0) -> int:
    """One request on a new connection; the pid that answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(line + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(100)
            if not chunk:
                raise ConnectionError(f"closed after {data!r}")
            data += chunk
    return int(data)


class Supervised:
    def __init__(self, proc: subprocess.Popen, info: dict) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.port = info.get("port")
        self.info = info

    def workers(self) -> set[int]:
        return children(self.pid)

    def wait_workers(
        self, count: int, exclude: set[int] = frozenset(), timeout: float = DEADLINE, booting_refuses: bool = False
    ) -> set[int]:
        """Wait until ``count`` workers (none of ``exclude``) exist and every one of
        them has answered a request; returns their pids. ``booting_refuses``: a refused
        connection means no worker listens yet (reuse_port), so try again."""
        seen: set[int] = set()

        def done():
            now = self.workers()
            if len(now) != count or now & exclude:
                return None
            seen.intersection_update(now)
            try:
                seen.add(ask(self.port))
            except ConnectionRefusedError:
                if not booting_refuses:
                    raise
                return None
            return now if seen == now else None

        return wait_for(done, timeout, f"{count} workers answering")

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout: float = DEADLINE) -> int:
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        return self.proc.stderr.read() if self.proc.stderr else ""

    def assert_gone(self, timeout: float = DEADLINE) -> None:
        """Nothing of the session is left (the supervisor reaped, workers exited)."""
        wait_for(lambda: not session(self.pid), timeout, f"session {self.pid} to end: {session(self.pid)}")


@contextlib.contextmanager
def run(cfg: dict, env: dict | None = None, argv: list[str] | None = None, pass_fds=(), expect_line: bool = True):
    """Start the probe (or ``argv``) in a new session; kill the session on the way out."""
    cmd = argv if argv is not None else [sys.executable, PROBE, json.dumps(cfg)]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=env,
        pass_fds=pass_fds,
    )
    try:
        info: dict = {}
        if expect_line:
            sel = selectors.DefaultSelector()
            sel.register(proc.stdout, selectors.EVENT_READ)
            if not sel.select(DEADLINE):
                raise AssertionError("the server printed nothing")
            sel.close()
            line = proc.stdout.readline()
            assert line, f"server exited: {proc.wait(5)}, {proc.stderr.read()}"
            info = json.loads(line) if line.startswith("{") else {"line": line}
        yield Supervised(proc, info)
    finally:
        for pid in session(proc.pid) | {proc.pid}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()
