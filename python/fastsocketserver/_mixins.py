"""The concurrency mix-ins: ``ThreadingMixIn`` and ``ForkingMixIn``.

They combine with the server classes by MRO exactly like the stdlib's
(``class ThreadingTCPServer(ThreadingMixIn, TCPServer)``), override the same hooks and
keep the same attributes: ``daemon_threads``, ``block_on_close``, ``_threads``,
``process_request_thread``; ``max_children``, ``active_children``,
``collect_children(blocking=...)``.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any

from . import _core
from ._servers import _HANDLED, _library_dispatch

__all__ = ["ThreadingMixIn", "ForkingMixIn"]


class ForkingMixIn:
    """Mix-in that runs each request in a child process of its own (``os.fork()``).

    Finished children are reaped between requests; with ``max_children`` alive the
    server waits for one to exit before it takes the next request. Protocol handlers
    are refused.
    """

    timeout: float | None = 300
    active_children: set[int] | None = None
    # Protocol handlers run on the server's event loop, which forking would duplicate.
    _serves_protocols = False
    max_children = 40
    # server_close() waits for the children still running unless this is false.
    block_on_close = True

    def collect_children(self, *, blocking: bool = False) -> None:
        """Reap the children that have exited; with ``blocking``, wait for all of them.

        While ``max_children`` or more are alive, it first waits for any child to exit,
        until fewer are left.
        """
        children = self.active_children
        if children is None:
            return
        # At the cap, wait for whichever child exits first: one waitpid() per exit
        # instead of one per child. That may reap a child this server did not fork,
        # which is why it is done only at the cap.
        while len(children) >= self.max_children:
            try:
                pid, _status = os.waitpid(-1, 0)
            except ChildProcessError:
                children.clear()  # the process has no child left: none of ours runs
            except OSError:
                break
            else:
                children.discard(pid)
        options = 0 if blocking else os.WNOHANG
        for pid in children.copy():
            try:
                exited, _status = os.waitpid(pid, options)
            except ChildProcessError:
                children.discard(pid)  # reaped elsewhere already
            except OSError:
                continue
            else:
                children.discard(exited)  # 0 for a child still running: nothing removed

    def handle_timeout(self) -> None:
        """Reap finished children when ``handle_request()`` times out."""
        self.collect_children()

    def service_actions(self) -> None:
        """Reap finished children after every round of ``serve_forever()``."""
        self.collect_children()

    def process_request(self, request: Any, client_address: Any) -> None:
        """Fork: the child handles the request and exits (status 0, or 1 if the handler
        raised, reported through ``handle_error()``); the parent records the child's
        pid, closes its own copy of the request and returns to the loop."""
        pid = os.fork()
        if pid:
            if self.active_children is None:
                self.active_children = set()
            self.active_children.add(pid)
            self.close_request(request)  # type: ignore[attr-defined]
            return
        # Child process: handle the request and exit, never returning to the loop.
        status = 1
        try:
            self.finish_request(request, client_address)  # type: ignore[attr-defined]
            status = 0
        except _HANDLED:
            self.handle_error(request, client_address)  # type: ignore[attr-defined]
        finally:
            try:
                self.shutdown_request(request)  # type: ignore[attr-defined]
            finally:
                os._exit(status)

    def server_close(self) -> None:
        super().server_close()  # type: ignore[misc]
        self.collect_children(blocking=self.block_on_close)


class _Threads:
    """The in-flight requests ``server_close()`` waits for.

    The stdlib keeps the request threads themselves in ``_threads``; here the requests
    run on a pool's reused threads, so this tracks the pool's unfinished non-daemonic
    requests: ``len()`` counts them and ``join()`` waits for them (GIL released).
    """

    def __init__(self, pool: _core.WorkerPool) -> None:
        self._pool = pool

    def __len__(self) -> int:
        return self._pool.inflight

    def append(self, thread: threading.Thread) -> None:
        """Accepted for compatibility; requests are tracked by the pool itself."""

    def join(self) -> None:
        self._pool.join()

    def reap(self) -> None:
        """Nothing to reap: finished requests leave the count by themselves."""


class _NoThreads:
    """Stand-in for ``_Threads`` while ``block_on_close`` is false: nothing is waited for."""

    def __len__(self) -> int:
        return 0

    def append(self, thread: threading.Thread) -> None:
        pass

    def join(self) -> None:
        pass


#: Live pools, so that interpreter exit can wait for non-daemonic requests (as it waits
#: for non-daemon threads) and then stop the workers before finalization.
_live_pools: weakref.WeakSet[_core.WorkerPool] = weakref.WeakSet()


def _stop_pools_at_exit() -> None:
    for pool in list(_live_pools):
        pool.join()
    for pool in list(_live_pools):
        pool.close(timeout=1.0)


threading._register_atexit(_stop_pools_at_exit)  # type: ignore[attr-defined]


class ThreadingMixIn:
    """Mix-in that runs each request concurrently, on a thread of its own.

    Requests run on a pool of worker threads managed by the engine, reused across
    requests, grown on demand and retired after ``worker_idle_timeout`` seconds idle.
    ``max_threads`` (an extension; None, the default, is unbounded like the stdlib)
    caps the concurrent handlers: at the cap the server stops accepting until a handler
    finishes, and new clients wait in the listen backlog.
    """

    # True: neither server_close() nor interpreter exit waits for requests still running.
    daemon_threads = False
    # server_close() waits for the non-daemonic requests in flight unless this is false.
    block_on_close = True
    # The cap on concurrent handler threads (None: unbounded).
    max_threads: int | None = None
    # Seconds an idle worker thread waits for a request before it retires.
    worker_idle_timeout = 5.0
    # In-flight requests that server_close() waits for; _NoThreads unless block_on_close.
    _threads: Any = _NoThreads()
    __pool: _core.WorkerPool | None = None

    def _worker_pool(self) -> _core.WorkerPool:
        # A pool inherited by a forked child reads as closed: the child makes its own.
        pool = self.__pool
        if pool is None or pool.closed:
            pool = _core.WorkerPool(self.max_threads, self.worker_idle_timeout)
            _live_pools.add(pool)
            self.__pool = pool
        # Threads started from here on get what threading.Thread.start() would give.
        pool.stack_size = threading.stack_size()
        return pool

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Run one request on a worker thread: ``finish_request()``, ``handle_error()``
        if that raises, and ``shutdown_request()`` in any case."""
        try:
            self.finish_request(request, client_address)  # type: ignore[attr-defined]
        except _HANDLED:
            self.handle_error(request, client_address)  # type: ignore[attr-defined]
        finally:
            self.shutdown_request(request)  # type: ignore[attr-defined]

    def process_request(self, request: Any, client_address: Any) -> None:
        """Run the request on a worker thread."""
        pool = self._tracked_pool()
        pool.submit(self.process_request_thread, (request, client_address), not self.daemon_threads)

    def _tracked_pool(self) -> _core.WorkerPool:
        pool = self._worker_pool()
        if self.block_on_close:
            threads = vars(self).get("_threads")
            if not isinstance(threads, _Threads) or threads._pool is not pool:
                self._threads = _Threads(pool)
        return pool

    def _engine_pool(self, kind: int) -> _core.WorkerPool | None:
        """The pool, when the engine may queue requests on it itself: none of the
        dispatch hooks, ``process_request`` and ``process_request_thread`` included, is
        overridden (the engine then runs what they do; see ``_core.Reactor.serve``)."""
        own = _library_dispatch(
            self,  # type: ignore[arg-type]
            kind,
            process_request=ThreadingMixIn.process_request,
            process_request_thread=ThreadingMixIn.process_request_thread,
        )
        return self._tracked_pool() if own else None

    def server_close(self) -> None:
        super().server_close()  # type: ignore[misc]
        self._threads.join()
        pool, self.__pool = self.__pool, None
        if pool is not None:
            # Idle workers retire at once; daemonic requests still running are not waited for.
            pool.close(timeout=None if pool.busy == 0 else 0)
