"""PreforkMixIn: worker processes under a supervisor (tests/prefork_probe.py runs it).

Each test starts the supervisor in its own session, bounds every wait, and checks at
the end that no process of the session is left.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time

import pytest

from supervised import ask, children, run, session, stat_fields, wait_for

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux process model")

KINDS = [
    pytest.param({"base": "threading", "handler": "line"}, id="threading-blocking"),
    pytest.param({"base": "tcp", "handler": "protocol"}, id="tcp-protocol"),
    pytest.param({"base": "threading", "handler": "protocol"}, id="threading-protocol"),
]


def threads_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


# -- 1. workers, respawn, crash loop, orphans, reuse_port ---------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_workers_serve_and_the_supervisor_stays_single_threaded(kind):
    with run({**kind, "attrs": {"workers": 2}}) as sup:
        workers = sup.wait_workers(2)
        # Both workers answer, on the parent's one listening socket.
        assert len({ask(sup.port) for _ in range(40)} | workers) == 2
        # The supervisor never ran an engine thread, before or after forking.
        assert threads_of(sup.pid) == 1
        for pid in workers:
            fields = stat_fields(pid)
            assert fields and int(fields[1]) == sup.pid
        sup.signal(signal.SIGTERM)
        assert sup.wait() == 0
        sup.assert_gone()


def test_udp_workers_share_the_socket():
    with run({"base": "udp", "attrs": {"workers": 2}}) as sup:
        wait_for(lambda: len(sup.workers()) == 2, message="2 workers")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(10)
            s.sendto(b"pid", ("127.0.0.1", sup.port))
            data, _ = s.recvfrom(100)
        assert int(data) in sup.workers()
        sup.signal(signal.SIGTERM)
        assert sup.wait() == 0
        sup.assert_gone()


@pytest.mark.parametrize("kind", KINDS[:2])
def test_a_killed_worker_is_replaced_and_the_others_keep_serving(kind):
    with run({**kind, "attrs": {"workers": 2}}) as sup:
        workers = sup.wait_workers(2)
        victim, survivor = sorted(workers)
        # A request in flight on the survivor is not disturbed.
        with socket.create_connection(("127.0.0.1", sup.port), timeout=10) as held:
            held.sendall(b"pid\n")
            holder = int(held.recv(100))
            victim = next(iter(workers - {holder}))
            os.kill(victim, signal.SIGKILL)
            now = sup.wait_workers(2, exclude={victim})
            assert holder in now and victim not in now
            held.sendall(b"pid\n")
            assert int(held.recv(100)) == holder
        for _ in range(20):
            assert ask(sup.port) in now
        sup.signal(signal.SIGTERM)
        assert sup.wait() == 0
        sup.assert_gone()


def test_kill_9_under_load_fails_only_the_victims_requests():
    with run({"attrs": {"workers": 2}}) as sup:
        workers = sup.wait_workers(2)
        errors: list[BaseException] = []
        answered: list[int] = []
        stop = threading.Event()

        def client():
            while not stop.is_set():
                try:
                    answered.append(ask(sup.port, timeout=10))
                except OSError as exc:
                    errors.append(exc)

        threads = [threading.Thread(target=client) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            wait_for(lambda: len(answered) > 20, message="load")
            victim = min(workers)
            os.kill(victim, signal.SIGKILL)
            now = sup.wait_workers(2, exclude={victim})
            mark = len(answered)
            wait_for(lambda: len(answered) > mark + 20, message="load after the kill")
        finally:
            stop.set()
            for t in threads:
                t.join(20)
        # At most the request each client had in flight on the victim failed.
        assert len(errors) <= len(threads), errors
        assert all(isinstance(e, (ConnectionError, ValueError)) for e in errors), errors
        assert set(answered[mark:]) <= now
        sup.signal(signal.SIGTERM)
        assert sup.wait() == 0
        sup.assert_gone()


def test_a_crash_loop_stops_the_supervisor_with_a_clear_message():
    cfg = {"attrs": {"workers": 2, "crash_limit": 3}, "init_exit": 7}
    with run(cfg) as sup:
        code = sup.wait()
        err = sup.stderr()
        assert code == 3, err
        assert "3 workers in a row exited within 5 s of starting" in err
        assert "exited with status 7" in err
        sup.assert_gone()


def test_workers_exit_when_the_supervisor_is_killed():
    with run({"attrs": {"workers": 2}}) as sup:
        workers = sup.wait_workers(2)
        sup.signal(signal.SIGKILL)
        sup.wait()
        wait_for(lambda: not (session(sup.pid) & workers), message="orphaned workers to exit")
        # The port is free again: nothing holds the listening socket.
        with pytest.raises(ConnectionRefusedError):
            ask(sup.port)


def test_reuse_port_gives_each_worker_its_own_socket():
    with run({"attrs": {"workers": 2, "reuse_port": True}}) as sup:
        # Until a worker listens, nothing does: the supervisor's socket is only bound.
        workers = sup.wait_workers(2, booting_refuses=True)
        # Every connection is answered: the supervisor's socket holds the address
        # without listening, so it never takes a share it would not accept.
        answered = [ask(sup.port, timeout=5) for _ in range(60)]
        assert set(answered) == workers
        inodes = set()
        for pid in workers:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:"):
                    inodes.add((pid, target))
        # No two workers share a socket.
        by_inode = {}
        for pid, inode in inodes:
            by_inode.setdefault(inode, set()).add(pid)
        assert all(len(pids) == 1 for pids in by_inode.values())
        sup.signal(signal.SIGTERM)
        assert sup.wait() == 0
        if open("/proc/sys/net/ipv4/tcp_migrate_req").read().strip() != "1":
            assert "tcp_migrate_req=1" in sup.stderr()
        sup.assert_gone()


def test_reuse_port_needs_a_tcp_server():
    import fastsocketserver as fss

    class S(fss.PreforkMixIn, fss.UDPServer):
        reuse_port = True

    with pytest.raises(ValueError, match="reuse_port"):
        S(("127.0.0.1", 0), fss.DatagramRequestHandler)


def test_fork_is_refused_while_engine_threads_run():
    import fastsocketserver as fss

    class S(fss.PreforkMixIn, fss.ThreadingTCPServer):
        workers = 1

    class H(fss.StreamRequestHandler):
        def handle(self):
            self.wfile.write(b"x")

    with S(("127.0.0.1", 0), H) as server:
        # Serving a request here starts the pool's threads in this process.
        t = threading.Thread(target=server.handle_request)
        t.start()
        with socket.create_connection(server.server_address, timeout=10) as c:
            assert c.recv(1) == b"x"
        t.join(10)
        if not any(p.threads for p in fss._mixins._live_pools):
            pytest.skip("the pool's thread already retired")
        with pytest.raises(RuntimeError, match="engine threads"):
            server.serve_forever()


# -- 2. signals ---------------------------------------------------------------------------


def start_request(port: int, line: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    sock.sendall(line + b"\n")
    return sock


def read_answer(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(100)
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.parametrize("kind", KINDS[:2])
def test_sigterm_lets_in_flight_requests_finish(kind):
    with run({**kind, "attrs": {"workers": 2}}) as sup:
        workers = sup.wait_workers(2)
        # Both workers busy with a request that outlasts the signal.
        line = b"sleep 1.5" if kind["base"] == "threading" else b"busy 1.5"
        pending = [start_request(sup.port, line) for _ in range(2 if kind["base"] == "threading" else 1)]
        time.sleep(0.3)
        sup.signal(signal.SIGTERM)
        for sock in pending:
            with sock:
                assert int(read_answer(sock)) in workers
        assert sup.wait() == 0
        sup.assert_gone()
        with pytest.raises(ConnectionRefusedError):
            ask(sup.port)


def test_sigterm_kills_what_outlasts_graceful_timeout():
    with run({"attrs": {"workers": 1, "graceful_timeout": 1.0}}) as sup:
        sup.wait_workers(1)
        with start_request(sup.port, b"sleep 60") as sock:
            time.sleep(0.3)
            began = time.monotonic()
            sup.signal(signal.SIGTERM)
            assert sup.wait(timeout=15) == 0
            assert read_answer(sock) == b""
        assert time.monotonic() - began < 15
        err = sup.stderr()
        # The worker gives up on the request at its deadline (or the supervisor kills it).
        assert "still running after 1 s" in err or "killed" in err, err
        sup.assert_gone()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGQUIT])
def test_sigint_and_sigquit_stop_at_once(signum):
    with run({"attrs": {"workers": 2}}) as sup:
        sup.wait_workers(2)
        with start_request(sup.port, b"sleep 60") as sock:
            time.sleep(0.3)
            sup.signal(signum)
            code = sup.wait(timeout=15)
            # The in-flight request is cut short, not waited for.
            try:
                assert read_answer(sock) == b""
            except ConnectionResetError:
                pass
        assert code == (130 if signum == signal.SIGINT else 0)
        sup.assert_gone()


@pytest.mark.parametrize("kind", KINDS[:2])
def test_sighup_replaces_every_worker_without_a_failed_connection(kind):
    with run({**kind, "attrs": {"workers": 2}}) as sup:
        old = sup.wait_workers(2)
        errors: list[BaseException] = []
        answered: list[int] = []
        stop = threading.Event()

        def client():
            while not stop.is_set():
                try:
                    answered.append(ask(sup.port, timeout=10))
                except BaseException as exc:  # noqa: BLE001 -- every failure counts
                    errors.append(exc)

        threads = [threading.Thread(target=client) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            wait_for(lambda: len(answered) > 20, message="load")
            sup.signal(signal.SIGHUP)
            new = wait_for(lambda: (w := sup.workers()) and len(w) == 2 and not (w & old) and w, message="new workers")
            mark = len(answered)
            wait_for(lambda: set(answered[mark:]) >= new, message="new workers answering")
        finally:
            stop.set()
            for t in threads:
                t.join(20)
        assert errors == []
        assert set(answered) >= old | new
        sup.signal(signal.SIGTERM)
        assert sup.wait() == 0
        sup.assert_gone()


def listener_nonblocking(sup) -> bool:
    """The O_NONBLOCK flag of the listener's open file description (shared by the
    supervisor and every worker), read from the supervisor's fdinfo."""
    with open(f"/proc/{sup.pid}/fdinfo/{sup.info['fd']}") as info:
        for line in info:
            if line.startswith("flags:"):
                return bool(int(line.split()[1], 8) & os.O_NONBLOCK)
    raise AssertionError("no flags line")


def test_sigttin_and_sigttou_change_the_worker_count():
    """Also: a worker that retires leaves the shared listener non-blocking for the
    others (a worker's engine puts back what it found; the first one found it blocking,
    and putting that back would make the others wait in accept() instead of their
    poller)."""
    with run({"attrs": {"workers": 2}}) as sup:
        first = sup.wait_workers(2)
        sup.signal(signal.SIGTTIN)
        three = sup.wait_workers(3)
        assert first < three
        sup.signal(signal.SIGTTOU)
        two = sup.wait_workers(2)
        assert two < three
        assert listener_nonblocking(sup)
        sup.signal(signal.SIGTTOU)
        sup.wait_workers(1)
        time.sleep(0.3)
        assert listener_nonblocking(sup)
        assert ask(sup.port) in sup.workers()
        sup.signal(signal.SIGTTOU)  # at least one worker stays
        time.sleep(0.5)
        assert len(sup.wait_workers(1)) == 1
        sup.signal(signal.SIGTERM)
        assert sup.wait() == 0
        sup.assert_gone()


@pytest.mark.parametrize("kind", KINDS[:2])
def test_single_process_sigterm_drains(kind):
    with run({**kind, "attrs": {"workers": 0}}) as sup:
        assert ask(sup.port) == sup.pid
        line = b"sleep 1" if kind["base"] == "threading" else b"busy 1"
        with start_request(sup.port, line) as sock:
            time.sleep(0.3)
            sup.signal(signal.SIGTERM)
            assert int(read_answer(sock)) == sup.pid
        assert sup.wait() == 0
        sup.assert_gone()


def test_single_process_drain_has_a_deadline():
    with run({"attrs": {"workers": 0, "graceful_timeout": 0.5, "daemon_threads": False}}) as sup:
        with start_request(sup.port, b"sleep 60"):
            time.sleep(0.3)
            sup.signal(signal.SIGTERM)
            assert sup.wait(timeout=15) == 0
        assert "still running" in sup.stderr()


# -- 3. recycling and liveness ------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS[:2])
def test_max_requests_recycles_workers_without_a_failed_request(kind):
    with run({**kind, "attrs": {"workers": 1, "max_requests": 5}}) as sup:
        first = sup.wait_workers(1)
        fds = len(os.listdir(f"/proc/{sup.pid}/fd"))
        answered = [ask(sup.port) for _ in range(22)]
        # Each replaced worker's pipe is closed: once the retiring one is reaped, the
        # supervisor has the descriptors it had with one worker.
        wait_for(lambda: len(os.listdir(f"/proc/{sup.pid}/fd")) <= fds, message="the supervisor's fds")
        # Every request answered; a worker answers at most 5 (the last of the 22 may
        # land on a worker still serving its allowance).
        counts = {pid: answered.count(pid) for pid in set(answered)}
        assert len(counts) >= 4, counts
        assert max(counts.values()) <= 5, counts
        assert first & set(answered)
        sup.signal(signal.SIGTERM)
        assert sup.wait() == 0
        sup.assert_gone()


def test_max_requests_jitter_spreads_the_limits():
    with run({"attrs": {"workers": 1, "max_requests": 3, "max_requests_jitter": 4}}) as sup:
        sup.wait_workers(1)
        answered = [ask(sup.port) for _ in range(60)]
        runs = {pid: answered.count(pid) for pid in set(answered)}
        # The first worker also answered wait_workers(), the last one is not done.
        full = [n for pid, n in runs.items() if pid not in (answered[0], answered[-1])]
        assert all(3 <= n <= 7 for n in full), runs
        assert len(set(full)) > 1, runs
        sup.signal(signal.SIGTERM)
        assert sup.wait() == 0
        sup.assert_gone()


def test_a_stopped_worker_is_replaced():
    with run({"attrs": {"workers": 1, "worker_timeout": 1.0}}) as sup:
        (worker,) = sup.wait_workers(1)
        os.kill(worker, signal.SIGSTOP)
        (replacement,) = sup.wait_workers(1, exclude={worker}, timeout=20)
        assert replacement != worker
        sup.signal(signal.SIGTERM)
        assert sup.wait() == 0
        assert f"worker {worker} did not answer" in sup.stderr()
        sup.assert_gone()


@pytest.mark.parametrize(
    "kind,line",
    [
        # A synchronous server runs the handler inline: its loop sends no heartbeat.
        pytest.param({"base": "tcp", "handler": "line"}, b"busy 3", id="inline-pure-python"),
        # One C call holds the GIL for seconds: no thread of the worker runs Python.
        pytest.param({"base": "threading", "handler": "line"}, b"gil 3", id="threading-gil-held"),
        pytest.param({"base": "tcp", "handler": "protocol"}, b"gil 3", id="protocol-gil-held"),
    ],
)
def test_a_busy_worker_is_kept(kind, line):
    with run({**kind, "attrs": {"workers": 1, "worker_timeout": 1.0}}) as sup:
        (worker,) = sup.wait_workers(1)
        began = time.monotonic()
        assert ask(sup.port, line, timeout=30) == worker
        # The scenario happened: busy for longer than the timeout (not a speed check).
        assert time.monotonic() - began > 1.5
        assert sup.workers() == {worker}
        assert ask(sup.port) == worker
        sup.signal(signal.SIGTERM)
        assert sup.wait() == 0
        assert "did not answer" not in sup.stderr()
        sup.assert_gone()


def test_a_worker_blocked_inline_is_replaced():
    # A synchronous server whose handler waits (no CPU, loop not running): unresponsive.
    with run({"base": "tcp", "attrs": {"workers": 1, "worker_timeout": 1.0}}) as sup:
        (worker,) = sup.wait_workers(1)
        with start_request(sup.port, b"sleep 60") as sock:
            assert read_answer(sock) == b""
        (replacement,) = sup.wait_workers(1, exclude={worker})
        assert replacement != worker
        sup.signal(signal.SIGTERM)
        assert sup.wait() == 0
        sup.assert_gone()


@pytest.mark.parametrize("kind", KINDS[:2])
def test_idle_workers_are_kept(kind):
    # Idle, the serve loop's heartbeat answers for the worker (no CPU time is used).
    with run({**kind, "attrs": {"workers": 2, "worker_timeout": 0.6}}) as sup:
        workers = sup.wait_workers(2)
        time.sleep(3)
        assert sup.workers() == workers
        sup.signal(signal.SIGTERM)
        assert sup.wait() == 0
        assert "did not answer" not in sup.stderr()
        sup.assert_gone()


def test_shutdown_from_another_thread_stops_the_supervisor():
    import fastsocketserver as fss

    class H(fss.StreamRequestHandler):
        def handle(self):
            self.wfile.write(b"%d\n" % os.getpid())

    class S(fss.PreforkMixIn, fss.TCPServer):
        workers = 2

    with S(("127.0.0.1", 0), H) as server:
        t = threading.Thread(target=server.serve_forever)
        t.start()
        try:
            wait_for(lambda: len({ask(server.server_address[1]) for _ in range(10)}) == 2, message="2 workers")
            workers = children(os.getpid())
            assert len(workers) == 2
        finally:
            server.shutdown()
            t.join(30)
        assert not t.is_alive()
    # Reaped, not left running or as zombies.
    assert all(stat_fields(pid) is None for pid in workers)


@pytest.mark.parametrize("kind", KINDS[:2])
def test_a_draining_worker_serves_its_connections_and_takes_no_new_ones(kind):
    cfg = {**kind, "attrs": {"workers": 1, "graceful_timeout": 20}}
    with run(cfg) as sup:
        (old,) = sup.wait_workers(1)
        with socket.create_connection(("127.0.0.1", sup.port), timeout=10) as held:
            held.sendall(b"pid\n")
            assert int(read_answer(held)) == old
            sup.signal(signal.SIGHUP)
            # The new worker is ready; the old one drains, kept alive by `held`.
            new = wait_for(lambda: ask(sup.port) != old and sup.workers() - {old}, message="the new worker")
            assert old in sup.workers()
            # New connections all go to the new worker, none to the draining one ...
            assert {ask(sup.port) for _ in range(30)} <= new
            # ... which still serves the connection it has.
            held.sendall(b"pid\n")
            assert int(read_answer(held)) == old
        wait_for(lambda: old not in sup.workers(), message="the old worker to exit")
        sup.signal(signal.SIGTERM)
        assert sup.wait() == 0
        sup.assert_gone()
