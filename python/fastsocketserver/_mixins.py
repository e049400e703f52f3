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
from typing import Any

__all__ = ["ThreadingMixIn", "ForkingMixIn"]


class ForkingMixIn:
    """Mix-in class to handle each request in a new process."""

    timeout: float | None = 300
    active_children: set[int] | None = None
    max_children = 40
    # If true, server_close() waits until all child processes complete.
    block_on_close = True

    def collect_children(self, *, blocking: bool = False) -> None:
        """Internal routine to wait for children that have exited."""
        if self.active_children is None:
            return
        # If we're above the max number of children, wait and reap them until we go
        # back below threshold.
        while len(self.active_children) >= self.max_children:
            try:
                pid, _ = os.waitpid(-1, 0)
                self.active_children.discard(pid)
            except ChildProcessError:
                # we don't have any children, we're done
                self.active_children.clear()
            except OSError:
                break
        # Now reap all defunct children.
        for pid in self.active_children.copy():
            try:
                flags = 0 if blocking else os.WNOHANG
                pid, _ = os.waitpid(pid, flags)
                # if the child hasn't exited yet, pid will be 0 and ignored by discard()
                self.active_children.discard(pid)
            except ChildProcessError:
                # someone else reaped it
                self.active_children.discard(pid)
            except OSError:
                pass

    def handle_timeout(self) -> None:
        """Wait for zombies after self.timeout seconds of inactivity."""
        self.collect_children()

    def service_actions(self) -> None:
        """Collect the zombie child processes regularly in the serve_forever loop."""
        self.collect_children()

    def process_request(self, request: Any, client_address: Any) -> None:
        """Fork a new subprocess to process the request."""
        pid = os.fork()
        if pid:
            # Parent process
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
        except Exception:
            self.handle_error(request, client_address)  # type: ignore[attr-defined]
        finally:
            try:
                self.shutdown_request(request)  # type: ignore[attr-defined]
            finally:
                os._exit(status)

    def server_close(self) -> None:
        super().server_close()  # type: ignore[misc]
        self.collect_children(blocking=self.block_on_close)


class _Threads(list):  # type: ignore[type-arg]
    """Joinable list of all non-daemon threads."""

    def append(self, thread: threading.Thread) -> None:
        self.reap()
        if thread.daemon:
            return
        super().append(thread)

    def pop_all(self) -> list[threading.Thread]:
        self[:], result = [], self[:]
        return result

    def join(self) -> None:
        for thread in self.pop_all():
            thread.join()

    def reap(self) -> None:
        self[:] = (thread for thread in self if thread.is_alive())


class _NoThreads:
    """Degenerate version of _Threads."""

    def append(self, thread: threading.Thread) -> None:
        pass

    def join(self) -> None:
        pass


class ThreadingMixIn:
    """Mix-in class to handle each request in a new thread."""

    # Decides how threads will act upon termination of the main process.
    daemon_threads = False
    # If true, server_close() waits until all non-daemonic threads terminate.
    block_on_close = True
    # Threads object used by process_request(); _NoThreads unless block_on_close.
    _threads: Any = _NoThreads()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Same as in BaseServer but as a thread; exception handling is done here."""
        try:
            self.finish_request(request, client_address)  # type: ignore[attr-defined]
        except Exception:
            self.handle_error(request, client_address)  # type: ignore[attr-defined]
        finally:
            self.shutdown_request(request)  # type: ignore[attr-defined]

    def process_request(self, request: Any, client_address: Any) -> None:
        """Start a new thread to process the request."""
        if self.block_on_close:
            vars(self).setdefault("_threads", _Threads())
        t = threading.Thread(target=self.process_request_thread, args=(request, client_address))
        t.daemon = self.daemon_threads
        self._threads.append(t)
        t.start()

    def server_close(self) -> None:
        super().server_close()  # type: ignore[misc]
        self._threads.join()
