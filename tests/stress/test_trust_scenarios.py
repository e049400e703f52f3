"""Scenarios from an adversarial run, each on the stdlib and on fastsocketserver.

* a ``threading.local`` or ``contextvars`` value set while handling one client is never
  seen by the handler of the next client (``ThreadingTCPServer``);
* ``handle_request()`` with ``timeout = 0.2`` from one thread, while another runs
  ``serve_forever()``, returns after calling ``handle_timeout()``;
* ``os.fork()`` inside a handler, then ``handle_request()`` in the child: the child serves
  the next client;
* the listening socket closed and replaced by a new one that happens to get the same
  descriptor number: ``handle_request()`` keeps its timeout and ``shutdown()`` stops
  ``serve_forever()``.

The scenarios that can hang run in a fresh interpreter (``run_isolated``), which dumps
its threads and exits when its time is up, and is killed if it does not; so a hang fails
its test in about 20 s and leaves nothing behind.
"""

from __future__ import annotations

import contextvars
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from conftest import CLIENT_TIMEOUT, call_with_timeout, recv_until_eof, serving

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
#: seconds a scenario's interpreter gets before it dumps its threads and exits
ISOLATED_TIMEOUT = 20.0

ISOLATED_MAIN = textwrap.dedent(r"""
    import faulthandler, importlib, json, os, sys
    tests_dir, scenario, module_name, timeout = sys.argv[1:5]
    faulthandler.dump_traceback_later(float(timeout), exit=True)
    sys.path[:0] = [tests_dir, os.path.dirname(tests_dir)]  # (conftest is one level up)
    import test_trust_scenarios as scenarios
    result = getattr(scenarios, scenario)(importlib.import_module(module_name))
    print("SCENARIO-RESULT " + json.dumps(result), flush=True)
""")


def run_isolated(scenario: str, mod) -> dict:
    """Run ``scenario(mod)`` (a function of this module) in a fresh interpreter and
    return the dict it returns; a hang or a crash fails the test with its output."""
    args = [sys.executable, "-c", ISOLATED_MAIN, TESTS_DIR, scenario, mod.__name__,
            str(ISOLATED_TIMEOUT)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=ISOLATED_TIMEOUT + 10)
    except subprocess.TimeoutExpired:
        # The group (the interpreter and any child it forked) is killed before the
        # interpreter is reaped, so the group id cannot belong to anyone else yet.
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=10)
        pytest.fail(f"{scenario} on {mod.__name__} was killed; stderr:\n"
                    f"{err.decode(errors='replace')[-8000:]}", pytrace=False)
    lines = [line for line in out.decode(errors="replace").splitlines()
             if line.startswith("SCENARIO-RESULT ")]
    if not lines:
        pytest.fail(f"{scenario} on {mod.__name__} exited with {proc.returncode} and no "
                    f"result; stderr:\n{err.decode(errors='replace')[-8000:]}", pytrace=False)
    return json.loads(lines[-1].split(" ", 1)[1])


def joined(thread: threading.Thread, timeout: float) -> bool:
    thread.join(timeout)
    return not thread.is_alive()


def stop_serving(server, serve: threading.Thread, result: dict) -> None:
    """Shut ``server`` down (bounded), record whether ``shutdown()`` and the serving
    thread returned, and close it."""
    result["shutdown_returned"] = call_with_timeout(server.shutdown, timeout=5.0)[0]
    result["serve_forever_returned"] = joined(serve, 5.0)
    server.server_close()


def line_echo_handler(mod):
    class Echo(mod.StreamRequestHandler):
        def handle(self):
            self.wfile.write(self.rfile.readline())

    return Echo


def exchange(address, line: bytes, timeout: float = CLIENT_TIMEOUT) -> bytes:
    with socket.create_connection(address, timeout=timeout) as s:
        s.sendall(line)
        return recv_until_eof(s)


class TimeoutCounting:
    """Mixin: counts handle_timeout() calls."""

    timeouts = 0

    def handle_timeout(self):
        self.timeouts += 1


# ---------------------------------------------------------------------------
# per-request state
# ---------------------------------------------------------------------------

REQUESTS = 20


def test_no_thread_state_shared_between_clients(mod):
    """A handler that keeps the current user in a threading.local or a ContextVar never
    hands it to the next client (the stdlib runs every request on a fresh thread)."""
    local = threading.local()
    user = contextvars.ContextVar("user", default=None)

    class Handler(mod.StreamRequestHandler):
        def handle(self):
            name = self.rfile.readline().strip().decode()
            seen = {"local": getattr(local, "user", None), "context": user.get()}
            local.user = name
            user.set(name)
            self.wfile.write(json.dumps(seen).encode() + b"\n")

    server_cls = type("Server", (mod.ThreadingTCPServer,), {"daemon_threads": True})
    server = server_cls(("127.0.0.1", 0), Handler)
    leaks = []
    with serving(server):
        for i in range(REQUESTS):
            seen = json.loads(exchange(server.server_address, f"user{i}\n".encode()))
            if seen["local"] is not None or seen["context"] is not None:
                leaks.append((i, seen))
    assert leaks == [], f"{len(leaks)} of {REQUESTS} requests saw an earlier client's state"


# ---------------------------------------------------------------------------
# handle_request() beside serve_forever()
# ---------------------------------------------------------------------------

def scenario_handle_request_beside_serve_forever(mod) -> dict:
    server_cls = type("Server", (TimeoutCounting, mod.TCPServer), {"timeout": 0.2})
    server = server_cls(("127.0.0.1", 0), line_echo_handler(mod))
    result = {}
    serve = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    serve.start()
    try:
        waiter = threading.Thread(target=server.handle_request, daemon=True)
        waiter.start()
        result["handle_request_returned"] = joined(waiter, 5.0)
        result["timeouts"] = server.timeouts
        result["served_meanwhile"] = exchange(server.server_address, b"still serving\n",
                                              timeout=5.0).decode()
    finally:
        stop_serving(server, serve, result)
    return result


def test_handle_request_timeout_beside_serve_forever(mod):
    result = run_isolated("scenario_handle_request_beside_serve_forever", mod)
    assert result == {
        "handle_request_returned": True,
        "timeouts": 1,
        "served_meanwhile": "still serving\n",
        "shutdown_returned": True,
        "serve_forever_returned": True,
    }


# ---------------------------------------------------------------------------
# fork in a handler
# ---------------------------------------------------------------------------

def wait_child(pid: int, timeout: float) -> str:
    """Wait for child ``pid`` for at most ``timeout`` s; kill it if it is still there.
    Returns "exit N" or "killed"."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return f"exit {os.waitstatus_to_exitcode(status)}"
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return "killed"


def fork_scenario(mod, threading_server: bool, idle_workers: int = 0) -> dict:
    """The first client's handler forks. The child calls handle_request() on the server
    it inherited and exits 0 only if it served the second client. The parent must not
    take that client itself: on a TCPServer its only serving thread waits in the handler
    for the child (bounded); on a ThreadingTCPServer the worker stops the parent's
    serve_forever() (which was waiting for the next client when the fork happened)
    before it answers the first client. With ``idle_workers``, that many concurrent
    requests run first, so a threading server has idle worker threads when it forks
    (the child has none of them)."""
    parent = os.getpid()
    gate = threading.Barrier(idle_workers + 1) if idle_workers else None
    result = {}

    class Handler(mod.StreamRequestHandler):
        def handle(self):
            line = self.rfile.readline()
            if line == b"warm\n":
                gate.wait(8.0)  # all of them at once: one thread each
                self.wfile.write(line)
                return
            if os.getpid() != parent:
                self.wfile.write(b"child:" + line)
                self.server.child_served.set()
                return
            pid = os.fork()
            if pid == 0:
                code = 3
                try:
                    signal.alarm(10)  # the child never outlives a hang by long
                    self.server.child_served = threading.Event()
                    self.server.timeout = 8.0
                    self.server.handle_request()
                    # (a threading server's handle_request() returns once the request
                    # is handed to a thread)
                    code = 0 if self.server.child_served.wait(8.0) else 4
                finally:
                    os._exit(code)
            if threading_server:
                result["parent_stopped"] = call_with_timeout(self.server.shutdown,
                                                             timeout=5.0)[0]
            self.wfile.write(b"forked\n")
            result["child"] = wait_child(pid, 12.0)

    base = mod.ThreadingTCPServer if threading_server else mod.TCPServer
    server = type("Server", (base,), {"daemon_threads": True})(("127.0.0.1", 0), Handler)
    serve = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    serve.start()
    try:
        warm = [threading.Thread(target=exchange, args=(server.server_address, b"warm\n"))
                for _ in range(idle_workers)]
        for thread in warm:
            thread.start()
        if gate is not None:
            gate.wait(8.0)
        result["warmed"] = all(joined(thread, 8.0) for thread in warm)
        with socket.create_connection(server.server_address, timeout=8.0) as first:
            first.sendall(b"fork\n")
            result["first"] = first.makefile("rb").readline().decode()
            try:
                result["second"] = exchange(server.server_address, b"hello\n",
                                            timeout=12.0).decode()
            except OSError as exc:
                result["second"] = repr(exc)
            deadline = time.monotonic() + 15.0
            while "child" not in result and time.monotonic() < deadline:
                time.sleep(0.02)
    finally:
        stop_serving(server, serve, result)
    return result


def scenario_fork_in_handler(mod) -> dict:
    return fork_scenario(mod, threading_server=False)


def scenario_fork_in_threaded_handler(mod) -> dict:
    return fork_scenario(mod, threading_server=True)


def scenario_fork_beside_idle_workers(mod) -> dict:
    return fork_scenario(mod, threading_server=True, idle_workers=3)


def test_fork_in_handler_then_handle_request_in_child(mod):
    result = run_isolated("scenario_fork_in_handler", mod)
    assert result == {
        "warmed": True,
        "first": "forked\n",
        "second": "child:hello\n",
        "child": "exit 0",
        "shutdown_returned": True,
        "serve_forever_returned": True,
    }


def test_fork_in_threaded_handler_then_handle_request_in_child(mod):
    result = run_isolated("scenario_fork_in_threaded_handler", mod)
    assert result == {
        "warmed": True,
        "parent_stopped": True,
        "first": "forked\n",
        "second": "child:hello\n",
        "child": "exit 0",
        "shutdown_returned": True,
        "serve_forever_returned": True,
    }


def test_fork_beside_idle_workers_then_handle_request_in_child(mod):
    """The child inherits a pool whose idle workers it does not have (and whose lock
    one of them may hold): its request must still get a thread."""
    result = run_isolated("scenario_fork_beside_idle_workers", mod)
    assert result == {
        "warmed": True,
        "parent_stopped": True,
        "first": "forked\n",
        "second": "child:hello\n",
        "child": "exit 0",
        "shutdown_returned": True,
        "serve_forever_returned": True,
    }


# ---------------------------------------------------------------------------
# a listener replaced by one with the same descriptor number
# ---------------------------------------------------------------------------

def replace_listener(server) -> bool:
    """Close server.socket and put in a new listening socket on the same descriptor
    number (the kernel gives the lowest free one; dup2 makes sure). Returns True."""
    fd = server.socket.fileno()
    server.socket.close()
    new = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if new.fileno() != fd:
        os.dup2(new.fileno(), fd)
        new.close()
        new = socket.socket(fileno=fd)
    new.bind(("127.0.0.1", 0))
    new.listen(5)
    server.socket = new
    server.server_address = new.getsockname()
    return new.fileno() == fd


def used_then_replaced(mod):
    """A server whose engine has waited on its first listener, then a replaced one."""
    server_cls = type("Server", (TimeoutCounting, mod.TCPServer), {"timeout": 0.2})
    server = server_cls(("127.0.0.1", 0), line_echo_handler(mod))
    server.handle_request()  # times out: the first listener has been waited on
    return server, replace_listener(server)


def scenario_replaced_listener_handle_request(mod) -> dict:
    server, same_fd = used_then_replaced(mod)
    result = {"same_fd": same_fd}
    try:
        waiter = threading.Thread(target=server.handle_request, daemon=True)
        waiter.start()
        result["timed_out"] = joined(waiter, 5.0)
        result["timeouts"] = server.timeouts
        if result["timed_out"]:
            server.timeout = 5.0
            box = {}

            def client():
                try:
                    box["reply"] = exchange(server.server_address, b"new listener\n", 5.0)
                except OSError as exc:
                    box["reply"] = repr(exc).encode()

            t = threading.Thread(target=client, daemon=True)
            t.start()
            ok, _, exc = call_with_timeout(server.handle_request, timeout=8.0)
            t.join(8.0)
            result["served"] = (ok, repr(exc) if exc else None,
                                box.get("reply", b"").decode())
    finally:
        server.server_close()
    return result


def test_replaced_listener_handle_request(mod):
    result = run_isolated("scenario_replaced_listener_handle_request", mod)
    assert result == {
        "same_fd": True,
        "timed_out": True,
        "timeouts": 2,
        "served": [True, None, "new listener\n"],
    }


def scenario_replaced_listener_shutdown(mod) -> dict:
    server, same_fd = used_then_replaced(mod)
    result = {"same_fd": same_fd}
    serve = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    serve.start()
    try:
        try:
            result["reply"] = exchange(server.server_address, b"served\n", 5.0).decode()
        except OSError as exc:
            result["reply"] = repr(exc)
    finally:
        stop_serving(server, serve, result)
    return result


def test_replaced_listener_shutdown(mod):
    result = run_isolated("scenario_replaced_listener_shutdown", mod)
    assert result == {
        "same_fd": True,
        "reply": "served\n",
        "shutdown_returned": True,
        "serve_forever_returned": True,
    }



def scenario_listener_replaced_while_serving(mod) -> dict:
    """The listener is closed and replaced (same number) while serve_forever() runs."""
    server_cls = type("Server", (TimeoutCounting, mod.TCPServer), {"timeout": 0.2})
    server = server_cls(("127.0.0.1", 0), line_echo_handler(mod))
    serve = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    serve.start()
    result = {}
    try:
        result["before"] = exchange(server.server_address, b"before\n", 5.0).decode()
        result["same_fd"] = replace_listener(server)
        try:
            result["after"] = exchange(server.server_address, b"after\n", 5.0).decode()
        except OSError as exc:
            result["after"] = repr(exc)
        result["shutdown_returned"] = call_with_timeout(server.shutdown, timeout=5.0)[0]
        result["serve_forever_returned"] = joined(serve, 5.0)
        if result["serve_forever_returned"]:
            waiter = threading.Thread(target=server.handle_request, daemon=True)
            waiter.start()
            result["handle_request_timed_out"] = joined(waiter, 5.0)
            result["timeouts"] = server.timeouts
    finally:
        server.server_close()
    return result


def test_listener_replaced_while_serving(mod):
    result = run_isolated("scenario_listener_replaced_while_serving", mod)
    assert result == {
        "before": "before\n",
        "same_fd": True,
        "after": "after\n",
        "shutdown_returned": True,
        "serve_forever_returned": True,
        "handle_request_timed_out": True,
        "timeouts": 1,
    }


def scenario_forked_child_returns_to_the_loop(mod) -> dict:
    """A handler forks and the child returns from handle() into serve_forever(), as a
    careless handler might. The parent stays inside its handler until the child has
    answered the second client, so only the child's loop can take that client: it must
    do so with a reactor of its own, not the parent's (whose poller the two processes
    share)."""
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    parent = os.getpid()

    class Handler(mod.StreamRequestHandler):
        def handle(self):
            line = self.rfile.readline()
            if os.getpid() != parent:
                reactor = self.server._BaseServer__reactor
                self.wfile.write(f"child stale={reactor.stale}\n".encode())
                self.wfile.flush()
                os.write(done_w, b"x")
                os._exit(0)
            if line != b"fork\n":
                return
            pid = os.fork()
            if pid == 0:
                signal.alarm(10)
                os.write(ready_w, b"x")
                return  # back into the parent's serve_forever(), in the child
            os.read(ready_r, 1)
            self.server.child = pid
            os.read(done_r, 1)  # the child has answered the second client
            self.wfile.write(b"parent\n")

    server = mod.TCPServer(("127.0.0.1", 0), Handler)
    serve = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    serve.start()
    result = {}
    try:
        with socket.create_connection(server.server_address, timeout=8.0) as first:
            first.sendall(b"fork\n")
            deadline = time.monotonic() + 8.0
            while not hasattr(server, "child") and time.monotonic() < deadline:
                time.sleep(0.01)
            result["second"] = exchange(server.server_address, b"hello\n", timeout=8.0).decode()
            result["first"] = first.makefile("rb").readline().decode()
        result["child"] = wait_child(server.child, 8.0)
    finally:
        result["shutdown_returned"] = call_with_timeout(server.shutdown, timeout=5.0)[0]
        server.server_close()
    return result


def test_forked_child_back_in_the_loop_serves_with_its_own_reactor(fast_mod):
    result = run_isolated("scenario_forked_child_returns_to_the_loop", fast_mod)
    assert result == {
        "second": "child stale=False\n",
        # The child ended the first request as the stdlib would (shutdown(SHUT_WR) on
        # the connection both processes hold): the first client sees its end.
        "first": "",
        "child": "exit 0",
        "shutdown_returned": True,
    }
