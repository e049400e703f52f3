"""Pre-forked worker processes under a supervisor: ``PreforkMixIn`` (an extension).

One Python process runs Python handlers on one core. ``PreforkMixIn`` puts a server on
every core without changing its handler or its server class::

    class Server(PreforkMixIn, ThreadingTCPServer):
        workers = 4

    with Server(("127.0.0.1", 8000), Handler) as server:
        server.serve_forever()

The constructor binds and listens once, in the calling process, exactly as the server
class does on its own. ``serve_forever()`` then makes that process the *supervisor*:
it forks ``workers`` worker processes, each running the base class's ordinary serve
loop with the same handler (blocking or ``asyncio.Protocol``-shaped), and from then on
only watches them. The supervisor never creates a reactor, an event loop or a thread
pool, so it forks with no engine thread alive (checked before every fork: a forked
child would inherit a copy of a thread's locks but not the thread).

Listening modes
    By default every worker accepts from the one listening socket the supervisor
    bound: one kernel accept queue. A worker that stops (restart, recycle, crash)
    leaves its share of the queue to the others, so nothing queued is lost. Linux
    wakes the most recent waiter first, so the spread across workers is uneven under
    light load; it evens out when workers are busy. ``reuse_port = True`` gives each
    worker its own ``SO_REUSEPORT`` socket instead (the kernel spreads connections
    evenly by hashing), at a cost: connections queued on a worker's socket when it
    closes are reset, unless the ``net.ipv4.tcp_migrate_req`` sysctl is 1 (the
    supervisor logs a warning when it is not). The supervisor's own socket then only
    reserves the address (bound, not listening), so it never takes a share. Shared
    queue is the default because a restart must not reset connections.

Supervision
    A worker that dies is replaced. A worker counts as serving once it has reported
    ready over its pipe (after ``worker_init()``, just before its serve loop); a
    rolling restart stops an old worker only after a new one is ready. When
    ``crash_limit`` workers in a row die within ``crash_window`` seconds of their start
    (or before they were ready), the supervisor stops the others and raises
    ``WorkerCrashLoop`` instead of forking forever. Workers exit when the supervisor
    dies: the kernel sends them SIGTERM (``PR_SET_PDEATHSIG``; a worker whose
    supervisor died before that was set notices it at once from its parent pid), and
    their pipe breaks.

Liveness (``worker_timeout`` seconds, gunicorn's ``timeout``)
    A worker is killed (SIGKILL) and replaced when, for ``worker_timeout`` seconds, it
    has neither sent a heartbeat nor used any CPU time. The heartbeat is a byte on its
    pipe, sent from the serve loop's ``service_actions()`` (the worker's
    ``poll_interval`` is lowered to a quarter of ``worker_timeout`` when it is longer). The CPU time is read by the supervisor from the
    kernel (``/proc/PID/stat``), which answers for the worker without the worker's
    GIL: a worker whose handler runs CPU-bound Python, even one C call holding the GIL
    for minutes, makes no heartbeat but uses CPU, and is kept. A worker that is
    stopped (SIGSTOP), deadlocked, or blocked in a handler run inline by a synchronous
    server (the serve loop is then not running, as with gunicorn's sync workers) does
    neither, and is replaced. A heartbeat thread in the worker would have been
    starved by such a handler and killed a healthy worker (uvicorn #2506); the
    kernel's CPU accounting cannot be starved. The price: a worker spinning forever is
    never killed by the check. Not named ``timeout``: that attribute is the stdlib's
    ``handle_request()`` timeout.

Recycling
    ``max_requests`` (0: never) retires a worker after that many requests (accepted
    connections, or datagrams), plus a random 0..``max_requests_jitter`` so that the
    workers do not all restart together. The worker tells the supervisor first (a
    replacement is forked at once), then stops gracefully. Counting calls one Python
    hook per request (the server's ``verify_request`` is wrapped in the worker).

Signals, with gunicorn's meanings (to the supervisor)

    ========  ==============================================================
    SIGTERM   graceful stop: workers stop accepting, finish their in-flight
              requests, and exit; after ``graceful_timeout`` seconds (default
              30) what is left is killed. ``serve_forever()`` then returns.
    SIGINT    quick stop: workers get SIGQUIT and exit at once (in-flight
    SIGQUIT   requests fail); ``serve_forever()`` returns (raises
              ``KeyboardInterrupt`` for SIGINT, as the stdlib's loop does).
    SIGHUP    rolling restart: each worker is replaced by a freshly forked one;
              an old worker gets its graceful stop only once a new one is ready,
              so with the shared queue no connection is refused or reset.
    SIGTTIN   one worker more.
    SIGTTOU   one worker fewer (at least one is kept), the oldest one retiring
              gracefully.
    ========  ==============================================================

    A worker treats SIGTERM as its graceful stop: the serve loop ends after what it
    has accepted, and nothing new is taken from the socket; ``ThreadingMixIn``'s
    in-flight requests are waited for, and a protocol handler's open connections are
    served (their queued output sent) until they close; at ``graceful_timeout`` the
    kernel ends the worker (SIGALRM, armed at its default action, works even when no
    Python code can run). SIGINT/SIGQUIT are a quick exit; SIGHUP/SIGTTIN/SIGTTOU are
    ignored (a terminal sends them to the whole process group; they are meant for the
    supervisor). Signals are blocked across ``fork()`` until the worker has its own
    handlers, so none meant for it reaches the supervisor's handler it inherited.

Single process
    ``workers = 0`` serves in the calling process, with the workers' signal meanings:
    SIGTERM drains (the loop stops accepting, in-flight requests get up to
    ``graceful_timeout`` seconds, then ``serve_forever()`` returns); SIGINT raises
    ``KeyboardInterrupt``. ``graceful_shutdown()`` asks for the same drain from code
    (it is safe in a signal handler and does not wait, unlike ``shutdown()``).

systemd: when ``NOTIFY_SOCKET`` is set, the supervisor sends ``READY=1`` once its
first workers are ready (and after each rolling restart), ``RELOADING=1`` at SIGHUP and
``STOPPING=1`` when it stops; see ``fastsocketserver._systemd`` for serving a socket
that systemd (or ``--fd N``) passes in.
"""

from __future__ import annotations

import logging
import os
import random
import select
import signal
import socket
import sys
import threading
import traceback
from time import monotonic as _now
from typing import Any

from . import _core, _mixins, _systemd

__all__ = ["PreforkMixIn", "WorkerCrashLoop"]

log = logging.getLogger("fastsocketserver.prefork")

#: What a worker writes on its pipe to the supervisor.
_READY = b"R"
_BEAT = b"."
_RETIRING = b"M"

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
_SUPERVISOR_SIGNALS = _STOP_SIGNALS + (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD)
#: Meant for the supervisor; a terminal sends them to the whole process group.
_WORKER_IGNORED = (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU)

_PR_SET_PDEATHSIG = 1


class WorkerCrashLoop(RuntimeError):
    """Workers kept dying right after they started; the supervisor stopped."""


def _set_parent_death_signal(signum: int) -> bool:
    """Ask the kernel to send ``signum`` to this process when its parent dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, user + system CPU ticks) of ``pid`` from the kernel, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        return fields[0].decode(), int(fields[11]) + int(fields[12])
    except (IndexError, ValueError):
        return None


def _engine_threads() -> int:
    """Live threads of this process's engine pools (threads a fork would not copy)."""
    return sum(pool.threads for pool in list(_mixins._live_pools) if not pool.stale)


def _migrate_req_enabled() -> bool:
    try:
        with open("/proc/sys/net/ipv4/tcp_migrate_req") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


class _Worker:
    """The supervisor's record of one worker process."""

    __slots__ = ("pid", "fd", "started", "ready", "beat", "cpu", "progress", "old", "retiring", "deadline", "reason")

    def __init__(self, pid: int, fd: int, now: float) -> None:
        self.pid = pid
        self.fd = fd  # read end of the worker's pipe
        self.started = now
        self.ready = False
        self.beat = now  # last heartbeat (or the start)
        self.cpu = -1  # CPU ticks when last sampled
        self.progress = now  # when the CPU ticks last moved
        self.old = False  # to be replaced by a rolling restart
        self.retiring = False  # told to stop (or stopping by itself), or killed
        self.deadline = 0.0  # retiring: SIGKILL after this
        self.reason = ""  # why it is retiring


class PreforkMixIn:
    """Mix-in class that serves with pre-forked worker processes under a supervisor.

    Put it first: ``class Server(PreforkMixIn, ThreadingTCPServer)``. See the module
    documentation for the listening modes, the liveness check and the signals.
    """

    #: Worker processes (0: serve in this process, with the graceful SIGTERM drain).
    workers = 2
    #: One SO_REUSEPORT socket per worker instead of the shared accept queue
    #: (TCP/IP stream servers only).
    reuse_port = False
    #: Seconds a graceful stop waits for in-flight requests before killing.
    graceful_timeout: float = 30.0
    #: Seconds without heartbeat and without CPU use before a worker is replaced
    #: (None or 0: no liveness check).
    worker_timeout: float | None = 30.0
    #: Requests (connections or datagrams) after which a worker is recycled (0: never).
    max_requests = 0
    #: A random 0..max_requests_jitter added to each worker's max_requests.
    max_requests_jitter = 0
    #: A worker dying within this many seconds of its start counts as a crash ...
    crash_window: float = 5.0
    #: ... and this many crashes in a row stop the supervisor (WorkerCrashLoop).
    crash_limit = 5

    _prefork_pid: int | None = None  # the process whose serve_forever supervises
    _prefork_role = ""  # "" (not serving), "supervisor", "worker" or "single"
    _prefork_beat: Any = None
    _prefork_supervisor: Any = None
    _prefork_deadline = 0.0  # a worker's graceful stop: when the kernel ends it

    # -- hooks -----------------------------------------------------------------------

    def worker_init(self) -> None:
        """Called in each new worker before it reports ready.  May be overridden."""

    # -- binding -----------------------------------------------------------------------

    def server_bind(self) -> None:
        if self.reuse_port:
            family = getattr(self, "address_family", None)
            if family not in (socket.AF_INET, socket.AF_INET6) or getattr(self, "socket_type", None) != socket.SOCK_STREAM:
                raise ValueError("reuse_port needs a TCP/IP stream server (AF_INET or AF_INET6, SOCK_STREAM)")
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # type: ignore[attr-defined]
        super().server_bind()  # type: ignore[misc]

    def server_activate(self) -> None:
        # With reuse_port the supervisor's socket only holds the address: a listening
        # socket in the group would take a share of the connections and never accept.
        if self.reuse_port and self._prefork_role != "worker" and self.workers > 0:
            return
        super().server_activate()  # type: ignore[misc]

    # -- serving ---------------------------------------------------------------------

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Supervise ``workers`` worker processes until a stop signal (see the module
        documentation); with ``workers = 0``, serve here with the graceful drain."""
        if self._prefork_role == "worker":
            super().serve_forever(poll_interval)  # type: ignore[misc]
            return
        if self._prefork_role:
            raise RuntimeError(f"{type(self).__name__}.serve_forever() is already running")
        workers = int(self.workers)
        if workers < 0:
            raise ValueError(f"workers must be >= 0, not {workers}")
        if workers == 0:
            self._serve_single(poll_interval)
            return
        if self.reuse_port and self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):  # type: ignore[attr-defined]
            # An inherited listening socket: it would take a share of the connections
            # in the SO_REUSEPORT group and nobody would accept them.
            raise ValueError("reuse_port needs a socket this server bound itself, not a listening one it inherited")
        supervisor = _Supervisor(self, workers, poll_interval)
        self._prefork_role, self._prefork_supervisor = "supervisor", supervisor
        try:
            supervisor.run()
        finally:
            self._prefork_role, self._prefork_supervisor = "", None

    def shutdown(self) -> None:
        """Stop the serve_forever loop (the supervisor: a graceful stop of every
        worker) and wait until it has ended."""
        supervisor = self._prefork_supervisor
        if supervisor is not None:
            supervisor.request_stop(graceful=True)
            supervisor.finished.wait()
            return
        super().shutdown()  # type: ignore[misc]

    def graceful_shutdown(self) -> None:
        """Ask the serve loop to stop accepting and drain; return at once.

        Safe in a signal handler, unlike ``shutdown()``. In a supervisor it starts the
        graceful stop of every worker.
        """
        supervisor = self._prefork_supervisor
        if supervisor is not None:
            supervisor.request_stop(graceful=True)
            return
        # The base loop's own stop request (its flag and its waker), without the wait
        # for the loop to end that shutdown() does.
        self._BaseServer__shutdown_request = True  # type: ignore[attr-defined]
        reactor = getattr(self, "_BaseServer__reactor", None)
        if reactor is not None:
            reactor.wake()

    def service_actions(self) -> None:
        beat = self._prefork_beat
        if beat is not None:
            beat()
        super().service_actions()  # type: ignore[misc]

    # -- single process ----------------------------------------------------------------

    def _serve_single(self, poll_interval: float) -> None:
        draining = threading.Event()

        def on_term(signum: int, frame: Any) -> None:
            if not draining.is_set():
                draining.deadline = _now() + float(self.graceful_timeout)  # type: ignore[attr-defined]
            draining.set()
            self.graceful_shutdown()

        saved = None
        if threading.current_thread() is threading.main_thread():
            saved = signal.signal(signal.SIGTERM, on_term)
        self._prefork_role = "single"
        try:
            _systemd.notify("READY=1")
            super().serve_forever(poll_interval)  # type: ignore[misc]
            if draining.is_set():
                _systemd.notify("STOPPING=1")
                self._drain(draining.deadline)  # type: ignore[attr-defined]
        finally:
            self._prefork_role = ""
            if saved is not None:
                signal.signal(signal.SIGTERM, saved)

    def _drain(self, deadline: float) -> None:
        """After the serve loop ended for a graceful stop: serve what is in flight
        until ``deadline``, taking nothing new. Protocol handlers: the event loop stops
        accepting and runs until its connections are closed (their queued output sent).
        ``ThreadingMixIn``: wait for the requests ``server_close()`` would wait for;
        past the deadline, let ``server_close()`` leave them."""
        loop = getattr(self, "_BaseServer__reactor", None)
        if type(loop) is _core.EventLoop:
            loop.stop_accepting()
            while True:
                loop.run_once(0)  # sends what the last callbacks wrote
                remaining = deadline - _now()
                if not loop.connections or remaining <= 0:
                    break
                loop.run_once(min(0.1, remaining))
        threads = vars(self).get("_threads")
        pool = getattr(threads, "_pool", None)
        if pool is not None and not pool.join(max(0.0, deadline - _now())):
            log.warning("graceful stop: %d request(s) still running after %g s; not waiting for them",
                        len(threads), self.graceful_timeout)
            self._threads = _mixins._NoThreads()

    # -- the worker side -----------------------------------------------------------

    def _worker_main(
        self, pipe: int, close_fds: list[int], supervisor_pid: int, poll_interval: float, mask: Any
    ) -> None:
        """Run in a freshly forked worker (its signals blocked until its handlers are
        set; ``mask`` is the mask to restore); never returns."""
        status = 1
        try:
            self._prefork_role = "worker"
            self._prefork_supervisor = None
            signal.set_wakeup_fd(-1)
            for fd in close_fds:
                os.close(fd)
            for signum in _WORKER_IGNORED:
                signal.signal(signum, signal.SIG_IGN)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGQUIT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, lambda signum, frame: self._worker_stop())
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            os.set_blocking(pipe, False)
            _set_parent_death_signal(signal.SIGTERM)
            if os.getppid() != supervisor_pid:
                # The supervisor died before the death signal was set.
                self._worker_stop()
            if self.reuse_port:
                self._worker_socket()
            limit = int(self.max_requests)
            if limit > 0:
                self._count_requests(limit + random.randint(0, max(0, int(self.max_requests_jitter))), pipe)
            timeout = self.worker_timeout
            interval = 1.0 if not timeout else min(1.0, timeout / 4)
            poll_interval = min(poll_interval, interval)
            self._prefork_beat = _Heartbeat(self, pipe, interval)
            self.worker_init()
            _write(pipe, _READY)
            super().serve_forever(poll_interval)  # type: ignore[misc]
            if self._prefork_deadline:
                # Stop a little before the kernel's hard deadline, to close cleanly.
                margin = min(1.0, 0.1 * float(self.graceful_timeout))
                self._drain(self._prefork_deadline - margin)
            self.server_close()  # type: ignore[attr-defined]
            status = 0
        except KeyboardInterrupt:
            status = 0
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(status)

    def _worker_stop(self) -> None:
        """The worker's graceful stop; the kernel ends the process at the deadline."""
        if self._prefork_deadline:
            return
        self._prefork_deadline = _now() + float(self.graceful_timeout)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.setitimer(signal.ITIMER_REAL, max(0.001, float(self.graceful_timeout)))
        self.graceful_shutdown()

    def _worker_socket(self) -> None:
        """reuse_port: this worker's own listening socket on the supervisor's address."""
        inherited = self.socket  # type: ignore[has-type]
        self.socket = socket.socket(self.address_family, self.socket_type)  # type: ignore[attr-defined]
        try:
            self.server_bind()
            self.server_activate()
        except BaseException:
            self.socket.close()
            raise
        finally:
            inherited.close()

    def _count_requests(self, limit: int, pipe: int) -> None:
        inner = self.verify_request  # type: ignore[attr-defined]
        count = 0

        def verify_request(request: Any, client_address: Any) -> bool:
            nonlocal count
            count += 1
            if count == limit:
                _write(pipe, _RETIRING)
                self._worker_stop()
            return inner(request, client_address)

        self.verify_request = verify_request


class _Heartbeat:
    """The worker's heartbeat: a byte on its pipe, at most every ``interval`` seconds."""

    def __init__(self, server: PreforkMixIn, pipe: int, interval: float) -> None:
        self.server, self.pipe, self.interval = server, pipe, interval
        self.next = 0.0

    def __call__(self) -> None:
        now = _now()
        if now < self.next:
            return
        self.next = now + self.interval
        if not _write(self.pipe, _BEAT):
            self.server._worker_stop()  # the supervisor is gone


def _write(fd: int, data: bytes) -> bool:
    """Write to a worker's pipe; False if the supervisor is gone (a full pipe is not)."""
    try:
        os.write(fd, data)
    except BlockingIOError:
        pass
    except OSError:
        return False
    return True


class _Supervisor:
    """The supervisor's loop, in the process that called serve_forever()."""

    def __init__(self, server: PreforkMixIn, workers: int, poll_interval: float) -> None:
        self.server = server
        self.target = workers
        self.poll_interval = poll_interval
        self.workers: dict[int, _Worker] = {}
        self.signals: list[int] = []
        self.stop: str | None = None  # None, "graceful" or "quick"
        self.stop_signal = 0
        self.crashes = 0
        self.last_crash = 0.0
        self.announced = False  # READY=1 sent for the current set of workers
        self.finished = threading.Event()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.tick = 0.5
        timeout = server.worker_timeout
        if timeout:
            self.tick = min(self.tick, timeout / 4)

    # -- requests from signal handlers and other threads ---------------------------

    def request_stop(self, graceful: bool) -> None:
        if self.stop is None or not graceful:
            self.stop = "graceful" if graceful else "quick"
        try:
            os.write(self.wake_w, b"\0")
        except OSError:
            pass

    def _on_signal(self, signum: int, frame: Any) -> None:
        # The wakeup fd has already woken the loop; record the signal for it.
        self.signals.append(signum)

    # -- the loop ----------------------------------------------------------------------

    def run(self) -> None:
        server = self.server
        saved: dict[int, Any] = {}
        old_wakeup = None
        if threading.current_thread() is threading.main_thread():
            for signum in _SUPERVISOR_SIGNALS:
                saved[signum] = signal.signal(signum, self._on_signal)
            old_wakeup = signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        else:
            log.warning("serve_forever() runs outside the main thread: the supervisor cannot receive signals")
        if server.reuse_port and not _migrate_req_enabled():
            log.warning(
                "reuse_port: connections queued on a worker's own socket are reset when "
                "that worker is replaced, unless net.ipv4.tcp_migrate_req=1"
            )
        # The workers share the listener's open file description, and with it its
        # O_NONBLOCK flag, which each worker's engine sets while it waits and puts back
        # as it found it when it stops: a worker that found it blocking would make it
        # blocking under the others, whose accept loops would then wait in accept()
        # instead of their poller (no heartbeat, no wake-up). So the flag is set here,
        # once, before any worker exists, and put back when the last one is gone.
        shared_listener = None if server.reuse_port else server.socket  # type: ignore[attr-defined]
        was_blocking = shared_listener is not None and shared_listener.getblocking()
        if was_blocking:
            os.set_blocking(shared_listener.fileno(), False)
        try:
            self.manage()
            while self.stop is None:
                self.wait(self.tick)
                self.reap()
                self.handle_signals()
                if self.stop is not None:
                    break
                self.check_workers()
                self.manage()
            self.shut_down()
        finally:
            self.kill_all()
            if was_blocking and shared_listener.fileno() >= 0:
                os.set_blocking(shared_listener.fileno(), True)
            if old_wakeup is not None:
                signal.set_wakeup_fd(old_wakeup)
            for signum, handler in saved.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
            os.close(self.wake_r)
            os.close(self.wake_w)
            self.finished.set()
        if self.stop_signal == signal.SIGINT:
            raise KeyboardInterrupt

    def wait(self, timeout: float) -> None:
        """Wait for a signal, a stop request or a worker's message; read them."""
        fds = [self.wake_r] + [w.fd for w in self.workers.values() if w.fd >= 0]
        try:
            ready, _, _ = select.select(fds, [], [], max(0.0, timeout))
        except InterruptedError:  # pragma: no cover - PEP 475 retries
            return
        now = _now()
        for fd in ready:
            if fd == self.wake_r:
                try:
                    data = os.read(fd, 512)
                except BlockingIOError:
                    continue
                # Signals that arrived as wakeup bytes but whose Python handler has
                # not run yet are picked up when it runs (it appends to self.signals).
                del data
                continue
            worker = next((w for w in self.workers.values() if w.fd == fd), None)
            if worker is None:
                continue
            try:
                data = os.read(fd, 4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                # The worker closed its end: it is exiting (waitpid will tell).
                os.close(worker.fd)
                worker.fd = -1
                continue
            worker.beat = now
            if _READY in data and not worker.ready:
                worker.ready = True
                log.info("worker %d ready", worker.pid)
            if _RETIRING in data and not worker.retiring:
                self.retire(worker, "max_requests reached", signal_it=False)

    def handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if signum == signal.SIGTERM:
                self.stop_signal = self.stop_signal or signum
                self.request_stop(graceful=True)
            elif signum in (signal.SIGINT, signal.SIGQUIT):
                self.stop_signal = signum
                self.request_stop(graceful=False)
            elif signum == signal.SIGHUP:
                log.info("SIGHUP: replacing every worker")
                _systemd.notify("RELOADING=1\nMONOTONIC_USEC=%d" % (_systemd._monotonic_usec(),))
                self.announced = False
                for worker in self.workers.values():
                    if not worker.retiring:
                        worker.old = True
            elif signum == signal.SIGTTIN:
                self.target += 1
                log.info("SIGTTIN: %d workers", self.target)
            elif signum == signal.SIGTTOU:
                if self.target > 1:
                    self.target -= 1
                log.info("SIGTTOU: %d workers", self.target)

    # -- workers -----------------------------------------------------------------------

    def spawn(self) -> None:
        if _engine_threads():
            raise RuntimeError(
                "PreforkMixIn cannot fork workers: engine threads are running in the "
                "supervisor (it served requests itself before serve_forever())"
            )
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        close_in_child = [read_end, self.wake_r, self.wake_w] + [w.fd for w in self.workers.values() if w.fd >= 0]
        supervisor_pid = os.getpid()
        # Signals wait until each side has its own handlers: a SIGTERM for the new
        # worker must not reach the supervisor's handler it inherited.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _SUPERVISOR_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                self.server._worker_main(write_end, close_in_child, supervisor_pid, self.poll_interval, blocked)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        os.close(write_end)
        os.set_blocking(read_end, False)
        self.workers[pid] = _Worker(pid, read_end, _now())
        log.info("worker %d started", pid)

    def manage(self) -> None:
        """Fork what is missing; retire what is too many (old ones once replaced)."""
        live = [w for w in self.workers.values() if not w.retiring]
        fresh = [w for w in live if not w.old]
        while len(fresh) < self.target:
            self.spawn()
            fresh.append(self.workers[next(reversed(self.workers))])
        ready = sum(1 for w in fresh if w.ready)
        old = sorted((w for w in live if w.old), key=lambda w: w.started)
        # An old worker stops only when a ready new one takes its place.
        for worker in old[: max(0, len(old) - max(0, self.target - ready))]:
            self.retire(worker, "replaced")
        if len(fresh) > self.target:
            # SIGTTOU: the ones not ready yet first, then the oldest.
            extra = sorted(fresh, key=lambda w: (w.ready, w.started))[: len(fresh) - self.target]
            for worker in extra:
                self.retire(worker, "fewer workers")
        if not self.announced and not old and ready >= self.target:
            self.announced = True
            _systemd.notify("READY=1\nSTATUS=%d workers" % ready)

    def retire(self, worker: _Worker, reason: str, signal_it: bool = True) -> None:
        worker.retiring = True
        worker.reason = reason
        worker.deadline = _now() + float(self.server.graceful_timeout)
        log.info("worker %d retiring (%s)", worker.pid, reason)
        if signal_it:
            _kill(worker.pid, signal.SIGTERM)

    def check_workers(self) -> None:
        """Liveness, the deadlines of retiring workers, and the crash count's reset."""
        now = _now()
        timeout = self.server.worker_timeout
        for worker in list(self.workers.values()):
            if worker.retiring:
                if now >= worker.deadline:
                    log.warning("worker %d did not stop within graceful_timeout: killed", worker.pid)
                    _kill(worker.pid, signal.SIGKILL)
                    worker.deadline = float("inf")
                continue
            if self.crashes and worker.started > self.last_crash and now - worker.started > self.server.crash_window:
                self.crashes = 0
            if not timeout:
                continue
            stat = _proc_stat(worker.pid)
            if stat is not None and stat[1] != worker.cpu:
                if worker.cpu >= 0:
                    worker.progress = now
                worker.cpu = stat[1]
            silent = now - max(worker.beat, worker.progress)
            if silent >= timeout:
                state = stat[0] if stat else "?"
                log.warning(
                    "worker %d did not answer for %.1f s (no heartbeat, no CPU time; state %s): killed",
                    worker.pid, silent, state,
                )
                worker.retiring = True
                worker.reason = "unresponsive"
                worker.deadline = float("inf")
                _kill(worker.pid, signal.SIGKILL)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            if worker.fd >= 0:
                os.close(worker.fd)
                worker.fd = -1
            self.exited(worker, status)

    def exited(self, worker: _Worker, status: int) -> None:
        how = _describe_status(status)
        if worker.retiring or self.stop is not None:
            log.info("worker %d %s (%s)", worker.pid, how, worker.reason or "stopping")
            return
        now = _now()
        log.warning("worker %d %s unexpectedly", worker.pid, how)
        if not worker.ready or now - worker.started < self.server.crash_window:
            self.crashes += 1
            self.last_crash = now
            if self.crashes >= self.server.crash_limit:
                message = (
                    f"{self.crashes} workers in a row exited within {self.server.crash_window:g} s "
                    f"of starting (the last one {how}); the supervisor stops instead of "
                    "forking more"
                )
                log.error("%s", message)
                self.stop = "quick"
                self.shut_down()
                raise WorkerCrashLoop(message)
        else:
            self.crashes = 0

    def shut_down(self) -> None:
        """Stop every worker (gracefully or not) and wait for them, with a deadline."""
        graceful = self.stop != "quick"
        _systemd.notify("STOPPING=1")
        signum = signal.SIGTERM if graceful else signal.SIGQUIT
        log.info("stopping %d workers (%s)", len(self.workers), "graceful" if graceful else "quick")
        for worker in self.workers.values():
            if not graceful or not worker.retiring:
                _kill(worker.pid, signum)
            worker.retiring = True
        deadline = _now() + float(self.server.graceful_timeout)
        while self.workers:
            remaining = deadline - _now()
            if remaining <= 0:
                break
            self.wait(min(self.tick, remaining))
            self.reap()
            # A second stop signal during a graceful stop makes it quick.
            if graceful and any(s in (signal.SIGINT, signal.SIGQUIT) for s in self.signals):
                self.stop_signal = next(s for s in self.signals if s in (signal.SIGINT, signal.SIGQUIT))
                self.signals.clear()
                graceful = False
                for worker in self.workers.values():
                    _kill(worker.pid, signal.SIGQUIT)
            else:
                self.signals = [s for s in self.signals if s not in _STOP_SIGNALS + (signal.SIGCHLD,)]
        if self.workers:
            log.warning("%d workers still running after graceful_timeout: killed", len(self.workers))

    def kill_all(self) -> None:
        """Nothing outlives the supervisor's loop: kill and reap what is left."""
        for worker in list(self.workers.values()):
            _kill(worker.pid, signal.SIGKILL)
        for pid, worker in list(self.workers.items()):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            if worker.fd >= 0:
                os.close(worker.fd)
            del self.workers[pid]


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"was killed by {name}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


