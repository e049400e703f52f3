"""What one job costs on ThreadingMixIn's worker pool, end to end from submit() to done.

Runs N no-op jobs through `_core.WorkerPool` (max_threads=1, so one reused worker does
them all) and prints microseconds per job; run it with two builds to compare, e.g. the
cost of giving every job a fresh context and thread-local state:

    python benches/pool_job_cost.py [N]
"""

import sys
import time

from fastsocketserver import _core


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    pool = _core.WorkerPool(1, 5.0)
    noop = (lambda: None)
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
