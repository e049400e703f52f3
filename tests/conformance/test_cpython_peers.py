"""CPython's own HTTP, XML-RPC and WSGI test suites, run on fastsocketserver.

``test_httpservers``, ``test_xmlrpc``, ``test_wsgiref`` and ``test_docxmlrpc`` (from the
installed interpreter's ``test`` package) build their servers on ``socketserver``. Each
is run by ``tests/peers/run_cpython_suite.py`` in a fresh interpreter that puts
``fastsocketserver`` into ``sys.modules['socketserver']`` before anything imports it and
checks that the suite's server classes really derive from ours. The same suites are also
run unchanged on the stdlib, in the same environment, as the reference: a test may be
skipped on ours only if the stdlib run skips it too (e.g. the CGI tests, which
``test_httpservers`` skips when run as root).

The interpreters of the selected suites are started at once when the first test here
needs one (the suites mostly sleep, waiting on sockets and the suites' own timeouts), so
the file takes about as long as the slowest suite. A hang ends in a thread dump (faulthandler) and a
failure, never a blocked test run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers", "run_cpython_suite.py")

#: Tests each suite defines on CPython 3.11 (counted on the stdlib, skipped ones included).
#: A run that executes fewer has lost tests (an import failure, a crash or a hang).
EXPECTED_RUN = {
    "test_httpservers": 76,
    "test_xmlrpc": 93,
    "test_wsgiref": 35,
    "test_docxmlrpc": 9,
}

#: Seconds before a suite's interpreter dumps its threads and exits. Normal runs take
#: about 2 s (test_xmlrpc: about 30 s, most of it the suite's own waits).
SUITE_TIMEOUT = {
    "test_httpservers": 45.0,
    "test_xmlrpc": 150.0,
    "test_wsgiref": 45.0,
    "test_docxmlrpc": 45.0,
}
#: Extra seconds, after the thread dump is due, before the process is killed.
KILL_GRACE = 30.0

SUITES = sorted(EXPECTED_RUN)
SIDES = ("fast", "stdlib")


class SuiteRun:
    """One suite running in its own interpreter; ``result()`` waits for it."""

    def __init__(self, suite: str, side: str, cwd: str):
        self.suite = suite
        self.side = side
        self.timeout = SUITE_TIMEOUT[suite]
        self.out_path = os.path.join(cwd, f"{suite}-{side}.out")
        self.err_path = os.path.join(cwd, f"{suite}-{side}.err")
        args = [sys.executable, RUNNER, suite, "--timeout", str(self.timeout)]
        if side == "stdlib":
            args.append("--stdlib")
        workdir = os.path.join(cwd, f"{suite}-{side}")
        os.mkdir(workdir)
        env = dict(os.environ)
        env.pop("PYTHONWARNINGS", None)
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(args, cwd=workdir, stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL, env=env)
        self.started = time.monotonic()
        self._result: dict | None = None
        self._failure: str | None = None

    def _tail(self, path: str, limit: int = 12000) -> str:
        with open(path, "rb") as f:
            data = f.read()
        return data[-limit:].decode("utf-8", "replace")

    def _finish(self) -> None:
        remaining = self.timeout + KILL_GRACE - (time.monotonic() - self.started)
        try:
            self.proc.wait(max(remaining, 1.0))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            self._failure = f"killed after {self.timeout + KILL_GRACE:.0f} s"
            return
        lines = [line for line in self._tail(self.out_path).splitlines()
                 if line.startswith("PEERS-RESULT ")]
        if not lines:
            self._failure = f"exited with status {self.proc.returncode} and no result line"
            return
        self._result = json.loads(lines[-1].split(" ", 1)[1])

    def result(self) -> dict:
        """The suite's result line; fails the test (with the stderr tail, which holds
        the thread dump of a hang) if the suite printed none."""
        if self._result is None and self._failure is None:
            self._finish()
        if self._result is None:
            pytest.fail(f"{self.suite} on {self.side}: {self._failure}; stderr tail:\n"
                        f"{self._tail(self.err_path)}", pytrace=False)
        return self._result

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _selected_suites(request) -> list[str]:
    """The suites that the selected tests of this module need (all, by default)."""
    wanted = set()
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        if item.module is request.module and callspec is not None:
            wanted.add(callspec.params.get("suite"))
    return [suite for suite in SUITES if suite in wanted] or SUITES


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    """The selected suites on both sides, started together; killed at the end if still
    running."""
    import fastsocketserver  # a broken build fails here, not as eight odd failures

    assert fastsocketserver.TCPServer
    cwd = str(tmp_path_factory.mktemp("peers"))
    started = {(suite, side): SuiteRun(suite, side, cwd)
               for suite in _selected_suites(request) for side in SIDES}
    try:
        yield started
    finally:
        for run in started.values():
            run.stop()


def _summary(result: dict) -> str:
    parts = []
    for key in ("failed_ids", "error_ids"):
        for test_id, tb in result[key].items():
            parts.append(f"--- {key[:-4]} {test_id}\n{tb}")
    return "\n".join(parts)


@pytest.mark.parametrize("suite", SUITES)
def test_stdlib_reference(runs, suite):
    """The suite passes on the stdlib here (else the environment, not we, is broken)."""
    result = runs[suite, "stdlib"].result()
    assert result["failures"] == 0 and result["errors"] == 0, _summary(result)
    assert result["run"] >= EXPECTED_RUN[suite]


@pytest.mark.parametrize("suite", SUITES)
def test_suite_on_fastsocketserver(runs, suite):
    """The suite passes with our module substituted: no failure, no error, no hang, every
    test run, and no skip that the stdlib run does not have too."""
    result = runs[suite, "fast"].result()
    assert result["substituted"] and result["checked"], result
    assert result["failures"] == 0 and result["errors"] == 0, _summary(result)
    assert result["run"] >= EXPECTED_RUN[suite]
    reference = runs[suite, "stdlib"].result()
    assert result["run"] == reference["run"]
    ours_only = sorted(set(result["skipped_ids"]) - set(reference["skipped_ids"]))
    assert not ours_only, {test_id: result["skipped_ids"][test_id] for test_id in ours_only}
    assert result["expected_failures"] == reference["expected_failures"]
    assert result["unexpected_successes"] == 0
