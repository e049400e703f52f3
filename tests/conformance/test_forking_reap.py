"""``ForkingMixIn.collect_children`` reaps exactly as the stdlib's does.

Both are driven with the same scripted ``os.waitpid`` outcomes (a child exited, still
running, already reaped elsewhere, another OSError) from the same starting set of
children and ``max_children``: the waitpid calls, their order, the set left behind and
the exception raised (if any) must be the same.
"""

from __future__ import annotations

import os
import random
import socketserver

import pytest

import fastsocketserver

IMPLEMENTATIONS = {"stdlib": socketserver.ForkingMixIn, "fast": fastsocketserver.ForkingMixIn}


class _Stop(Exception):
    """Ends a script that would otherwise wait for children forever."""


def _reap(cls: type, seed: int, blocking: bool, monkeypatch: pytest.MonkeyPatch):
    rng = random.Random(seed)
    calls: list[tuple[int, int]] = []

    def waitpid(pid: int, options: int) -> tuple[int, int]:
        calls.append((pid, options))
        if len(calls) > 40:
            raise _Stop
        roll = rng.random()
        if roll < 0.15:
            raise ChildProcessError(10, "No child processes")
        if roll < 0.25:
            raise InterruptedError(4, "Interrupted system call")
        if roll < 0.45:
            return 0, 0  # still running (WNOHANG)
        return (rng.randrange(1, 12) if pid == -1 else pid), 0

    server = cls.__new__(cls)
    server.max_children = rng.randrange(1, 6)
    server.active_children = set(rng.sample(range(1, 12), rng.randrange(0, 9)))
    with monkeypatch.context() as patch:
        patch.setattr(os, "waitpid", waitpid)
        try:
            server.collect_children(blocking=blocking)
            raised = None
        except _Stop:
            raised = "stopped"
    return calls, server.active_children, raised


@pytest.mark.parametrize("blocking", [False, True])
def test_collect_children_matches_stdlib(blocking, monkeypatch):
    for seed in range(3000):
        got = {name: _reap(cls, seed, blocking, monkeypatch) for name, cls in IMPLEMENTATIONS.items()}
        assert got["fast"] == got["stdlib"], f"seed {seed}"


def test_collect_children_without_children_is_a_no_op(monkeypatch):
    monkeypatch.setattr(os, "waitpid", lambda *a: pytest.fail("waitpid called"))
    for cls in IMPLEMENTATIONS.values():
        server = cls.__new__(cls)
        assert server.active_children is None
        server.collect_children()
        server.collect_children(blocking=True)
