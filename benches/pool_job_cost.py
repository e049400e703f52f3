"""What one job costs on ThreadingMixIn's worker pool, end to end from submit() to done.

Runs N no-op jobs through `_core.WorkerPool` (max_threads=1, so one reused worker does
them all) and prints microseconds per job; run it with two builds to compare, e.g. the
cost of giving every job a fresh context and thread-local state:

    python benches/pool_job_cost.py [N] [--state]

With --state every job also sets a threading.local attribute and a ContextVar (so the
per-job reset has something to clear).
"""

import contextvars
import sys
import threading
import time

from fastsocketserver import _core


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    n = int(args[0]) if args else 100_000
    pool = _core.WorkerPool(1, 5.0)
    local = threading.local()
    var = contextvars.ContextVar("var")

    def with_state() -> None:
        local.value = 1
        var.set(1)

    noop = with_state if "--state" in sys.argv else (lambda: None)
    pool.submit(noop, ())
    pool.join()
    best = best_cpu = float("inf")
    for _ in range(5):
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(n):
            pool.submit(noop, ())
        pool.join()
        best = min(best, time.perf_counter() - start)
        best_cpu = min(best_cpu, time.process_time() - start_cpu)
    pool.close()
    print(f"{best / n * 1e6:.2f} us wall, {best_cpu / n * 1e6:.2f} us CPU per job "
          f"(best of 5 x {n})")


if __name__ == "__main__":
    main()
