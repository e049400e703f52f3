"""ThreadingMixIn's reused threads behave like the stdlib's new thread per request.

The engine runs threaded requests on a pool of long-lived threads; what a handler can
observe of its thread must still be what a fresh ``threading.Thread`` gives it:
- what a request left in a ``threading.local`` is released when the request ends (as
  at a thread's end), and the next request does not see it;
- ``threading.stack_size()`` decides the stack of the threads (so many handlers fit in
  a limited address space when it is small);
- a thread that cannot be started is an error for that request alone, reported through
  ``handle_error``; the server goes on serving.

Each is checked on the stdlib too (parametrized ``mod``); scenarios that change process
limits run in their own interpreter.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import weakref

from conftest import CLIENT_TIMEOUT, recv_until_eof, serving


def exchange(address, line: bytes) -> bytes:
    with socket.create_connection(address, timeout=CLIENT_TIMEOUT) as s:
        s.sendall(line)
        return recv_until_eof(s)


def test_thread_local_released_when_request_ends(mod):
    """An object a request keeps in a threading.local is finalized once the request
    is over, without waiting for the thread to retire."""
    local = threading.local()
    finalized = threading.Event()

    class Session:
        pass

    class Handler(mod.StreamRequestHandler):
        def handle(self):
            self.rfile.readline()
            session = Session()
            weakref.finalize(session, finalized.set)
            local.session = session
            self.wfile.write(b"ok\n")

    server_cls = type("Server", (mod.ThreadingTCPServer,),
                      {"daemon_threads": True, "worker_idle_timeout": 60.0})
    server = server_cls(("127.0.0.1", 0), Handler)
    with serving(server):
        assert exchange(server.server_address, b"hi\n") == b"ok\n"
        deadline = time.monotonic() + 5.0
        while not finalized.is_set() and time.monotonic() < deadline:
            gc.collect()
            finalized.wait(0.02)
        assert finalized.is_set()


def test_thread_local_initialised_per_request(mod):
    """A threading.local subclass's __init__ runs once for each request's thread."""
    inits = []

    class PerThread(threading.local):
        def __init__(self):
            inits.append(1)
            self.count = 0

    state = PerThread()
    inits.clear()  # the constructing thread's own initialisation

    class Handler(mod.StreamRequestHandler):
        def handle(self):
            self.rfile.readline()
            state.count += 1
            self.wfile.write(b"%d\n" % state.count)

    server_cls = type("Server", (mod.ThreadingTCPServer,), {"daemon_threads": True})
    server = server_cls(("127.0.0.1", 0), Handler)
    with serving(server):
        answers = [exchange(server.server_address, b"x\n") for _ in range(10)]
    assert answers == [b"1\n"] * 10
    assert len(inits) == 10


ISOLATED = textwrap.dedent(r"""
    import faulthandler, importlib, json, os, resource, socket, sys, threading, time
    faulthandler.dump_traceback_later(60, exit=True)
    mod = importlib.import_module(sys.argv[1])
    scenario = sys.argv[2]

    def vm_size():
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmSize")

    result = {}
    if scenario == "many_small_stacks":
        # Room for 400 threads of 1 MiB, not for 400 of the default 8 MiB (the
        # parent caps malloc's per-thread arenas, which would take the room too).
        clients = 400
        threading.stack_size(1 << 20)
        release = threading.Event()
        arrived = threading.Semaphore(0)

        class Handler(mod.StreamRequestHandler):
            def handle(self):
                self.rfile.readline()
                arrived.release()
                release.wait(30)
                self.wfile.write(b"ok\n")

        server = type("S", (mod.ThreadingTCPServer,), {"daemon_threads": True,
                      "request_queue_size": clients})(("127.0.0.1", 0), Handler)
        errors = []
        server.handle_error = lambda request, address: errors.append(
            repr(sys.exc_info()[1]))
        limit = vm_size() + (1536 << 20)
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
        serve = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        serve.start()
        conns = []
        for _ in range(clients):
            conn = socket.create_connection(server.server_address, timeout=30)
            conn.sendall(b"hi\n")
            conns.append(conn)
        deadline = time.monotonic() + 30
        waiting = sum(arrived.acquire(timeout=max(0.0, deadline - time.monotonic()))
                      for _ in range(clients))
        release.set()
        answered = sum(conn.makefile("rb").readline() == b"ok\n" for conn in conns)
        for conn in conns:
            conn.close()
        server.shutdown()
        server.server_close()
        result = {"waiting": waiting, "answered": answered, "errors": errors[:3]}
    elif scenario == "thread_start_fails":
        class Handler(mod.StreamRequestHandler):
            def handle(self):
                self.wfile.write(b"served:" + self.rfile.readline())

        server = type("S", (mod.ThreadingTCPServer,), {"daemon_threads": True})(
            ("127.0.0.1", 0), Handler)
        server.timeout = 10
        reported = []
        server.handle_error = lambda request, address: reported.append(
            type(sys.exc_info()[1]).__name__)
        answers = []
        for stack in (1 << 30, 0):
            # A 1 GiB stack cannot fit under the limit; the default one can.
            threading.stack_size(stack)
            limit = vm_size() + (512 << 20)
            resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
            with socket.create_connection(server.server_address, timeout=10) as conn:
                conn.sendall(b"hello\n")
                server.handle_request()
                conn.settimeout(10)
                answers.append(conn.makefile("rb").readline().decode())
            resource.setrlimit(resource.RLIMIT_AS,
                               (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        server.server_close()
        result = {"reported": reported, "answers": answers}
    print("RESULT " + json.dumps(result), flush=True)
""")


def run_isolated(mod, scenario: str) -> dict:
    env = dict(os.environ, MALLOC_ARENA_MAX="2")
    proc = subprocess.run([sys.executable, "-c", ISOLATED, mod.__name__, scenario],
                          capture_output=True, timeout=90, stdin=subprocess.DEVNULL, env=env)
    lines = [line for line in proc.stdout.decode().splitlines()
             if line.startswith("RESULT ")]
    assert lines, (proc.returncode, proc.stderr.decode(errors="replace")[-4000:])
    return json.loads(lines[-1].split(" ", 1)[1])


def test_threading_stack_size_honoured(mod):
    result = run_isolated(mod, "many_small_stacks")
    assert result == {"waiting": 400, "answered": 400, "errors": []}


def test_failed_thread_start_goes_to_handle_error(mod):
    """The request whose thread cannot start is reported (RuntimeError, as
    Thread.start() raises) and its client gets no answer; the next one is served."""
    result = run_isolated(mod, "thread_start_fails")
    assert result == {"reported": ["RuntimeError"], "answers": ["", "served:hello\n"]}


def test_handler_subprocess_can_be_terminated(mod):
    """A process started by a handler gets the signal mask a thread of the stdlib
    would give it, so Popen.terminate() stops it (a worker that blocked SIGTERM
    would pass the block on to every child)."""

    class Handler(mod.StreamRequestHandler):
        def handle(self):
            self.rfile.readline()
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                                     stdin=subprocess.DEVNULL)
            child.terminate()
            try:
                code = child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
                code = "ignored SIGTERM"
            self.wfile.write(f"{code}\n".encode())

    server_cls = type("Server", (mod.ThreadingTCPServer,), {"daemon_threads": True})
    server = server_cls(("127.0.0.1", 0), Handler)
    with serving(server):
        answer = exchange(server.server_address, b"go\n")
    assert answer == b"-15\n"
