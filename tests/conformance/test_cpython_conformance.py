"""CPython's own ``Lib/test/test_socketserver.py``, run against fastsocketserver.

The test module is loaded in a subprocess with ``sys.modules['socketserver']`` set to
``fastsocketserver`` before it is imported, so every ``import socketserver`` in it gets
our module, and the substitution cannot leak into this pytest process. It is run with
unittest and must run every test it defines and pass them all, with no skips.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import sysconfig

import pytest

#: Skips allowed, by test id, each with the reason it is acceptable. Empty: none is.
ALLOWED_SKIPS: dict[str, str] = {}


def _cpython_test_file() -> str | None:
    """Path of the running interpreter's ``test/test_socketserver.py``, if installed."""
    candidates = []
    try:
        import test

        candidates.append(os.path.join(os.path.dirname(test.__file__), "test_socketserver.py"))
    except ImportError:
        pass
    candidates.append(os.path.join(sysconfig.get_path("stdlib"), "test", "test_socketserver.py"))
    return next((path for path in candidates if os.path.isfile(path)), None)


TEST_FILE = _cpython_test_file()

# Runs in the subprocess. argv: the test file. Prints one JSON line with the result.
RUNNER = r'''
import json, sys, types, unittest
import fastsocketserver
sys.modules["socketserver"] = fastsocketserver

path = sys.argv[1]
with open(path, encoding="utf-8") as f:
    source = f.read()
# The one adaptation. MiscTestCase.test_all collects the public objects whose
# __module__ is the literal 'socketserver' and compares them with __all__. Ours say
# '__module__ == "fastsocketserver"' (the module's real name, as every module's
# objects do), so the literal is rewritten to the substituted module's name. Nothing
# else in the source is changed.
old, new = "== 'socketserver'", "== 'fastsocketserver'"
rewrites = source.count(old)
source = source.replace(old, new)

import test.support
module = types.ModuleType("test_socketserver")
module.__file__ = path
sys.modules[module.__name__] = module
try:
    exec(compile(source, path, "exec"), module.__dict__)
except BaseException as exc:  # ResourceDenied/SkipTest at import would skip everything
    print(json.dumps({"import_error": repr(exc)}))
    sys.exit(0)

suite = unittest.defaultTestLoader.loadTestsFromModule(module)
result = unittest.TextTestRunner(stream=sys.stderr, verbosity=2).run(suite)
print(json.dumps({
    "substituted": module.socketserver is fastsocketserver,
    "use_resources": test.support.use_resources,
    "rewrites": rewrites,
    "loaded": suite.countTestCases(),
    "run": result.testsRun,
    "failures": [(t.id(), tb) for t, tb in result.failures],
    "errors": [(t.id(), tb) for t, tb in result.errors],
    "skipped": [(t.id(), reason) for t, reason in result.skipped],
    "expected_failures": [t.id() for t, _ in result.expectedFailures],
    "unexpected_successes": [t.id() for t in result.unexpectedSuccesses],
}))
'''


def _defined_test_methods(source: str) -> int:
    """Count ``test*`` methods defined in the module's classes (independently of the
    unittest loader, so that a loader-level problem cannot hide tests)."""
    count = 0
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            count += sum(
                isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name.startswith("test")
                for item in node.body
            )
    return count


@pytest.mark.skipif(TEST_FILE is None, reason="this Python was installed without its test package")
def test_cpython_test_socketserver_passes():
    assert TEST_FILE is not None
    with open(TEST_FILE, encoding="utf-8") as f:
        defined = _defined_test_methods(f.read())
    env = dict(os.environ)
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, TEST_FILE],
        capture_output=True, text=True, timeout=120, env=env,
    )
    tail = proc.stderr[-6000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, f"runner failed (rc={proc.returncode}):\n{proc.stdout}\n{tail}"
    res = json.loads(lines[-1])
    assert "import_error" not in res, f"{TEST_FILE} could not be imported: {res['import_error']}\n{tail}"

    run, loaded = res["run"], res["loaded"]
    bad = len(res["failures"]) + len(res["errors"]) + len(res["unexpected_successes"])
    unexplained = [(tid, why) for tid, why in res["skipped"] if tid not in ALLOWED_SKIPS]
    summary = (
        f"CPython test_socketserver against fastsocketserver: {run} run, {run - bad - len(res['skipped'])} "
        f"passed, {len(res['skipped'])} skipped {res['skipped']}, {len(res['failures'])} failed, "
        f"{len(res['errors'])} errors (defined: {defined}, loaded: {loaded})"
    )
    print(summary)  # shown with pytest -s / -rP
    details = "\n".join(f"--- {tid}\n{tb}" for tid, tb in res["failures"] + res["errors"])
    assert res["substituted"], "the test module did not get fastsocketserver as socketserver"
    assert res["use_resources"] is None, "resources restricted: requires('network') may skip tests"
    assert res["rewrites"] <= 1, "more than the one expected '__module__' literal was rewritten"
    assert run == loaded and run >= defined > 0, summary
    assert not unexplained, f"{summary}\nunexplained skips: {unexplained}"
    assert bad == 0 and not res["expected_failures"], f"{summary}\n{details}\n{tail}"
